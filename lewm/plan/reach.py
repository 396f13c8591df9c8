"""A horizon-matched reachability head on frozen latents (after arXiv 2605.22164), used as the planner's
terminal cost instead of, or mixed with, the squared latent distance.

    head = load_reach("runs/tworoom/checkpoints/step_00003000")   # written by `lewm reach`
    planner = CEMPlanner(model, goal_cost=GoalCost("reach", head))
    planner = make_planner("fast", model, cost="mix", reach=head, reach_weight=1.0)

r(z_a, z_b) in [0, 1] estimates how far b lies ahead of a, in units of the separation the head was
trained on: 0 = the same state, 1 = `max_steps` macro steps or more (or another episode). `lewm reach`
trains it on pairs of the training episodes' frozen embeddings with separations up to twice the planning
horizon (horizon-matched), negatives from other episodes; encoder and predictor stay frozen.

Costs (E, S) of final predicted latents `pred` (E, S, D) against goals zg (E, D):
    l2     sum_d (pred - zg)^2                         the reference's
    reach  r(pred, zg)
    mix    sum_d (pred - zg)^2 / D + weight * r(pred, zg)
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..errors import UserError
from .idm import load_head, save_head

REACH_FORMAT = "lewm-reach/1"
COSTS = ("l2", "reach", "mix")


class ReachHead(nn.Module):
    """MLP on (z_a, z_b, z_b - z_a) -> sigmoid: the normalised temporal distance from a to b."""

    def __init__(self, dim: int, max_steps: int, hidden: int = 256, depth: int = 2):
        super().__init__()
        if min(dim, max_steps, hidden, depth) <= 0:
            raise ValueError("ReachHead: dim, max_steps, hidden and depth must be positive")
        self.dim, self.max_steps, self.hidden, self.depth = dim, max_steps, hidden, depth
        layers: list[nn.Module] = [nn.LayerNorm(3 * dim)]
        d = 3 * dim
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.GELU()]
            d = hidden
        layers.append(nn.Linear(d, 1))
        self.net = nn.Sequential(*layers)

    def logits(self, za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
        x = torch.cat([za, zb, zb - za], dim=-1).to(self.net[1].weight.dtype)
        return self.net(x).squeeze(-1)

    def forward(self, za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
        """(..., D), (..., D) -> (...) in [0, 1]."""
        return torch.sigmoid(self.logits(za, zb))

    def config(self) -> dict:
        return {"dim": self.dim, "max_steps": self.max_steps, "hidden": self.hidden, "depth": self.depth}


def save_reach(head: ReachHead, folder, extra: dict | None = None) -> Path:
    return save_head(head, folder, "reach", REACH_FORMAT, extra)


def load_reach(path, device="cpu") -> ReachHead:
    """The reachability head in `path` (a checkpoint folder holding reach.safetensors, or that file)."""
    return load_head(path, "reach", REACH_FORMAT, ReachHead, "reach", device)


class GoalCost:
    """The planner's terminal cost: `GoalCost(mode, head, weight)(pred (E, S, D), zg (E, D)) -> (E, S)`; the
    head must sit on the planner's device (make_planner puts it there)."""

    def __init__(self, mode: str = "l2", head: ReachHead | None = None, weight: float = 1.0):
        if mode not in COSTS:
            raise UserError(f"--cost must be one of {', '.join(COSTS)}, got {mode!r}")
        if mode != "l2" and head is None:
            raise UserError(f"--cost {mode} needs the reachability head (lewm reach; --reach PATH)")
        if not weight >= 0:
            raise UserError(f"--reach-weight must be >= 0, got {weight}")
        self.mode, self.head, self.weight = mode, head, float(weight)

    def __call__(self, pred: torch.Tensor, zg: torch.Tensor) -> torch.Tensor:
        zg = zg[:, None, :].expand_as(pred)
        l2 = (pred - zg).pow(2).sum(-1)
        if self.mode == "l2":
            return l2
        r = self.head(pred.float(), zg.float()).float()
        return r if self.mode == "reach" else l2 / pred.shape[-1] + self.weight * r

    def describe(self) -> dict:
        return {"cost": self.mode, **({"reach_weight": self.weight} if self.mode == "mix" else {})}
