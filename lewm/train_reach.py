"""`lewm reach --checkpoint RUN --data FILE`: train the horizon-matched reachability head (lewm/plan/reach.py)
on frozen embeddings, and save it beside the checkpoint.

    lewm reach --checkpoint runs/tworoom --data data/tworoom.h5
    lewm eval tworoom --checkpoint runs/tworoom --data data/tworoom.h5 --cost reach      # or --cost mix

Pairs from the checkpoint's *training* episodes (held-out episodes are only scored): an anchor row a and
b = a + k * frameskip rows with k uniform in [0, 2 * max_steps] macro steps, label min(k, max_steps) /
max_steps, max_steps = 2 x the planning horizon (horizon-matched); a quarter of the pairs take b from
another episode, label 1. Binary cross-entropy on the soft labels, AdamW; encoder and predictor frozen.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .data.dataset import split_episodes
from .errors import UserError
from .evals.common import load_model
from .plan.reach import ReachHead, save_reach
from .train_heads import add_training_args, check_args, embed_rows, fit_head


def _draw_pairs(info, episodes, fs: int, max_steps: int, n: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(anchor rows, other rows, labels) for `n` pairs of `episodes`."""
    eps = np.asarray(episodes)
    e = eps[rng.integers(0, len(eps), n)]
    off, ln = info.ep_offset[e].astype(np.int64), info.ep_len[e].astype(np.int64)
    a = off + rng.integers(0, ln)
    k = rng.integers(0, 2 * max_steps + 1, n)
    b = np.minimum(a + k * fs, off + ln - 1)  # past the episode's end: its last row
    steps = (b - a) // fs
    label = np.minimum(steps, max_steps) / max_steps
    neg = rng.random(n) < 0.25
    if len(eps) > 1:
        e2 = eps[rng.integers(0, len(eps), n)]
        neg &= e2 != e
        b = np.where(neg, info.ep_offset[e2] + rng.integers(0, info.ep_len[e2]), b)
        label = np.where(neg, 1.0, label)
    return a, b, label.astype(np.float32)


def fit_reach(checkpoint, data, *, max_steps: int | None = None, pairs: int = 50_000, steps: int = 3000,
              batch_size: int = 256, lr: float = 1e-3, hidden: int = 256, depth: int = 2, seed: int = 0,
              device: str = "auto", progress: bool = True, save: bool = True) -> dict:
    """Train the head; returns {"head", "train_bce", "heldout_mae", "heldout_order_acc", ...} and writes
    reach.safetensors + reach.json into the checkpoint folder when `save` (and `checkpoint` is a path)."""
    from .data.format import inspect
    check_args(lr, steps=steps, batch_size=batch_size, hidden=hidden, depth=depth, pairs=pairs)
    t0 = time.perf_counter()
    model, ckpt = load_model(checkpoint, device)
    fs = int(model.mcfg.frameskip)
    K = int(max_steps or 2 * model.cfg.plan.horizon)
    if K <= 0:
        raise UserError(f"--max-steps must be positive, got {K}")
    info = inspect(data)
    train_eps, held_eps = split_episodes(info.num_episodes, model.cfg.train.val_frac, model.cfg.train.seed)
    rng = np.random.default_rng(seed)
    a, b, y = _draw_pairs(info, train_eps, fs, K, pairs, rng)
    dev = model.action_mean.device

    def embed(*row_sets):
        return embed_rows(model, info.path, *row_sets, progress=progress)

    za, zb = embed(a, b)
    yt = torch.from_numpy(y).to(dev)
    torch.manual_seed(seed)
    head = ReachHead(model.mcfg.embed_dim, K, hidden, depth).to(dev)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    fit_head(head, lambda i: bce(head.logits(za[i], zb[i]), yt[i]), len(y), steps=steps, batch_size=batch_size,
             lr=lr, seed=seed, progress=progress, desc="reach")
    with torch.no_grad():
        out = {"train_bce": float(torch.nn.functional.binary_cross_entropy_with_logits(head.logits(za, zb), yt)),
               "pairs": int(len(y)), "max_steps": K, "steps": steps, "checkpoint": ckpt, "data": str(info.path)}
        out.update(_heldout_scores(head, info, held_eps, fs, K, max(1000, pairs // 10), rng, embed))
    out["time_s"] = time.perf_counter() - t0
    if save and ckpt is not None:
        out["saved"] = str(save_reach(head, ckpt, extra={k: out[k] for k in (
            "train_bce", "heldout_mae", "heldout_mae_constant", "heldout_order_acc", "pairs", "steps", "data")}))
    out["head"] = head
    return out


def _heldout_scores(head, info, held_eps, fs, K, n, rng, embed) -> dict:
    """On the held-out episodes: mean absolute error against the labels (and that of the best constant),
    and how often r(a, a + k1) < r(a, a + k2) for k1 < k2 <= max_steps in the same episode."""
    if len(held_eps) == 0:
        return {"heldout_mae": None, "heldout_mae_constant": None, "heldout_order_acc": None}
    a, b, y = _draw_pairs(info, held_eps, fs, K, n, rng)
    e = np.searchsorted(info.ep_offset, a, side="right") - 1
    end = info.ep_offset[e] + info.ep_len[e] - 1
    k1, k2 = rng.integers(0, K, n), rng.integers(1, K + 1, n)
    k1, k2 = np.minimum(k1, k2 - 1), k2
    b1, b2 = a + k1 * fs, a + k2 * fs
    ok = b2 <= end
    za, zb, z1, z2 = embed(a, b, b1[ok] if ok.any() else a[:1], b2[ok] if ok.any() else a[:1])
    r = head(za, zb).cpu().numpy()
    za_ok = za[torch.from_numpy(np.flatnonzero(ok))] if ok.any() else za[:1]
    order = float((head(za_ok, z1) < head(za_ok, z2)).float().mean()) if ok.any() else None
    return {"heldout_mae": float(np.abs(r - y).mean()), "heldout_mae_constant": float(np.abs(np.median(y) - y).mean()),
            "heldout_order_acc": order}


def add_parser(sub) -> None:
    p = sub.add_parser("reach", help="train the reachability head on frozen embeddings (--cost reach | mix)",
                       description="Train the horizon-matched reachability head (how far one embedding lies ahead "
                                   "of another, up to 2 x the planning horizon) on the checkpoint's training episodes, "
                                   "encoder and predictor frozen; saved as reach.safetensors + reach.json beside "
                                   "the checkpoint.")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or training run folder (its latest)")
    p.add_argument("--data", required=True, help="the HDF5 episodes the checkpoint was trained on")
    p.add_argument("--max-steps", type=int, help="the separation that counts as unreachable, in macro steps "
                                                 "(2 x the plan horizon: 10)")
    p.add_argument("--pairs", type=int, default=50_000, help="training pairs drawn (50000)")
    add_training_args(p)
    p.set_defaults(func=main)


def main(args) -> int:
    r = fit_reach(args.checkpoint, args.data, max_steps=args.max_steps, pairs=args.pairs, steps=args.steps,
                  batch_size=args.batch_size, lr=args.lr, hidden=args.hidden, depth=args.depth, seed=args.seed,
                  device=args.device, progress=not args.no_progress)
    f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"lewm reach: {r['pairs']} pairs, max {r['max_steps']} macro steps: held-out MAE {f(r['heldout_mae'])} "
          f"(a constant: {f(r['heldout_mae_constant'])}), ordering {f(r['heldout_order_acc'])}; {r['time_s']:.0f} s "
          f"-> {r.get('saved')}")
    return 0
