"""Clips for training: 4 frames every 5 raw steps, with the 5 raw actions of each step concatenated.

A clip starting at raw row s of an episode covers rows s .. s + T*fs - 1 (T frames, frameskip fs):
frames are rows s, s+fs, ..., actions are all T*fs rows reshaped to (T, fs*A). Every raw start
0 .. len - T*fs of every episode is a clip (as the reference). Actions are z-scored per dimension with
the mean/std of all non-NaN rows of the file *before* the concatenation; NaN actions become 0.

Pixels stay uint8 until they reach the device (`LeWM.encode` / `Encoder.preprocess` normalise there).
With `cache="ram"` the pixel column is decoded once (and resized once to the model's image size, if
it differs), so a batch is one fancy-indexing gather; with `cache="none"` clips are read from HDF5
(use DataLoader workers, see `make_loader`).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from .format import DataError, DatasetInfo, block_rows, inspect, open_h5


def _read(path, column: str, fn, where: str = ""):
    """Run an HDF5 read; a failure (a corrupt chunk, a missing compression filter) becomes one
    DataError naming the file, the column and the rows."""
    try:
        return fn()
    except OSError as e:
        raise DataError(f"{path}: column '{column}'{' ' + where if where else ''} unreadable (corrupt chunk, or "
                        f"its compression filter is missing: pip install hdf5plugin): {e}") from None


def split_episodes(num_episodes: int, val_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of episode indices into (train, held-out). Training and evaluation use the
    same function, so evaluation's held-out episodes were never trained on."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(num_episodes)
    n_val = int(round(num_episodes * val_frac)) if num_episodes > 1 else 0
    n_val = min(n_val, num_episodes - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def action_stats(actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std over the non-NaN rows."""
    ok = ~np.isnan(actions).any(axis=1)
    if not ok.any():
        raise DataError("column 'action' has no non-NaN rows")
    a = actions[ok].astype(np.float64)
    return a.mean(0).astype(np.float32), np.maximum(a.std(0), 1e-6).astype(np.float32)


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def resize_frames(px: np.ndarray, size: int, chunk: int = 1024) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, size, size, 3) uint8 (bilinear, antialiased), in chunks."""
    import torch.nn.functional as F
    if px.shape[1:3] == (size, size):
        return px
    out = np.empty((px.shape[0], size, size, 3), np.uint8)
    for i in range(0, px.shape[0], chunk):
        x = torch.from_numpy(np.ascontiguousarray(px[i:i + chunk])).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i:i + chunk] = x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


class ClipDataset(torch.utils.data.Dataset):
    """Clips of `num_frames` frames with frameskip `frameskip` from the episodes `episodes` of `path`.

    dataset[i] -> (pixels (T, H, W, 3) uint8 tensor, actions (T, fs*A) float32 tensor)
    dataset.batch(idx) -> the same, stacked, with one vectorised gather when pixels are cached."""

    def __init__(self, path: str | os.PathLike, num_frames: int = 4, frameskip: int = 5,
                 episodes: np.ndarray | None = None, cache: str = "auto", image_size: int | None = None,
                 action_dim: int | None = None, progress: bool = False):
        self.path = Path(path)
        self.info: DatasetInfo = inspect(self.path)
        self.T, self.fs = int(num_frames), int(frameskip)
        A = self.info.action_dim
        if action_dim is not None and action_dim != A:
            raise DataError(f"{self.path}: column 'action' has {A} dims but the model expects "
                            f"model.action_dim = {action_dim}")
        self.A = A
        with open_h5(self.path) as f:
            raw = _read(self.path, "action", lambda: np.asarray(f["action"][()], dtype=np.float32))
        self.action_mean, self.action_std = action_stats(raw)
        act = (raw - self.action_mean) / self.action_std
        self.actions = np.nan_to_num(act, nan=0.0).astype(np.float32)  # (N, A) z-scored

        eps = np.arange(self.info.num_episodes) if episodes is None else np.asarray(episodes, dtype=np.int64)
        span = self.T * self.fs
        starts = []
        for e in eps:
            n = int(self.info.ep_len[e]) - span + 1
            if n > 0:
                starts.append(int(self.info.ep_offset[e]) + np.arange(n))
        if not starts:
            longest = int(self.info.ep_len[eps].max()) if len(eps) else 0
            raise DataError(f"{self.path}: every episode is shorter than a clip ({span} rows = "
                            f"{self.T} frames x frameskip {self.fs}; longest episode has {longest} rows) "
                            "in column 'ep_len'")
        self.starts = np.concatenate(starts).astype(np.int64)
        self.episodes = eps
        self.frame_offsets = np.arange(self.T) * self.fs  # (T,)
        self.image_size = image_size

        nbytes = self.info.num_rows * int(np.prod(self.info.image_shape))
        if image_size is not None:
            nbytes = self.info.num_rows * image_size * image_size * 3
        if cache == "auto":
            cache = "ram" if nbytes < 0.4 * _available_memory() else "none"
        if cache not in ("ram", "none"):
            raise ValueError(f"unknown train.cache '{cache}' (expected ram, none or auto)")
        self.cache = cache
        self.pixels = None
        self._h5 = None
        if cache == "ram":
            self.pixels = self._load_pixels(progress)

    def _load_pixels(self, progress: bool) -> np.ndarray:
        with open_h5(self.path) as f:
            d = f["pixels"]
            n = d.shape[0]
            size = self.image_size
            H, W = d.shape[1:3]
            out_hw = (size, size) if size else (H, W)
            out = np.empty((n, *out_hw, 3), np.uint8)
            step = block_rows((H, W, 3))  # ~64 MB, whole chunks
            it = range(0, n, step)
            if progress:
                from tqdm import tqdm
                it = tqdm(it, desc=f"loading {self.path.name}", unit="chunk", leave=False)
            for i in it:
                block = _read(self.path, "pixels", lambda: d[i:i + step], f"rows {i}-{min(i + step, n) - 1}")
                out[i:i + step] = resize_frames(block, size) if size and (H, W) != (size, size) else block
        return out

    def __len__(self) -> int:
        return len(self.starts)

    def _rows(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = self.starts[idx]  # (B,)
        frame_rows = s[:, None] + self.frame_offsets  # (B, T)
        act_rows = s[:, None] + np.arange(self.T * self.fs)  # (B, T*fs)
        return frame_rows, act_rows

    def batch(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        frame_rows, act_rows = self._rows(idx)
        B = len(idx)
        act = self.actions[act_rows].reshape(B, self.T, self.fs * self.A)
        if self.pixels is not None:
            px = self.pixels[frame_rows]  # (B, T, H, W, 3)
        else:
            px = np.stack([self._read_frames(r) for r in frame_rows])
        return torch.from_numpy(px), torch.from_numpy(act)

    def _read_frames(self, rows: np.ndarray) -> np.ndarray:
        if self._h5 is None:  # opened lazily: one handle per DataLoader worker
            self._h5 = open_h5(self.path)
        px = _read(self.path, "pixels", lambda: self._h5["pixels"][rows], f"rows {rows.tolist()}")  # increasing rows
        if self.image_size and px.shape[1:3] != (self.image_size, self.image_size):
            px = resize_frames(px, self.image_size)
        return px

    def __getitem__(self, i: int):
        px, act = self.batch([i])
        return px[0], act[0]

    def __getstate__(self):  # DataLoader workers: never pickle an open HDF5 handle
        d = dict(self.__dict__)
        d["_h5"] = None
        return d


def steps_per_epoch(n_clips: int, batch_size: int, world: int = 1) -> int:
    return n_clips // (batch_size * world)


def epoch_order(n_clips: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of clips in `epoch`: a pure function of (seed, epoch), so a resumed run
    sees exactly the batches the uninterrupted run would have."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n_clips)


class BatchSampler:
    """Yields index batches for steps `start_step` onwards (drop_last, shuffled per epoch).

    Under DDP each rank takes its own `batch_size` slice of a global batch of batch_size*world."""

    def __init__(self, n_clips: int, batch_size: int, seed: int, start_step: int = 0, total_steps: int | None = None,
                 rank: int = 0, world: int = 1):
        self.n, self.bs, self.seed = n_clips, batch_size, seed
        self.rank, self.world = rank, world
        self.spe = steps_per_epoch(n_clips, batch_size, world)
        if self.spe == 0:
            raise DataError(f"only {n_clips} clips: fewer than one batch of {batch_size * world} "
                            "(lower --batch-size or collect more episodes)")
        self.start, self.total = start_step, total_steps

    def __iter__(self):
        step = self.start
        while self.total is None or step < self.total:
            epoch, k = divmod(step, self.spe)
            order = epoch_order(self.n, self.seed, epoch)
            g = order[k * self.bs * self.world:(k + 1) * self.bs * self.world]
            yield g[self.rank * self.bs:(self.rank + 1) * self.bs]
            step += 1

    def __len__(self):
        return (self.total - self.start) if self.total is not None else math.inf


def make_loader(ds: ClipDataset, sampler: BatchSampler, workers: int = 0):
    """An iterator of (pixels uint8, actions float) batches. With cached pixels the gather is
    cheap and runs in-process; otherwise HDF5 reads and decompression go to `workers` processes."""
    if ds.pixels is not None or workers <= 0:
        return (ds.batch(idx) for idx in sampler)
    return iter(torch.utils.data.DataLoader(
        _BatchView(ds), batch_size=None, sampler=sampler, num_workers=workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=False, prefetch_factor=4))


class _BatchView(torch.utils.data.Dataset):
    def __init__(self, ds: ClipDataset):
        self.ds = ds

    def __getitem__(self, idx):
        return self.ds.batch(idx)

    def __len__(self):
        return len(self.ds)
