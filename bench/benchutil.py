"""Shared helpers of the benchmark scripts (bench/*.py, profiles/*.py): what machine and versions a
number was measured with, timing with warm-up and alternation, percentiles, CSV rows, GEMM peaks.

The rules (shared/spec/performance.md, "How to measure"): every speed claim is a ratio against a
reference measured in the same process on the same inputs; warm up first; report the median and the
spread (p10 / p90); check the output against the reference before timing; record a CSV row with the
date, commit, device and versions.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
PROFILES = REPO / "profiles"


# -- what was measured on ------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    """'NVIDIA H100 80GB HBM3' on CUDA; 'AMD EPYC (2 cores, 2 threads)' on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _version(mod: str) -> str:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except Exception:
        return "none"


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
            "timm": _version("timm"), "cuda": torch.version.cuda or "none"}


def git_commit() -> str:
    """Short commit of the repository, with '+dirty' when the working tree has changes."""
    try:
        c = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                           timeout=5).stdout.strip()
        d = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True, timeout=5).stdout.strip()
        return (c or "unknown") + ("+dirty" if d else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def load_warning(device: torch.device | str) -> str:
    """A warning line when CPU timings with several threads will be unreliable: other processes keep
    the cores busy, and every multi-threaded op then waits for a descheduled thread (seen here: the
    same plan 0.3 s with one thread, 0.5-10 s with two at load 4 on two cores)."""
    if torch.device(device).type != "cpu" or torch.get_num_threads() <= 1:
        return ""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return ""
    if load > 0.5:
        return (f"WARNING: load average {load:.2f} with {torch.get_num_threads()} torch threads on "
                f"{os.cpu_count()} cores: other processes compete for the cores and multi-threaded CPU "
                "timings become erratic; use --threads 1 (or LEWM_BENCH_THREADS=1) or a quiet machine")
    return ""


def header(device: torch.device | str) -> str:
    v = versions()
    w = load_warning(device)
    return (w + "\n" if w else "") + (
            f"device: {device_name(device)} | torch {v['torch']} (cuda {v['cuda']}) | triton {v['triton']} | "
            f"timm {v['timm']} | python {v['python']} | commit {git_commit()} | load {load_average()} | "
            f"{_dt.datetime.now().isoformat(timespec='seconds')}")


def pick_device(arg: str | None) -> torch.device:
    """--device: None/'auto' -> cuda when present, else cpu. A GPU asked for without one is a user error."""
    if arg in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(arg)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {arg}: CUDA is not available on this machine (use --device cpu)")
    return d


# -- timing --------------------------------------------------------------------------------------------
def sync_fn(device: torch.device | str) -> Callable[[], None]:
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_round_robin(fns: dict, repeats: int, sync: Callable[[], None], warmup: int = 0) -> dict:
    """{name: fn} -> {name: [seconds] * repeats}. Runs are alternated (a, b, c, a, b, c, ...) so that
    drifting load on a shared machine hits every candidate alike; each run is bracketed by device
    synchronisations (a CUDA plan is timed from launch to completion)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    out = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            out[name].append(time.perf_counter() - t0)
    return out


def stats_ms(ts) -> dict:
    """Seconds -> {median, p10, p90, min, max, n} in milliseconds."""
    a = np.asarray(ts, dtype=np.float64) * 1e3
    return {"median": float(np.median(a)), "p10": float(np.percentile(a, 10)),
            "p90": float(np.percentile(a, 90)), "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def gemm_peak_gflops(device: torch.device | str, dtype=torch.float32, n: int | None = None,
                     repeats: int = 5) -> float:
    """Measured dense GEMM rate (GFLOP/s) of this device in `dtype`: the yardstick for compute floors
    ('FLOPs / this rate' is how fast the arithmetic alone could go here)."""
    device = torch.device(device)
    if n is None:
        n = 8192 if device.type == "cuda" else 1536
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = sync_fn(device)
    a @ b
    sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(ts) / 1e9


def copy_bandwidth_gbs(device: torch.device | str, mbytes: int | None = None, repeats: int = 5) -> float:
    """Measured device memory bandwidth (GB/s, read + write of a large copy): the yardstick for byte floors."""
    device = torch.device(device)
    if mbytes is None:
        mbytes = 1024 if device.type == "cuda" else 256
    x = torch.empty(mbytes * (1 << 20) // 4, device=device, dtype=torch.float32).fill_(1.0)
    y = torch.empty_like(x)
    sync = sync_fn(device)
    y.copy_(x)
    sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        y.copy_(x)
        sync()
        ts.append(time.perf_counter() - t0)
    return 2 * x.numel() * 4 / min(ts) / 1e9


# -- CSV -------------------------------------------------------------------------------------------------
def append_csv(path: str | os.PathLike, rows: list[dict], fields: list[str]) -> Path:
    """Append rows to a CSV with a fixed header. A file whose header differs is kept and the rows go to
    a sibling file named after the new header's hash, so old and new rows never mix columns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size > 0:
        with open(path, newline="") as f:
            old = next(csv.reader(f), [])
        if old != fields:
            import hashlib
            path = path.with_name(f"{path.stem}.{hashlib.sha1(','.join(fields).encode()).hexdigest()[:6]}{path.suffix}")
            print(f"note: {path.name}: the CSV's header changed; writing to {path}", file=sys.stderr)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(r)
    return path


def common_row(device: torch.device | str) -> dict:
    v = versions()
    return {"date": _dt.datetime.now().isoformat(timespec="seconds"), "commit": git_commit(),
            "device": device_name(device), "torch": v["torch"], "triton": v["triton"], "timm": v["timm"],
            "python": v["python"], "load": load_average()}


COMMON_FIELDS = ["date", "commit", "device", "torch", "triton", "timm", "python", "load"]


def fmt_table(rows: list[list], headers: list[str]) -> str:
    cols = [headers] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cols) for i in range(len(headers))]
    line = lambda r: "  ".join(s.rjust(w[i]) if i else s.ljust(w[i]) for i, s in enumerate(r))  # noqa: E731
    return "\n".join([line(headers), line(["-" * x for x in w])] + [line(r) for r in cols[1:]])


def randomize_predictor(model) -> None:
    """The predictor's AdaLN-zero layers start as zeros, which makes every block the identity: give
    them small random weights so a benchmark's rollout does real work and plans are a meaningful
    comparison (the FLOPs are the same either way)."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(1234)
        for b in model.predictor.blocks:
            lin = b.adaLN_modulation[1]
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.02)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.02)


# -- pytest-benchmark helpers ------------------------------------------------------------------------
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def _needs_cuda():
    import pytest
    return pytest.mark.skipif(not CUDA, reason="needs CUDA (Triton kernels / CUDA graphs); on the CPU the fused "
                                               "kernels only run under the slow Triton interpreter")


def check_close(name: str, got: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float) -> None:
    """The output of a timed path must match the reference before it is timed."""
    got, ref = got.detach().float(), ref.detach().float()
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    err = (got - ref).abs().max().item()
    tol = atol + rtol * ref.abs().max().item()
    assert err <= tol, f"{name}: max |diff| {err:.3e} vs reference exceeds {tol:.3e}"


def bench_run(benchmark, fn, sync, rounds: int, warmup: int = 1):
    """Time fn (synchronised at the end on CUDA) with pytest-benchmark: `rounds` rounds of one call
    after `warmup` untimed calls. Returns fn's last result."""
    out = {}

    def call():
        out["r"] = fn()
        sync()

    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=warmup)
    return out["r"]


# -- independent references for the benchmarks' checks -------------------------------------------------
def sigreg_float64(z: torch.Tensor, A: torch.Tensor, knots: int = 17, t_max: float = 3.0) -> float:
    """SIGReg written from the formula in float64 numpy, one knot at a time (the check of the eager
    benchmark, which is itself the library's reference): z (T, B, D), A (D, M)."""
    import math
    z, A = z.detach().double().cpu().numpy(), A.detach().double().cpu().numpy()
    T, B, _ = z.shape
    t = np.linspace(0.0, t_max, knots)
    dt = t_max / (knots - 1)
    total = 0.0
    for tau in range(T):
        h = z[tau] @ A
        ep = np.zeros(A.shape[1])
        for k in range(knots):
            w = (1.0 if k in (0, knots - 1) else 2.0) * dt * math.exp(-t[k] ** 2 / 2)
            ep += w * ((np.cos(t[k] * h).mean(0) - math.exp(-t[k] ** 2 / 2)) ** 2 + np.sin(t[k] * h).mean(0) ** 2)
        total += (B * ep).mean()
    return total / T


@torch.no_grad()
def rollout_by_predict(model, z0: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """The rollout from its definition: at each step run `model.predict` on the whole window of the last
    `history` frames and keep its last output (LeWM.rollout runs predict_last instead)."""
    N, C, _ = z0.shape
    W = model.mcfg.history
    z, preds = z0, []
    for i in range(C - 1, actions.shape[1]):
        lo = max(0, i + 1 - W)
        nxt = model.predict(z[:, lo:i + 1], actions[:, lo:i + 1])[:, -1]
        preds.append(nxt)
        z = torch.cat([z, nxt[:, None]], dim=1)
    return torch.stack(preds, dim=1)


def plain_training_losses(cfg, data, device, batches, steps: int) -> list[float]:
    """The training step from its definition, without the Trainer: the same seeded model, AdamW, the
    schedule, gradient clipping and SIGReg directions, in a plain loop over `batches`. The losses of
    `steps` optimizer steps (the check of every training-step benchmark, over several steps so that a
    wrong optimizer step shows)."""
    import random

    import lewm
    from lewm.data.dataset import ClipDataset, split_episodes
    from lewm.data.format import inspect
    from lewm.train import lr_at
    tc, mc = cfg.train, cfg.model
    train_eps, _ = split_episodes(inspect(data).num_episodes, tc.val_frac, tc.seed)
    ds = ClipDataset(data, tc.num_frames, mc.frameskip, train_eps, cache="none", image_size=mc.image_size,
                     action_dim=mc.action_dim)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed % 2**32)
    random.seed(tc.seed)
    model = lewm.LeWM(cfg)
    model.set_action_stats(ds.action_mean, ds.action_std)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    total = tc.steps if tc.steps > 0 else tc.epochs * (len(ds) // tc.batch_size)
    amp = tc.amp and torch.device(device).type == "cuda"
    losses = []
    for step in range(steps):
        px, act = batches[step]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, tc.lr, tc.warmup_frac)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            out = model.loss(pixels=px.to(device), actions=act.to(device),
                             directions=model.sigreg.directions(step, device))
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad()
        losses.append(float(out["loss"]))
    return losses
