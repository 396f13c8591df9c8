from .encoder import Encoder, MLPProjector
from .jepa import LeWM
from .predictor import ActionEncoder, ConditionalBlock, Predictor

__all__ = ["LeWM", "Encoder", "MLPProjector", "Predictor", "ActionEncoder", "ConditionalBlock"]
