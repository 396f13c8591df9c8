"""Evaluations of a trained model beyond planning: probes (`lewm probe`) and surprise (`lewm surprise`).

    from lewm.evals import run_probe, run_surprise
    res = run_probe("runs/pusht", "data/pusht.h5", out="evals/probe")        # lewm/evals/probe.py
    res = run_surprise("runs/tworoom", "data/tworoom.h5", out="evals/voe")   # lewm/evals/surprise.py

Both read a checkpoint (a checkpoint folder, a file inside one, or a training run folder: its
latest checkpoint) and an HDF5 data set, and evaluate on the episodes training held out
(`split_episodes(E, cfg.train.val_frac, cfg.train.seed)` with the checkpoint's config). This module
holds the few helpers they share; the subcommands' parsers live in their modules.
"""
from __future__ import annotations


import numpy as np

from ..errors import UserError

__all__ = ["run_probe", "run_surprise"]


def __getattr__(name):  # the entry points are imported lazily (they pull in torch, scipy, matplotlib)
    if name == "run_probe":
        from .probe import run_probe
        return run_probe
    if name == "run_surprise":
        from .surprise import run_surprise
        return run_surprise
    raise AttributeError(f"module 'lewm.evals' has no attribute '{name}'")



# -- checkpoints and devices: the same rules as `lewm eval` ----------------------------------------------
from ..plan.mpc import _norm_name as _norm  # noqa: E402


def load_model(model, device: str = "auto"):
    """(LeWM in eval mode on `device`, checkpoint path or None). `model` is a LeWM or a path (any form
    `lewm.checkpoint.resolve` takes)."""
    import torch

    from ..checkpoint import load_model as _load, resolve
    from ..config import resolve_device
    dev = resolve_device(device)
    if isinstance(model, torch.nn.Module):
        return model.to(dev).eval(), None
    ckpt = resolve(model)
    return _load(ckpt, dev), str(ckpt)


# -- data --------------------------------------------------------------------------------------------
def data_env_name(info, env: str | None) -> str | None:
    """The environment of a data set: --env if given (it must agree with the file's `env`
    attribute when there is one), else the attribute, else None."""
    attr = info.attrs.get("env")
    attr = str(attr) if attr not in (None, "") else None
    if env is None:
        return attr
    if attr is not None and _norm(attr) != _norm(env) and ":" not in attr:
        raise UserError(f"--env {env}: the data set {info.path} was collected in '{attr}' (its 'env' attribute)")
    return env


def heldout_split(info, cfg, split: str = "heldout") -> tuple[np.ndarray, np.ndarray]:
    """(train episodes, evaluation episodes) as training split them. split='all' evaluates on all."""
    from ..data.dataset import split_episodes
    train, held = split_episodes(info.num_episodes, cfg.train.val_frac, cfg.train.seed)
    if split == "all":
        return train, np.arange(info.num_episodes)
    if split != "heldout":
        raise UserError(f"--split must be heldout or all, got {split!r}")
    if len(held) == 0:
        raise UserError(f"{info.path}: no held-out episodes ({info.num_episodes} episodes, "
                          f"train.val_frac {cfg.train.val_frac} in the checkpoint's config); "
                          "collect more episodes or pass --split all")
    return train, held


def episode_rows(info, episodes) -> np.ndarray:
    """All row indices of `episodes`, in increasing order."""
    eps = np.asarray(episodes, dtype=np.int64)
    if eps.size == 0:
        return np.zeros(0, np.int64)
    return np.sort(np.concatenate([info.ep_offset[e] + np.arange(info.ep_len[e]) for e in eps]))


def read_pixels(path, rows: np.ndarray, block_rows: int | None = None):
    """Yield (positions into `rows`, pixels (n, H, W, 3) uint8) for increasing `rows`, reading the
    pixel column a block of whole chunks at a time (a fancy index on a compressed column decodes
    every chunk it touches once per request; whole blocks decode each once)."""
    from ..data.format import open_h5
    rows = np.asarray(rows, dtype=np.int64)
    with open_h5(path) as f:
        d = f["pixels"]
        H, W = d.shape[1:3]
        step = block_rows or max(100, ((64 << 20) // (H * W * 3)) // 100 * 100)
        i = 0
        while i < len(rows):
            lo = rows[i] // step * step
            j = int(np.searchsorted(rows, lo + step, side="left"))
            sel = rows[i:j]
            if j - i > 0.25 * step:  # dense: read the whole block once
                block = d[lo:min(lo + step, d.shape[0])]
                yield np.arange(i, j), block[sel - lo]
            else:
                yield np.arange(i, j), d[sel]
            i = j


def encode_rows(model, path, rows: np.ndarray, batch_size: int = 256, progress: bool = False,
                desc: str = "encode") -> np.ndarray:
    """(len(rows), D) float32 frozen embeddings (model in eval mode, no grad) of the frames at
    `rows` (increasing) of data set `path`."""
    import torch
    out = np.empty((len(rows), model.mcfg.embed_dim), np.float32)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(rows), desc=desc, unit="frame", leave=False)
    model.eval()
    with torch.no_grad():
        for pos, px in read_pixels(path, rows):
            for k in range(0, len(pos), batch_size):
                z = model.encode(torch.from_numpy(np.ascontiguousarray(px[k:k + batch_size])))
                out[pos[k:k + batch_size]] = z.float().cpu().numpy()
                if bar is not None:
                    bar.update(len(pos[k:k + batch_size]))
    if bar is not None:
        bar.close()
    return out
