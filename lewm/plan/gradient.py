"""Gradient-based planning: AdamW on the action sequence, through the differentiable rollout.

The variant of the reference platform's `GradientSolver` with its LeWM eval config
(`config/eval/solver/adam.yaml`: 30 steps, 100 samples, AdamW lr 0.1, no action noise),
re-implemented:

    x[s] = var_scale * N(0, 1) for s >= 1, x[0] = 0    (samples x (H, frameskip*A), z-scored)
    repeat `iterations` times:
        cost[s] = || rollout(z0, x[s])[-1] - zg ||^2   (terminal step only, with gradients)
        x <- AdamW step on sum_s cost[s]                (samples are independent: Adam is
                                                         elementwise and the sum separates)
    plan = x[argmin_s cost after the last step]

`LeWM.rollout` runs under no_grad (it is the planner's sampling model), so the rollout here is its
own loop over the same pieces (action encoder, `predict_last` on a sliding window of <= history
frames). Gradients are taken with respect to the actions only (`torch.autograd.grad`), so the model's
parameters never accumulate `.grad`. The reference picks the best sample with the costs of the last
step *before* its final update; here the costs are evaluated once more after it.

Same interface as `CEMPlanner`, except the explicit `noise` is the initial draw only:
noise (E, samples, horizon, frameskip*A).
"""
from __future__ import annotations

import torch

from ..model import LeWM
from .cem import Planner, PlanResult, candidate_context, terminal_cost


def rollout_last(model: LeWM, z0: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Differentiable rollout: z0 (N, C, D) context latents, actions (N, H, frameskip*A) z-scored
    -> (N, D) the latent after the last action (`LeWM.rollout_with_grad(...)[:, -1]`)."""
    return model.rollout_with_grad(z0, actions)[:, -1]


class GradientPlanner(Planner):
    def __init__(self, model: LeWM, samples: int = 100, iterations: int = 30, horizon: int = 5,
                 lr: float = 0.1, var_scale: float = 1.0, seed: int | None = 42, weight_decay: float = 0.01,
                 elites: int | None = None):
        # `elites` is accepted (and ignored) so every planner takes the same keywords
        super().__init__(model, samples, 1, iterations, horizon, var_scale, seed)
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.lr, self.weight_decay = float(lr), float(weight_decay)

    @classmethod
    def from_config(cls, model: LeWM, **overrides):
        """Horizon, var_scale and seed from the model's PlanConfig; samples (100), steps (30) and lr
        (0.1) are this planner's own defaults (the PlanConfig numbers are CEM's)."""
        p = model.cfg.plan
        kw = dict(horizon=p.horizon, var_scale=p.var_scale, seed=p.seed)
        kw.update(overrides)
        return cls(model, **kw)

    def noise_shape(self, n_envs: int) -> tuple:
        return (n_envs, self.samples, self.horizon, self.width)

    def cost(self, z0: torch.Tensor, zg: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """z0, zg (E, D), x (E, S, H, W) -> (E, S) terminal costs, differentiable in x."""
        E, S = x.shape[:2]
        ctx = candidate_context(z0, S)
        pred = rollout_last(self.model, ctx, x.reshape(E * S, *x.shape[2:]))
        return (pred.reshape(E, S, -1) - zg[:, None, :]).pow(2).sum(-1)

    def plan(self, start, goal, noise: torch.Tensor | None = None) -> PlanResult:
        start, goal, noise = self._inputs(start, goal, noise)
        model = self.model
        E = start.shape[0]
        with torch.no_grad():
            z0, zg = model.encode(start), model.encode(goal)
            x0 = self.var_scale * noise
            x0[:, 0] = 0.0
        x = x0.clone().requires_grad_(True)
        opt = torch.optim.AdamW([x], lr=self.lr, weight_decay=self.weight_decay)
        with torch.enable_grad():
            for _ in range(self.iterations):
                (g,) = torch.autograd.grad(self.cost(z0, zg, x).sum(), [x])
                x.grad = g
                opt.step()
        with torch.no_grad():
            x = x.detach()
            cost = terminal_cost(model, z0, zg, x, self.goal_cost)  # (E, S)
            best = cost.argmin(1)
            ar = torch.arange(E, device=x.device)
            plan = x[ar, best]
            return PlanResult(plan, self.to_raw(plan), cost[ar, best])
