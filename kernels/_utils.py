"""What the kernel modules share: interpreter detection, tile-size helpers, and the one launch point.

Every Triton kernel of this package is launched through `launch(...)`. That single place lets a
caller record the launches of a real code path without running them:

    with record_launches() as rec:          # execute=False: nothing runs, meta tensors are fine
        planner.plan(start, goal, noise)    # the planner's own code path
    for r in rec: r.name, r.grid, r.meta, r.cost

which is how `profiles/kernels_sm90.py` compiles exactly the specialisations a plan launches, and
how `bench/gpu_model.py` costs them. While recording, `gpu_tiles()` is True, so wrappers choose the
tile sizes they would choose on a GPU even where the interpreter is active.

A wrapper may attach `cost=` to a launch: a dict with "flops" (multiply-adds x 2), "hbm_bytes"
(unique bytes the launch must move to or from memory), "l2_bytes" (all SM <- L2 traffic, re-reads
included) and, for a persistent kernel, "phases": a list of dicts: name, items, split (items per
row block), flops and l2_bytes PER ITEM, reduce_bytes PER ROW BLOCK (read by the last item of the
row block after the others, so it adds to the critical path), and serial (the number of dependent
item latencies this phase adds to the critical path of a row block).
The cost model reads only these keys.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field

import triton


def interpreted(kernel=None) -> bool:
    """True when kernels are built by the Triton interpreter (TRITON_INTERPRET=1 set before the
    kernel modules were imported); then they run on CPU tensors. With `kernel`, asks that kernel."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    if kernel is not None:
        return isinstance(kernel, InterpretedFunction)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def p2(n: int, lo: int = 16, hi: int = 1 << 30) -> int:
    """next power of two of n, clamped to [lo, hi] (tile sizes: tl.dot dims are powers of two >= 16)."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


@dataclass
class LaunchRecord:
    kernel: object  # the JITFunction (or InterpretedFunction) as the wrapper launched it
    grid: tuple
    args: tuple  # positional runtime arguments, as passed
    meta: dict  # constexpr keyword arguments + num_warps / num_stages
    tag: str = ""
    cost: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", str(fn))

    @property
    def ctas(self) -> int:
        n = 1
        for g in self.grid:
            n *= int(g)
        return n


class _State(threading.local):
    def __init__(self):
        self.records: list | None = None
        self.execute = True


_STATE = _State()


@contextlib.contextmanager
def record_launches(execute: bool = False):
    """Record every launch made through `launch` in this thread; with execute=False the kernels are
    not run (so a code path can be walked on meta tensors, or on CPU tensors without the
    interpreter). Yields the list the records are appended to."""
    prev = (_STATE.records, _STATE.execute)
    _STATE.records, _STATE.execute = [], execute
    try:
        yield _STATE.records
    finally:
        _STATE.records, _STATE.execute = prev


def recording() -> bool:
    """True inside record_launches(execute=False): wrappers then skip device checks and execution."""
    return _STATE.records is not None and not _STATE.execute


def gpu_tiles() -> bool:
    """Whether wrappers should pick GPU tile sizes: always outside the interpreter, and while
    recording (the records describe a GPU launch)."""
    return _STATE.records is not None or not interpreted()


def launch(kernel, grid, *args, tag: str = "", cost: dict | None = None, **meta) -> None:
    """kernel[grid](*args, **meta), through the recorder when one is active."""
    grid = tuple(int(g) for g in grid)
    if _STATE.records is not None:
        _STATE.records.append(LaunchRecord(kernel, grid, args, dict(meta), tag, dict(cost or {})))
        if not _STATE.execute:
            return
    kernel[grid](*args, **meta)
