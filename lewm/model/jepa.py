"""LeWM: encoder + action encoder + predictor + projectors, with encode / predict / rollout / loss.

    model = LeWM(lewm.preset("pusht"))
    z = model.encode(pixels)               # (B, T, H, W, 3) uint8 -> (B, T, D)
    z_next = model.predict(z, actions)     # (B, T, D), (B, T, frameskip*action_dim) -> (B, T, D)
    out = model.loss(pixels, actions)      # the two-term training loss (dict)

Actions given to `predict`, `rollout` and `loss` are macro actions in the z-scored space: the data
set's per-dimension mean/std are stored in the model (`action_mean`, `action_std`) so a checkpoint
carries what planning needs to map plans back to raw actions.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Config, ModelConfig
from ..nvtx import nvtx_range
from ..sigreg import SIGReg
from .encoder import Encoder, MLPProjector
from .predictor import ActionEncoder, Predictor


class LeWM(nn.Module):
    def __init__(self, cfg: Config | ModelConfig | None = None):
        super().__init__()
        if cfg is None:
            cfg = Config()
        if isinstance(cfg, ModelConfig):
            cfg = Config(model=cfg)
        cfg.validate()  # ConfigError (a ValueError) naming the first out-of-range field
        self.cfg = cfg
        m = cfg.model
        self.encoder = Encoder(m)  # ViT + projector
        self.action_encoder = ActionEncoder(m)
        self.predictor = Predictor(m)
        self.pred_proj = MLPProjector(m.embed_dim, m.proj_hidden, m.embed_dim)
        self.sigreg = SIGReg(m.embed_dim, cfg.sigreg.num_proj, cfg.sigreg.knots, cfg.sigreg.t_max,
                             impl=cfg.sigreg.impl, seed=cfg.train.seed)
        self.register_buffer("action_mean", torch.zeros(m.action_dim))
        self.register_buffer("action_std", torch.ones(m.action_dim))

    # -- the model ---------------------------------------------------------------------------------
    @property
    def mcfg(self) -> ModelConfig:
        return self.cfg.model

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, T, H, W, 3) uint8 frames (or (B, H, W, 3)) -> (B, T, D) latents (or (B, D)).

        Frames may be any size: they are resized to model.image_size on their device."""
        single = pixels.dim() == 4
        if single:
            pixels = pixels.unsqueeze(1)
        if pixels.dim() != 5 or pixels.shape[-1] != 3:
            raise ValueError(f"encode expects (B, T, H, W, 3) frames, got shape {tuple(pixels.shape)}")
        B, T = pixels.shape[:2]
        dev = self.action_mean.device
        x = self.encoder.preprocess(pixels.reshape(B * T, *pixels.shape[2:]).to(dev, non_blocking=True))
        z = self.encoder(x).reshape(B, T, -1)
        return z[:, 0] if single else z

    def predict(self, z: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """(B, T, D) latents, (B, T, frameskip*action_dim) z-scored macro actions -> (B, T, D).

        Output t is the prediction of frame t+1 given frames <= t and actions <= t."""
        if z.shape[:2] != actions.shape[:2]:
            raise ValueError(f"predict: latents {tuple(z.shape)} and actions {tuple(actions.shape)} "
                             "must share (B, T)")
        if actions.shape[-1] != self.mcfg.action_input_dim:
            raise ValueError(f"predict: actions have width {actions.shape[-1]}, the model expects "
                             f"frameskip*action_dim = {self.mcfg.action_input_dim}")
        return self.pred_proj(self.predictor(z, self.action_encoder(actions)))

    def predict_last(self, z: torch.Tensor, act_emb: torch.Tensor) -> torch.Tensor:
        """Like predict, from action *embeddings*, keeping only the last position: (B, D)."""
        h = self.predictor(z, act_emb)[:, -1]
        return self.pred_proj(h)

    @torch.no_grad()
    def rollout(self, z0: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Reference autoregressive rollout (the planner's model; no KV cache), without gradients:
        `rollout_with_grad` below, which the gradient planner differentiates."""
        return self.rollout_with_grad(z0, actions)

    def rollout_with_grad(self, z0: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Reference autoregressive rollout (the planner's model; no KV cache).

        z0 (N, C, D) context latents (C >= 1 frames), actions (N, H, frameskip*action_dim) z-scored:
        the first C actions go with the context frames, then one action per predicted step.
        Returns (N, H - C + 1, D): the predicted latents after actions C-1 .. H-1 (the last one is
        what the planning cost compares with the goal). The predictor sees a sliding window of the
        last `history` frames, as in the reference."""
        N, C, _ = z0.shape
        H = actions.shape[1]
        if H < C:
            raise ValueError(f"rollout needs at least as many actions ({H}) as context frames ({C})")
        act_emb = self.action_encoder(actions)  # (N, H, D): per-step, so encode all at once
        W = self.mcfg.history
        z = z0
        preds = []
        for i in range(C - 1, H):
            lo = max(0, i + 1 - W)
            nxt = self.predict_last(z[:, lo:i + 1], act_emb[:, lo:i + 1])
            preds.append(nxt)
            z = torch.cat([z, nxt[:, None]], dim=1)
        return torch.stack(preds, dim=1)

    def loss(self, pixels: torch.Tensor, actions: torch.Tensor, *, step: int = 0,
             sigreg_weight: float | None = None, directions: torch.Tensor | None = None) -> dict:
        """The two-term loss on a batch of clips.

        pixels (B, T, H, W, 3) uint8; actions (B, T, A) z-scored macro actions (NaN -> 0).
        Returns dict(loss, pred_loss, sigreg, emb)."""
        lam = self.cfg.sigreg.weight if sigreg_weight is None else sigreg_weight
        with nvtx_range("encode"):
            T = pixels.shape[1]
            emb = self.encode(pixels)
        with nvtx_range("predict"):
            act_emb = self.action_encoder(torch.nan_to_num(actions, nan=0.0))
            ctx = T - 1
            pred = self.pred_proj(self.predictor(emb[:, :ctx], act_emb[:, :ctx]))
        with nvtx_range("loss"):
            pred_loss = F.mse_loss(pred.float(), emb[:, 1:].float())
            sig = self.sigreg(emb.transpose(0, 1), step=step, directions=directions)
        return {"loss": pred_loss + lam * sig, "pred_loss": pred_loss, "sigreg": sig, "emb": emb}

    def forward(self, *args, **kwargs) -> dict:
        """The training loss (so DDP and torch.compile wrap the whole step's forward)."""
        return self.loss(*args, **kwargs)

    # -- normalisation of actions ------------------------------------------------------------------
    def set_action_stats(self, mean, std) -> None:
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean.numel() != self.mcfg.action_dim or std.numel() != self.mcfg.action_dim:
            raise ValueError(f"action stats have {mean.numel()} dims, model.action_dim is {self.mcfg.action_dim}")
        self.action_mean.copy_(mean)
        self.action_std.copy_(std.clamp_min(1e-6))

    def normalize_actions(self, raw: torch.Tensor) -> torch.Tensor:
        """(..., action_dim) raw actions -> z-scored."""
        return (raw - self.action_mean) / self.action_std

    def denormalize_actions(self, z: torch.Tensor) -> torch.Tensor:
        """(..., action_dim) z-scored actions -> raw scale."""
        return z * self.action_std + self.action_mean

    # -- counting ------------------------------------------------------------------------------------
    def param_counts(self) -> dict:
        def n(m):
            return sum(p.numel() for p in m.parameters())
        c = {"encoder": n(self.encoder.vit), "projector": n(self.encoder.projector),
             "predictor": n(self.predictor), "pred_proj": n(self.pred_proj),
             "action_encoder": n(self.action_encoder)}
        c["total"] = sum(c.values())
        return c

    # -- checkpoints: safetensors + JSON, loaded without executing code (lewm/checkpoint.py) ------------
    def save(self, path: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write `path/model.safetensors` and `path/config.json` atomically (a temporary folder
        renamed into place). `extra`: more JSON fields for config.json."""
        from ..checkpoint import write_model
        return write_model(path, self.state_dict(), self.cfg.to_dict(), extra)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "LeWM":
        """Load a checkpoint folder written by `save`, a file inside one, or a training run folder (its
        latest checkpoint), in eval mode. No pickle; a format version this lewm does not read is refused."""
        from ..checkpoint import read_model
        from ..errors import CheckpointError
        cfg, state, _meta, ckpt = read_model(path, map_location)
        model = cls(cfg)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {ckpt / 'model.safetensors'} does not match its config: missing "
                                  f"{missing[:5]}, unexpected {unexpected[:5]}")
        return model.to(map_location).eval()
