"""Shared by trace_plan.py and trace_train.py: profiler setup, named ranges, and the summary printed
from a trace (ops per run, time per range, top ops).

Counting. On the CPU every aten op is a "launch": `dispatched` counts the ops called from Python (aten
events with no aten parent), `leaf` the ops that do the work (no compute-op children, views and
allocations not counted; a linear is one dispatched op and one leaf addmm): the CPU's "kernels".
On CUDA, `kernels` counts the kernels that ran on the device and
`host launches` the launch calls the host made (cudaLaunchKernel / cuLaunchKernel / cudaGraphLaunch): a
replayed CUDA graph is one host launch for all its kernels.
"""
from __future__ import annotations

import contextlib
import functools
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import benchutil as bu  # noqa: E402,F401  (re-exported for the scripts)

# traces are large (MBs): by default under runs/ (gitignored), not in profiles/
TRACES = Path(__file__).resolve().parent.parent / "runs" / "traces"
# ops that only make views, metadata or allocations: not counted as "compute" launches on the CPU
NON_COMPUTE = {"aten::view", "aten::as_strided", "aten::transpose", "aten::reshape", "aten::select", "aten::slice",
               "aten::t", "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::empty", "aten::empty_strided",
               "aten::resolve_conj", "aten::resolve_neg", "aten::permute", "aten::split", "aten::unbind",
               "aten::chunk", "aten::detach", "aten::alias", "aten::_unsafe_view", "aten::lift_fresh",
               "aten::empty_like", "aten::narrow", "aten::split_with_sizes", "aten::_reshape_alias",
               "aten::contiguous", "aten::set_", "aten::unflatten", "aten::flatten", "aten::result_type",
               "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense", "aten::detach_"}
LAUNCH_APIS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def activities(device: torch.device):
    acts = [ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(ProfilerActivity.CUDA)
    return acts


def ranged(name: str, fn):
    """fn wrapped in a profiler range (and an NVTX range on CUDA, for Nsight Systems)."""
    @functools.wraps(fn)
    def wrapper(*a, **k):
        with record_function(name), nvtx(name):
            return fn(*a, **k)
    return wrapper


def nvtx(name: str):
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range(name)
    return contextlib.nullcontext()


def profiler(device: torch.device):
    return profile(activities=activities(device), record_shapes=False, with_stack=False)


def _is_cuda(e) -> bool:
    return getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA


def _dev_self(e) -> float:
    for a in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(e, a):
            return float(getattr(e, a))
    return 0.0


def summarize(prof, ranges: list[str], root: str, top: int = 12) -> dict:
    """Counts and times from a finished profiler, restricted to the events under the range `root`
    (one plan or one step). Returns a dict and prints nothing."""
    events = list(prof.events())
    roots = [e for e in events if e.name == root and not _is_cuda(e)]
    if not roots:
        raise RuntimeError(f"no '{root}' range in the trace")
    r = roots[-1]

    def under(e, anc):
        p = e.cpu_parent
        while p is not None:
            if p is anc:
                return True
            p = p.cpu_parent
        return False

    cpu_ev = [e for e in events if not _is_cuda(e) and under(e, r)]
    is_aten = lambda e: e.name.startswith("aten::")  # noqa: E731
    dispatched = [e for e in cpu_ev if is_aten(e) and not (e.cpu_parent is not None and is_aten(e.cpu_parent))]
    leaf = [e for e in cpu_ev if is_aten(e) and e.name not in NON_COMPUTE
            and not any(is_aten(c) and c.name not in NON_COMPUTE for c in e.cpu_children)]
    launches = [e for e in cpu_ev if e.name in LAUNCH_APIS]
    # device kernels: those whose launching CPU event lies under the root
    kernels = []
    for e in cpu_ev:
        kernels.extend(getattr(e, "kernels", []) or [])
    dev_events = [e for e in events if _is_cuda(e)]

    def range_of(e):
        p = e
        while p is not None and p is not r:
            if p.name in ranges:
                return p.name
            p = p.cpu_parent
        return "(other)"

    per_range = defaultdict(lambda: {"cpu_ms": 0.0, "dispatched": 0, "device_ms": 0.0})
    for name in ranges:
        evs = [e for e in cpu_ev if e.name == name]
        # inclusive CPU time of the outermost occurrences of the range
        per_range[name]["cpu_ms"] = sum(e.cpu_time_total for e in evs if range_of(e.cpu_parent) != name) / 1e3 \
            if evs else 0.0
        per_range[name]["calls"] = len(evs)
    for e in dispatched:
        per_range[range_of(e)]["dispatched"] += 1
    for e in cpu_ev:
        d = _dev_self(e)
        if d:
            per_range[range_of(e)]["device_ms"] += d / 1e3

    by_op = defaultdict(lambda: {"count": 0, "self_cpu_ms": 0.0, "device_ms": 0.0})
    for e in cpu_ev:
        if e.name in ranges or e.name == root:
            continue
        o = by_op[e.name]
        o["count"] += 1
        o["self_cpu_ms"] += e.self_cpu_time_total / 1e3
        o["device_ms"] += _dev_self(e) / 1e3
    kern = defaultdict(lambda: {"count": 0, "device_ms": 0.0})
    for e in dev_events:
        k = kern[e.name]
        k["count"] += 1
        k["device_ms"] += float(getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0))) / 1e3
    return {"wall_cpu_ms": r.cpu_time_total / 1e3, "dispatched": len(dispatched), "leaf": len(leaf),
            "host_launches": len(launches), "kernels": len(kernels) or len(dev_events),
            "per_range": dict(per_range),
            "top_ops": sorted(by_op.items(), key=lambda kv: -kv[1]["self_cpu_ms"])[:top],
            "top_kernels": sorted(kern.items(), key=lambda kv: -kv[1]["device_ms"])[:top]}


def print_summary(title: str, s: dict, ranges: list[str], device: torch.device) -> None:
    gpu = device.type == "cuda"
    print(f"\n== {title}")
    line = (f"ops per run: {s['dispatched']} aten ops dispatched from Python, {s['leaf']} compute (leaf) ops"
            + (f"; {s['kernels']} GPU kernels, {s['host_launches']} host launch calls" if gpu else "")
            + f"; {s['wall_cpu_ms']:.1f} ms under the profiler")
    print(line)
    rows = []
    for name in ranges + ["(other)"]:
        pr = s["per_range"].get(name)
        if not pr:
            continue
        rows.append([name, pr.get("calls", "-"), pr["dispatched"], f"{pr['cpu_ms']:.1f}" if name != "(other)" else "-"]
                    + ([f"{pr['device_ms']:.2f}"] if gpu else []))
    print(bu.fmt_table(rows, ["range", "calls", "aten ops", "cpu ms (incl.)"] + (["gpu ms"] if gpu else [])))
    print("top ops by self CPU time:")
    print(bu.fmt_table([[n, o["count"], f"{o['self_cpu_ms']:.2f}"] + ([f"{o['device_ms']:.2f}"] if gpu else [])
                        for n, o in s["top_ops"]], ["op", "count", "self cpu ms"] + (["gpu ms"] if gpu else [])))
    if gpu and s["top_kernels"]:
        print("top GPU kernels:")
        print(bu.fmt_table([[n[:80], k["count"], f"{k['device_ms']:.3f}"] for n, k in s["top_kernels"]],
                           ["kernel", "count", "gpu ms"]))


def export(prof, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    return path
