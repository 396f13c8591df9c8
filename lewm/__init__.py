"""LeWM engine: LeWorldModel (JEPA from pixels + SIGReg) with fused kernels and a fast CEM planner.

    import lewm
    cfg = lewm.preset("pusht")
    model = lewm.LeWM(cfg)
    z = model.encode(pixels)
    loss = lewm.sigreg(z, directions)
    planner = lewm.plan.CEMPlanner(model)
"""
from .config import Config, DataConfig, ModelConfig, PlanConfig, SIGRegConfig, TrainConfig, preset, preset_names
from .model import LeWM
from . import sigreg  # the module, callable: lewm.sigreg(z, directions) is lewm.sigreg.sigreg(...)
from .sigreg import SIGReg, effective_rank

__version__ = "0.1.0"


def __getattr__(name):
    # `lewm.plan` is imported lazily: it pulls in the planners, which most users of the model need not load.
    if name == "plan":
        import importlib
        return importlib.import_module(".plan", __name__)
    if name == "from_reference":  # a LeWM from the reference's weights.pt + config.json (lewm/convert.py)
        from .convert import from_reference
        return from_reference
    raise AttributeError(f"module 'lewm' has no attribute '{name}'")


__all__ = ["Config", "DataConfig", "ModelConfig", "PlanConfig", "SIGRegConfig", "TrainConfig", "preset", "preset_names",
           "LeWM", "SIGReg", "sigreg", "effective_rank", "plan", "from_reference"]
