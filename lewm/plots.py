"""Pictures people would rather look at than read: figures (PNG) and videos (GIF, MP4), written
atomically (lewm/atomic.py). matplotlib runs headless (Agg); MP4 needs the `video` extra.

    plt = pyplot(); fig, ax = plt.subplots(); ...; save_figure(fig, "out/probe.png")
    write_video(frames, "out/episode_000.gif", fps=10)      # frames (T, H, W, 3) uint8
    plot_curves("runs/x/metrics.jsonl", "runs/x/curves.png")
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .errors import require


def pyplot():
    """matplotlib.pyplot on the headless Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi: int = 100) -> Path:
    import matplotlib.pyplot as plt
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def write_video(frames, path, fps: int = 10, what: str | None = None) -> Path:
    """A GIF (pillow) or MP4 (H.264 through imageio-ffmpeg, the `video` extra) of (T, H, W, 3) uint8
    frames, by the suffix of `path`. `what` names the flag in the message when MP4 is not installed."""
    import imageio.v2 as iio2
    import imageio.v3 as iio3
    path = Path(path)
    frames = np.ascontiguousarray(np.stack(list(frames)))
    suffix = path.suffix.lower()
    if suffix == ".mp4":
        require("imageio_ffmpeg", "video", f"{what or path}: writing MP4 (or use .gif)")
        if frames.shape[1] % 2 or frames.shape[2] % 2:  # H.264 in yuv420p needs even sizes
            frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)))
    elif suffix != ".gif":
        raise ValueError(f"{path}: a video must end in .gif or .mp4")
    with atomic_path(path, fsync=False) as tmp:
        if suffix == ".gif":
            iio3.imwrite(tmp, frames, duration=1000.0 / fps, loop=0)  # pillow: ms per frame
        else:
            w = iio2.get_writer(tmp, fps=fps, codec="libx264", macro_block_size=1, quality=8, format="FFMPEG")
            with w:
                for fr in frames:
                    w.append_data(fr)
    return path


def plot_curves(metrics: Path, png: Path) -> Path | None:
    """A PNG of loss, prediction loss (train and held-out), SIGReg and effective rank over steps,
    from a training run's metrics.jsonl."""
    recs = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    tr = [r for r in recs if "loss" in r]
    va = [r for r in recs if "val_pred_loss" in r]
    if not tr:
        return None
    plt = pyplot()
    s = [r["step"] for r in tr]
    fig, ax = plt.subplots(1, 4, figsize=(16, 3.5))
    ax[0].plot(s, [r["loss"] for r in tr]); ax[0].set_title("loss")
    ax[1].plot(s, [r["pred_loss"] for r in tr], label="train")
    if va:
        ax[1].plot([r["step"] for r in va], [r["val_pred_loss"] for r in va], "o-", label="held-out")
    ax[1].set_title("prediction loss"); ax[1].set_yscale("log"); ax[1].legend()
    ax[2].plot(s, [r["sigreg"] for r in tr]); ax[2].set_title("SIGReg"); ax[2].set_yscale("log")
    ax[3].plot(s, [r["eff_rank"] for r in tr]); ax[3].set_title("effective rank of z")
    for a in ax:
        a.set_xlabel("step")
    fig.tight_layout()
    return save_figure(fig, png, dpi=90)
