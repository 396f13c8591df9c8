"""`lewm idm --checkpoint RUN --data FILE`: train the inverse-dynamics head (lewm/plan/idm.py) on frozen
embeddings, and save it beside the checkpoint.

    lewm idm --checkpoint runs/tworoom --data data/tworoom.h5
    lewm eval tworoom --checkpoint runs/tworoom --data data/tworoom.h5 --planner idm      # the head alone
    lewm eval tworoom --checkpoint runs/tworoom --data data/tworoom.h5 --init idm         # CEM from its proposal

Pairs: start rows s of the checkpoint's *training* episodes (the split training used; its held-out
episodes are only scored) with s + H * frameskip rows left in the episode; input (z_s, z_{s+H*fs}),
target the H macro actions between them, z-scored with the model's action statistics; MSE, AdamW.
The encoder and predictor are frozen: every frame is encoded once.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .data.dataset import split_episodes
from .errors import UserError
from .evals.common import load_model
from .evals.planning import qualifying_rows
from .plan.idm import IDMHead, save_idm
from .train_heads import add_training_args, check_args, embed_rows, fit_head


def _pairs(info, episodes, offset: int, limit: int, rng) -> np.ndarray:
    rows = qualifying_rows(info.ep_len, info.ep_offset, np.asarray(episodes), offset)
    if len(rows) > limit:
        rows = np.sort(rng.choice(rows, limit, replace=False))
    return rows


def _targets(model, actions: np.ndarray, starts: np.ndarray, H: int, fs: int) -> torch.Tensor:
    A = actions.shape[1]
    idx = starts[:, None] + np.arange(H * fs)[None, :]  # (N, H*fs)
    raw = torch.from_numpy(actions[idx].astype(np.float32)).to(model.action_mean.device)  # (N, H*fs, A)
    return model.normalize_actions(raw).reshape(len(starts), H, fs * A).float()


def fit_idm(checkpoint, data, *, horizon: int | None = None, steps: int = 3000, batch_size: int = 256,
            lr: float = 1e-3, hidden: int = 256, depth: int = 2, max_pairs: int = 50_000, seed: int = 0,
            device: str = "auto", progress: bool = True, save: bool = True) -> dict:
    """Train the head; returns {"head", "train_mse", "heldout_mse", "pairs", ...} and writes
    idm.safetensors + idm.json into the checkpoint folder when `save` (and `checkpoint` is a path)."""
    from .data.format import inspect, open_h5
    check_args(lr, steps=steps, batch_size=batch_size, hidden=hidden, depth=depth, max_pairs=max_pairs)
    t0 = time.perf_counter()
    model, ckpt = load_model(checkpoint, device)
    m = model.mcfg
    H = int(horizon or model.cfg.plan.horizon)
    fs = int(m.frameskip)
    info = inspect(data)
    if info.action_dim != m.action_dim:
        raise UserError(f"{info.path}: column 'action' has {info.action_dim} dims, the model {m.action_dim}")
    train_eps, held_eps = split_episodes(info.num_episodes, model.cfg.train.val_frac, model.cfg.train.seed)
    rng = np.random.default_rng(seed)
    tr_rows = _pairs(info, train_eps, H * fs, max_pairs, rng)
    ho_rows = _pairs(info, held_eps, H * fs, max(1, max_pairs // 10), rng) if len(held_eps) else np.zeros(0, int)
    if len(tr_rows) < batch_size:
        raise UserError(f"{info.path}: only {len(tr_rows)} start rows of the training episodes have {H * fs} more "
                        f"rows in their episode (horizon {H} x frameskip {fs}); fewer than --batch-size {batch_size}")
    with open_h5(info.path) as f:
        actions = np.asarray(f["action"][()], np.float32)

    def embed(rows):
        return embed_rows(model, info.path, rows, rows + H * fs, progress=progress)

    zs, zg = embed(tr_rows)
    y = _targets(model, actions, tr_rows, H, fs)
    torch.manual_seed(seed)
    head = IDMHead(m.embed_dim, H, m.action_input_dim, hidden, depth).to(zs.device)
    fit_head(head, lambda b: torch.nn.functional.mse_loss(head(zs[b], zg[b]), y[b]), len(tr_rows), steps=steps,
             batch_size=batch_size, lr=lr, seed=seed, progress=progress, desc="idm")

    def mse(rows, z0, z1):
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(head(z0, z1), _targets(model, actions, rows, H, fs)))
    out = {"train_mse": mse(tr_rows, zs, zg), "pairs": int(len(tr_rows)), "heldout_pairs": int(len(ho_rows)),
           "horizon": H, "steps": steps, "checkpoint": ckpt, "data": str(info.path)}
    out["heldout_mse"] = mse(ho_rows, *embed(ho_rows)) if len(ho_rows) else None
    out["zero_mse"] = float(y.pow(2).mean())  # what predicting the mean action (0) scores
    out["time_s"] = time.perf_counter() - t0
    if save and ckpt is not None:
        out["saved"] = str(save_idm(head, ckpt, extra={k: out[k] for k in ("train_mse", "heldout_mse", "zero_mse",
                                                                          "pairs", "steps", "data")}))
    out["head"] = head
    return out


def add_parser(sub) -> None:
    p = sub.add_parser("idm", help="train the inverse-dynamics head on frozen embeddings (planner idm, --init idm)",
                       description="Train the inverse-dynamics head (start and goal embeddings -> the horizon's "
                                   "macro actions) on the checkpoint's training episodes, encoder and predictor "
                                   "frozen; saved as idm.safetensors + idm.json beside the checkpoint.")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or training run folder (its latest)")
    p.add_argument("--data", required=True, help="the HDF5 episodes the checkpoint was trained on")
    p.add_argument("--horizon", type=int, help="macro steps predicted (the checkpoint's plan horizon, 5)")
    p.add_argument("--max-pairs", type=int, default=50_000, help="training pairs drawn at most (50000)")
    add_training_args(p)
    p.set_defaults(func=main)


def main(args) -> int:
    r = fit_idm(args.checkpoint, args.data, horizon=args.horizon, steps=args.steps, batch_size=args.batch_size,
                lr=args.lr, hidden=args.hidden, depth=args.depth, max_pairs=args.max_pairs, seed=args.seed,
                device=args.device, progress=not args.no_progress)
    ho = f"{r['heldout_mse']:.4f}" if r["heldout_mse"] is not None else "n/a"
    print(f"lewm idm: {r['pairs']} pairs, horizon {r['horizon']}: MSE train {r['train_mse']:.4f}, held-out {ho} "
          f"(predicting 0: {r['zero_mse']:.4f}); {r['time_s']:.0f} s -> {r.get('saved')}")
    return 0
