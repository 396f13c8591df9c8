"""MPPI (Model Predictive Path Integral) in latent space, plain eager PyTorch.

The variant of the reference platform's `MPPISolver` (stable-worldmodel, defaults 300 samples,
30 iterations, top-k 30, temperature 0.5), re-implemented:

    mean = 0, std = var_scale                       (z-scored action space, (H, frameskip*A))
    repeat `iterations` times:
        candidates = mean + std * N(0, 1)           (candidate 0 = mean)
        cost = || rollout(z0, candidate)[-1] - zg ||^2      (terminal step only, as CEM)
        keep the `elites` cheapest candidates (all of them when elites >= samples)
        w = softmax(-(cost - min cost) / temperature) over the kept candidates
        mean = sum_k w_k candidate_k
    plan = mean

Unlike CEM the spread is never refitted: std stays `var_scale` (standard MPPI; so does the
reference). With the reference's temperature (0.5) and latent costs of order D, the weights are
close to an arg-min over the elites; a larger temperature averages more of them.

Same interface as `CEMPlanner`: plan(start, goal, noise) with noise (iterations, E, samples,
horizon, frameskip*A); every environment is planned independently (batched on the E axis).
"""
from __future__ import annotations

import torch

from ..model import LeWM
from .cem import Planner, PlanResult, terminal_cost


class MPPIPlanner(Planner):
    def __init__(self, model: LeWM, samples: int = 300, elites: int = 30, iterations: int = 30,
                 horizon: int = 5, var_scale: float = 1.0, seed: int | None = 42, temperature: float = 0.5):
        super().__init__(model, samples, min(elites, samples), iterations, horizon, var_scale, seed)
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    @torch.no_grad()
    def plan(self, start, goal, noise: torch.Tensor | None = None) -> PlanResult:
        start, goal, noise = self._inputs(start, goal, noise)
        model = self.model
        E = start.shape[0]
        z0, zg = model.encode(start), model.encode(goal)  # (E, D) each
        mean = torch.zeros(E, self.horizon, self.width, device=self.device)
        std = self.var_scale
        for it in range(self.iterations):
            cand = mean[:, None] + std * noise[it]  # (E, S, H, W)
            cand[:, 0] = mean
            cost = terminal_cost(model, z0, zg, cand, self.goal_cost)  # (E, S)
            if self.elites < self.samples:
                cost, idx = cost.topk(self.elites, dim=1, largest=False)  # (E, k)
                cand = torch.gather(cand, 1, idx[:, :, None, None].expand(-1, -1, self.horizon, self.width))
            w = torch.softmax(-(cost - cost.min(1, keepdim=True).values) / self.temperature, dim=1)
            mean = (w[:, :, None, None] * cand).sum(1)
        final_cost = terminal_cost(model, z0, zg, mean[:, None], self.goal_cost)[:, 0]
        return PlanResult(mean, self.to_raw(mean), final_cost)
