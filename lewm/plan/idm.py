"""An inverse-dynamics head on frozen latents (after arXiv 2605.08732): from the start and goal embeddings,
the whole horizon of z-scored macro actions in one forward pass.

    head = load_idm("runs/tworoom/checkpoints/step_00003000")     # written by `lewm idm`
    planner = IDMPlanner(model, head)                             # acts from the head alone
    planner = CEMPlanner(model, init=head)                        # CEM starts from its proposal

The head is trained by `lewm idm` (lewm/train_idm.py) on the training episodes' embeddings with the
encoder and predictor frozen: input (z_s, z_{s + H * frameskip}), target the H macro actions taken
between the two frames. Saved beside the checkpoint as idm.safetensors + idm.json (no pickle).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ..atomic import atomic_path, write_json
from ..errors import CheckpointError, UserError
from ..model import LeWM
from .cem import Planner, PlanResult, terminal_cost

IDM_FORMAT = "lewm-idm/1"
IDM_WEIGHTS = "idm.safetensors"
IDM_CONFIG = "idm.json"


class IDMHead(nn.Module):
    """MLP (z_start, z_goal) (2D) -> (horizon, width) z-scored macro actions; GELU, LayerNorm input."""

    def __init__(self, dim: int, horizon: int, width: int, hidden: int = 256, depth: int = 2):
        super().__init__()
        if min(dim, horizon, width, hidden, depth) <= 0:
            raise ValueError("IDMHead: dim, horizon, width, hidden and depth must be positive")
        self.dim, self.horizon, self.width, self.hidden, self.depth = dim, horizon, width, hidden, depth
        layers: list[nn.Module] = [nn.LayerNorm(2 * dim)]
        d = 2 * dim
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.GELU()]
            d = hidden
        layers.append(nn.Linear(d, horizon * width))
        self.net = nn.Sequential(*layers)

    def forward(self, z0: torch.Tensor, zg: torch.Tensor) -> torch.Tensor:
        """z0, zg (E, D) -> (E, horizon, width)."""
        x = torch.cat([z0, zg], dim=-1).to(self.net[0].weight.dtype)
        return self.net(x).reshape(z0.shape[0], self.horizon, self.width)

    def config(self) -> dict:
        return {"dim": self.dim, "horizon": self.horizon, "width": self.width, "hidden": self.hidden,
                "depth": self.depth}


def save_head(head: nn.Module, folder, stem: str, fmt: str, extra: dict | None = None) -> Path:
    """`stem`.safetensors + `stem`.json (format `fmt`, the head's config) into checkpoint folder `folder`,
    each written atomically."""
    from safetensors.torch import save_file
    folder = Path(folder)
    with atomic_path(folder / f"{stem}.safetensors") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(tmp))
    write_json({"format": fmt, "head": head.config(), **(extra or {})}, folder / f"{stem}.json")
    return folder / f"{stem}.safetensors"


def load_head(path, stem: str, fmt: str, cls, command: str, device="cpu"):
    """The head saved by `save_head` in `path` (a checkpoint folder, or its `stem`.safetensors), in eval
    mode; one message naming the file when it is missing, of another format or unreadable."""
    from safetensors.torch import load_file
    p = Path(path)
    folder = p.parent if p.is_file() else p
    w, c = folder / f"{stem}.safetensors", folder / f"{stem}.json"
    for f in (w, c):
        if not f.exists():
            raise UserError(f"--{stem} {folder}: no {f.name}; train the head first: lewm {command} --checkpoint "
                            f"{folder} --data FILE")
    try:
        meta = json.loads(c.read_text())
        if meta.get("format") != fmt:
            raise CheckpointError(f"{c}: format {meta.get('format')!r}, this lewm reads {fmt}")
        head = cls(**meta["head"])
        head.load_state_dict(load_file(str(w)))
    except CheckpointError:
        raise
    except Exception as e:  # JSON, a missing field, safetensors' own errors, a shape mismatch
        raise CheckpointError(f"{folder}: the {stem} head is unreadable ({type(e).__name__}: {e})") from None
    return head.to(device).eval()


def save_idm(head: IDMHead, folder, extra: dict | None = None) -> Path:
    return save_head(head, folder, "idm", IDM_FORMAT, extra)


def load_idm(path, device="cpu") -> IDMHead:
    """The IDM head in `path` (a checkpoint folder holding idm.safetensors, or that file), in eval mode."""
    return load_head(path, "idm", IDM_FORMAT, IDMHead, "idm", device)


def check_head(head: IDMHead, model: LeWM, horizon: int) -> None:
    m = model.mcfg
    if (head.dim, head.width) != (m.embed_dim, m.action_input_dim):
        raise UserError(f"the IDM head was trained for latents of {head.dim} and macro actions of {head.width}, "
                        f"the model has {m.embed_dim} and {m.action_input_dim}")
    if head.horizon != horizon:
        raise UserError(f"the IDM head predicts {head.horizon} macro steps, the planner's horizon is {horizon}")


class IDMPlanner(Planner):
    """Acts from the IDM head alone: one encoder pass per frame and one MLP pass; no sampling. The
    reported cost is the model's terminal cost of the proposal (what CEM would score it)."""

    def __init__(self, model: LeWM, head: IDMHead, horizon: int = 5, seed: int | None = 42, **_ignored):
        super().__init__(model, 1, 1, 1, horizon, 1.0, seed)
        check_head(head, model, horizon)
        self.head = head.to(self.device).eval()

    @classmethod
    def from_config(cls, model: LeWM, head: IDMHead | None = None, **overrides):
        if head is None:
            raise UserError("planner 'idm' needs the IDM head (lewm idm; --idm PATH)")
        p = model.cfg.plan
        kw = dict(horizon=p.horizon, seed=p.seed)
        kw.update(overrides)
        return cls(model, head, **kw)

    def noise_shape(self, n_envs: int) -> tuple:
        return (n_envs, 1)  # no random draws; the shape keeps the protocol's per-episode noise machinery

    def draw_noise(self, n_envs: int) -> torch.Tensor:
        return torch.zeros(self.noise_shape(n_envs), device=self.device)

    @torch.no_grad()
    def plan(self, start, goal, noise: torch.Tensor | None = None) -> PlanResult:
        start, goal, _ = self._inputs(start, goal, noise)
        z0, zg = self.model.encode(start).float(), self.model.encode(goal).float()
        a = self.head(z0, zg).float()
        return PlanResult(a, self.to_raw(a), terminal_cost(self.model, z0, zg, a[:, None], self.goal_cost)[:, 0])
