"""`lewm show FILE.h5 --episode K [--out FILE.gif|.mp4] [--fps 10]`: a video of one episode.

Writes a GIF (imageio, Pillow) or an MP4 (imageio-ffmpeg, H.264) of the episode's frames, upscaled
by an integer factor to at least 256 px (nearest neighbour) and with the step index drawn in the
top-left corner (`--no-overlay` leaves it out). Default output: FILE_epK.gif next to FILE.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..errors import UserError
from .format import DataError, inspect, open_h5

# 3x5 bitmap digits, one string of 15 bits (rows top to bottom) per digit
_DIGITS = ["111101101101111", "010110010010111", "111001111100111", "111001111001111", "101101111001001",
           "111100111001111", "111100111101111", "111001001001001", "111101111101111", "111101111001111"]
_GLYPHS = np.array([[int(b) for b in d] for d in _DIGITS], bool).reshape(10, 5, 3)


def draw_number(img: np.ndarray, n: int, scale: int = 2) -> np.ndarray:
    """Draw `n` in white on a black box in the top-left corner of (H, W, 3) uint8 `img` (in place)."""
    digits = [int(c) for c in str(int(n))]
    h, w = 5 * scale, (4 * len(digits) - 1) * scale
    box = np.zeros((h + 2 * scale, w + 2 * scale), bool)
    for i, d in enumerate(digits):
        g = np.kron(_GLYPHS[d], np.ones((scale, scale), bool))
        x = scale + 4 * i * scale
        box[scale:scale + h, x:x + 3 * scale] = g
    H, W = min(box.shape[0], img.shape[0]), min(box.shape[1], img.shape[1])
    img[:H, :W] = np.where(box[:H, :W, None], 255, 0).astype(np.uint8)
    return img


def episode_frames(path, episode: int) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of episode `episode` of an HDF5 data set."""
    info = inspect(path)
    if isinstance(episode, bool) or not isinstance(episode, (int, np.integer)):
        raise UserError(f"--episode must be an integer, got {episode!r}")
    if not 0 <= episode < info.num_episodes:
        raise UserError(f"--episode {episode} is out of range: {info.path} has {info.num_episodes} episodes "
                        f"(0..{info.num_episodes - 1})")
    off, n = int(info.ep_offset[episode]), int(info.ep_len[episode])
    with open_h5(path) as f:
        return np.asarray(f["pixels"][off:off + n])


def show(path, episode: int = 0, out=None, fps: float = 10.0, overlay: bool = True,
         min_size: int = 256) -> Path:
    """Write episode `episode` of data set `path` as a GIF or MP4 (by `out`'s suffix); returns `out`."""
    path = Path(path)
    out = Path(out) if out is not None else path.with_name(f"{path.stem}_ep{episode}.gif")
    suffix = out.suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise UserError(f"--out {out}: must end in .gif or .mp4")
    if not out.parent.exists():
        raise UserError(f"--out {out}: directory '{out.parent}' does not exist")
    if not (fps > 0):
        raise UserError(f"--fps must be positive, got {fps!r}")
    frames = episode_frames(path, episode)
    k = max(1, -(-int(min_size) // frames.shape[1]))
    if k > 1:
        frames = frames.repeat(k, axis=1).repeat(k, axis=2)
    frames = np.ascontiguousarray(frames)
    if overlay:
        scale = max(1, frames.shape[1] // 100)
        for t in range(len(frames)):
            draw_number(frames[t], t, scale)
    from ..plots import write_video
    return write_video(frames, out, fps=fps, what=f"--out {out}")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("show", help="write a GIF/MP4 of one episode of a data set",
                       description="Write a GIF or MP4 of one episode of an HDF5 data set.")
    p.add_argument("file", help="HDF5 data set (lewm collect writes one)")
    p.add_argument("--episode", type=int, default=0, help="episode index (0)")
    p.add_argument("--out", help="output .gif or .mp4 (default: FILE_epK.gif next to FILE)")
    p.add_argument("--fps", type=float, default=10.0, help="frames per second (10)")
    p.add_argument("--no-overlay", action="store_true", help="do not draw the step index")
    p.set_defaults(func=_run)
    return p


def _run(args) -> int:
    out = show(args.file, args.episode, args.out, fps=args.fps, overlay=not args.no_overlay)
    print(f"wrote {out}")
    return 0


__all__ = ["show", "episode_frames", "draw_number", "DataError"]
