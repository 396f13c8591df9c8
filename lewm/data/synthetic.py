"""A synthetic data set for tests and smoke runs: a blob that moves by its actions on a plain canvas.

The blob moves by `speed * action` each step and stops at the borders, so the next frame is a
function of the frame and the action: exactly what the predictor must learn. Written in the same
HDF5 layout as collected data (`lewm.data.format`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .format import H5Writer, episode_actions_with_nan_tail


def blob_frames(pos: np.ndarray, size: int, radius: float = 0.12) -> np.ndarray:
    """(L, 2) positions in [0, 1]^2 -> (L, size, size, 3) uint8 frames of a red Gaussian blob."""
    yy, xx = np.meshgrid((np.arange(size) + 0.5) / size, (np.arange(size) + 0.5) / size, indexing="ij")
    d2 = (xx[None] - pos[:, 0, None, None]) ** 2 + (yy[None] - pos[:, 1, None, None]) ** 2
    a = np.exp(-d2 / (2 * (radius / 2) ** 2))  # (L, S, S)
    img = np.empty((len(pos), size, size, 3), np.float32)
    img[..., 0] = 255.0
    img[..., 1] = 255.0 * (1 - a)
    img[..., 2] = 255.0 * (1 - a)
    return img.round().astype(np.uint8)


def synthetic_episode(rng: np.random.Generator, length: int, size: int, speed: float = 0.05) -> dict:
    pos = np.empty((length, 2), np.float32)
    act = rng.uniform(-1, 1, size=(length - 1, 2)).astype(np.float32)
    pos[0] = rng.uniform(0.15, 0.85, size=2)
    for t in range(length - 1):
        pos[t + 1] = np.clip(pos[t] + speed * act[t], 0.1, 0.9)
    return {"pixels": blob_frames(pos, size), "action": episode_actions_with_nan_tail(act),
            "state": pos.copy(), "proprio": pos.copy(),
            "step_idx": np.arange(length, dtype=np.int64)}


def write_synthetic(path: str | Path, episodes: int = 8, length: int = 40, image_size: int = 32,
                    seed: int = 0, overwrite: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    with H5Writer(path, attrs={"env": "synthetic-blob", "seed": seed, "image_size": image_size},
                  overwrite=overwrite) as w:
        for e in range(episodes):
            ep = synthetic_episode(rng, length, image_size)
            ep["ep_idx"] = np.full(length, e, np.int64)
            w.add_episode(ep)
    return Path(path)
