"""The planners by name (`make_planner`), and the random-policy baseline behind the planner interface.

    planner = make_planner("fast", model, samples=300)     # cem | fast | mppi | gradient | random
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from ..model import LeWM
from .cem import CEMPlanner, Planner, PlanResult
PLANNERS = ("cem", "fast", "mppi", "gradient", "random", "idm")
INITS = ("zeros", "idm")


# -- planners ----------------------------------------------------------------------------------------
class RandomPlanner(Planner):
    """Uniform raw actions in [low, high] (the env's action box): the random-policy baseline, behind
    the planner interface so the evaluation loop runs it like any planner.

    noise (E, horizon*frameskip, action_dim) uniform in [0, 1) makes the draws explicit."""
    noise_dist = "uniform"

    def __init__(self, model: LeWM, horizon: int = 5, low=None, high=None, seed: int | None = 42, **_ignored):
        super().__init__(model, 1, 1, 1, horizon, 1.0, seed)
        A = self.action_dim
        self.low = torch.as_tensor(-np.ones(A) if low is None else low, dtype=torch.float32).reshape(A)
        self.high = torch.as_tensor(np.ones(A) if high is None else high, dtype=torch.float32).reshape(A)

    @classmethod
    def from_config(cls, model: LeWM, **overrides):
        p = model.cfg.plan
        kw = dict(horizon=p.horizon, seed=p.seed)
        kw.update(overrides)
        return cls(model, **kw)

    def noise_shape(self, n_envs: int) -> tuple:
        return (n_envs, self.horizon * self.frameskip, self.action_dim)

    def draw_noise(self, n_envs: int) -> torch.Tensor:
        return torch.rand(self.noise_shape(n_envs), generator=self._rng(), device=self.device)

    @torch.no_grad()
    def plan(self, start, goal, noise: torch.Tensor | None = None) -> PlanResult:
        start, goal, noise = self._inputs(start, goal, noise)
        E = start.shape[0]
        low, high = self.low.to(self.device), self.high.to(self.device)
        raw = low + (high - low) * noise  # (E, H*fs, A)
        z = self.model.normalize_actions(raw).reshape(E, self.horizon, self.width)
        return PlanResult(z, raw, torch.full((E,), float("nan"), device=self.device))


def make_planner(name: str, model: LeWM, *, idm=None, init: str | None = None, cost: str | None = None,
                 reach=None, reach_weight: float = 1.0, **kw) -> Planner:
    """A planner by name: "cem" (the eager reference), "fast" (`lewm.plan.engine.FastPlanner`),
    "mppi", "gradient", "random" or "idm" (the inverse-dynamics head alone, `idm=` the head).
    init="idm" (cem, fast): CEM's first mean is the head's proposal instead of 0. cost="reach" | "mix"
    (with reach= the reachability head, lewm/plan/reach.py): the terminal cost; "l2" (default) the reference's.

    Defaults come from the model's PlanConfig (samples, elites, iterations, horizon, var_scale,
    seed) for cem/fast/mppi, so they plan with the same sampling budget; the gradient planner keeps
    its own samples (100), steps (30) and lr (0.1). Keyword arguments override (None = default)."""
    pl = _make_planner(name, model, idm=idm, init=init, **kw)
    if cost not in (None, "l2"):
        from .reach import GoalCost
        pl.goal_cost = GoalCost(cost, reach.to(pl.device).eval() if reach is not None else None, reach_weight)
    return pl


def _make_planner(name: str, model: LeWM, *, idm=None, init: str | None = None, **kw) -> Planner:
    """`make_planner` without the terminal cost."""
    kw = {k: v for k, v in kw.items() if v is not None}
    if init not in (None, *INITS):
        raise UserError(f"--init must be one of {', '.join(INITS)}, got {init!r}")
    if init == "idm":
        if name not in ("cem", "fast"):
            raise UserError(f"--init idm applies to the CEM planners (cem, fast), not '{name}'")
        if idm is None:
            raise UserError("--init idm needs the IDM head (lewm idm; --idm PATH)")
        from .idm import check_head
        check_head(idm, model, kw.get("horizon") or model.cfg.plan.horizon)
        kw["init"] = idm.to(model.action_mean.device).eval()
    if name == "idm":
        from .idm import IDMPlanner
        return IDMPlanner.from_config(model, head=idm, **{k: v for k, v in kw.items() if k in ("horizon", "seed")})
    if name == "cem":
        return CEMPlanner.from_config(model, **kw)
    if name == "fast":
        try:
            from .engine import FastPlanner
        except ImportError as e:
            raise UserError(f"planner 'fast' is not available ({e}); use --planner cem") from None
        return FastPlanner.from_config(model, **kw)
    if name == "mppi":
        from .mppi import MPPIPlanner
        return MPPIPlanner.from_config(model, **kw)
    if name == "gradient":
        from .gradient import GradientPlanner
        return GradientPlanner.from_config(model, **kw)
    if name == "random":
        return RandomPlanner.from_config(model, **kw)
    raise UserError(f"unknown planner '{name}' (known: {', '.join(PLANNERS)})")
