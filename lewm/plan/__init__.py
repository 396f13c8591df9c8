"""Planners (one interface: `planner.plan(start_frames, goal_frames) -> PlanResult`).

    CEMPlanner       the eager reference CEM (cem.py), the oracle
    FastPlanner      the fast path (engine.py): encode once, KV cache, fused rollout, CUDA graph
    MPPIPlanner      MPPI (mppi.py)
    GradientPlanner  Adam on the action sequence (gradient.py)
    RandomPlanner    uniform random actions: the baseline of the evaluation protocol (planners.py)

`make_planner(name, model)` builds one by name (planners.py). The evaluation protocol that runs them
(`lewm eval`) is lewm/evals/planning.py.
"""
import importlib

from .cem import CEMPlanner, Planner, PlanResult, terminal_cost

_LAZY = {"FastPlanner": ".engine", "MPPIPlanner": ".mppi", "GradientPlanner": ".gradient",
         "RandomPlanner": ".planners", "make_planner": ".planners", "PLANNERS": ".planners"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'lewm.plan' has no attribute '{name}'")


__all__ = ["Planner", "PlanResult", "CEMPlanner", "terminal_cost", *_LAZY]
