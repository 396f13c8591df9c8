"""What the evaluations (planning, probe, surprise) share: which environment a data set belongs to, which
episodes are evaluated, loading the model, reading and encoding frames.

One split vocabulary: "heldout" (the episodes training held out: `split_episodes(E, cfg.train.val_frac,
cfg.train.seed)` with the checkpoint's config) or "all" (every episode of the file, the reference's
protocol; "train" is accepted as its old name). One env-name rule: `env_matches`.
"""
from __future__ import annotations

import numpy as np

from ..errors import UserError

SPLITS = ("heldout", "all")
SPLIT_ALIASES = {"train": "all"}  # the name `lewm eval` used for "all" before


def check_split(split: str) -> str:
    """The split's canonical name ("heldout" or "all"); UserError naming --split otherwise."""
    s = SPLIT_ALIASES.get(split, split)
    if s not in SPLITS:
        raise UserError(f"--split must be heldout or all, got {split!r}")
    return s


def norm_name(s: str) -> str:
    return "".join(c for c in str(s).lower() if c.isalnum())


def env_matches(env: str, attr: str | None) -> bool:
    """Does a data set whose `env` attribute is `attr` belong to environment `env`? Names compare
    without case and punctuation, and the attribute may carry more ("swm/TwoRoom-v1" is tworoom); an
    attribute naming a 'package.module:Factory' (a user's env) is not checked; no attribute: yes."""
    if attr in (None, ""):
        return True
    attr = str(attr)
    if ":" in attr or ":" in str(env):
        return True
    return norm_name(env) in norm_name(attr)


# -- checkpoints and devices ----------------------------------------------------------------------------


def load_model(model, device: str = "auto"):
    """(LeWM in eval mode on `device`, checkpoint path or None). `model` is a LeWM or a path (any form
    `lewm.checkpoint.resolve` takes)."""
    import torch

    from ..checkpoint import resolve
    from ..config import resolve_device
    from ..model import LeWM
    dev = resolve_device(device)
    if isinstance(model, torch.nn.Module):
        return model.to(dev).eval(), None
    ckpt = resolve(model)
    return LeWM.load(ckpt, map_location=dev), str(ckpt)


# -- data --------------------------------------------------------------------------------------------
def data_env_name(info, env: str | None) -> str | None:
    """The environment of a data set: --env if given (it must agree with the file's `env`
    attribute when there is one), else the attribute, else None."""
    attr = info.attrs.get("env")
    attr = str(attr) if attr not in (None, "") else None
    if env is None:
        return attr
    if attr is not None and not env_matches(env, attr):
        raise UserError(f"--env {env}: the data set {info.path} was collected in '{attr}' (its 'env' attribute)")
    return env


def heldout_split(info, cfg, split: str = "heldout") -> tuple[np.ndarray, np.ndarray]:
    """(train episodes, evaluation episodes) as training split them. split='all' evaluates on all."""
    from ..data.dataset import split_episodes
    split = check_split(split)
    train, held = split_episodes(info.num_episodes, cfg.train.val_frac, cfg.train.seed)
    if split == "all":
        return train, np.arange(info.num_episodes)
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
    from ..data.format import block_rows as _block_rows, open_h5
    rows = np.asarray(rows, dtype=np.int64)
    with open_h5(path) as f:
        d = f["pixels"]
        H, W = d.shape[1:3]
        step = block_rows or _block_rows((H, W, 3))
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


def frames_at(path, rows, image_shape) -> np.ndarray:
    """(len(rows), *image_shape) uint8 pixels of `rows` in the order given (any order, repeats allowed),
    read through `read_pixels` in increasing row order."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), *image_shape), np.uint8)
    for pos, block in read_pixels(path, rows[order]):
        out[order[pos]] = block
    return out


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


def add_split_seed_device_args(p, split_help: str, seed_help: str) -> None:
    """The last flags of `lewm probe` and `lewm surprise`: --split, --seed, --device, --no-progress."""
    p.add_argument("--split", default="heldout", choices=list(SPLITS), help=split_help)
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true")
