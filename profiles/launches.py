"""The launch list of one plan (or one SIGReg training step), taken from the code path itself.

Shared by profiles/kernels_sm90.py (compile every specialisation for sm_90) and bench/gpu_model.py
(an analytic GPU cost model). Nothing here is a hand-kept copy of what the planner does: the planner
runs, and what it launches is recorded.

* Triton launches: every kernel of `lewm_kernels` is launched through `lewm_kernels._utils.launch`;
  inside `record_launches(execute=False)` each launch is recorded (kernel, grid, args, constexpr
  meta, tag, cost dict) and not run, so the plan walks its real code path on CPU tensors.
* aten ops: a TorchDispatchMode records every aten op the same plan dispatches (the encoder, the CEM
  sampling / top-k / refit, the tensor bookkeeping between kernels), with FLOPs from
  torch.utils.flop_counter's formulas and bytes = inputs + outputs.
* `fake=True` runs the plan under FakeTensorMode: shapes, strides and dtypes only, no arithmetic, so
  the eager reference at the paper's CEM (or 50 environments) is recorded in seconds.

Iterations: every CEM iteration launches the same specialisations with the same grids (static
shapes), so the launch list of a plan is affine in the iteration count. `extrapolate` records two
iteration counts and scales the per-iteration part up to the count asked for; `check_affine` verifies
that on a third.

Legacy kernels. A kernel module whose launches do not yet go through `_utils.launch` (the rollout and
SIGReg modules before their rewrites) is recorded through `legacy_shim()`: its JITFunctions are
wrapped so that `kernel[grid](...)` goes through `launch`, with a cost dict estimated from the
launch's arguments (`_LEGACY_COSTS`, marked "estimated": true). Once a module launches through
`_utils.launch` itself, the shim leaves it alone.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "bench") not in sys.path:
    sys.path.insert(0, str(REPO / "bench"))

PAPER_CEM = dict(samples=300, elites=30, iterations=30, horizon=5)
KERNEL_MODULES = ("lewm_kernels.rollout", "lewm_kernels.sigreg")


# ----------------------------------------------------------------------------------------------------
# aten ops
# ----------------------------------------------------------------------------------------------------

# ops that launch no device kernel (metadata only, or allocation); views are detected by schema
_NO_KERNEL = {"empty", "empty_strided", "empty_like", "detach", "alias", "lift_fresh", "_to_copy_noop",
              "set_", "resize_", "result_type", "is_same_size", "_local_scalar_dense_noop",
              "_has_compatible_shallow_copy_type", "size", "stride", "sym_size", "sym_stride", "dim"}


def _nbytes(t) -> int:
    if not isinstance(t, torch.Tensor):
        return 0
    n = t.numel() * t.element_size()
    try:
        n = min(n, t.untyped_storage().nbytes())
    except Exception:  # pragma: no cover - storage-less tensors
        pass
    return int(n)


def _flat_tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _flat_tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _flat_tensors(y)


@dataclass
class OpRecord:
    name: str  # aten op overload name, e.g. "aten.addmm.default"
    kernel: bool  # False: a view / allocation / metadata op (no device kernel)
    flops: int
    bytes: int  # inputs + outputs (for a kernel op)
    dtype: str  # dtype of the first floating input ("" if none)


class AtenRecorder(TorchDispatchMode):
    """Records every aten op dispatched inside it (see OpRecord)."""

    def __init__(self):
        super().__init__()
        self.ops: list[OpRecord] = []
        from torch.utils.flop_counter import flop_registry
        self._flops = flop_registry

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func)
        base = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else name
        is_view = bool(getattr(func, "is_view", False))
        kernel = not (is_view or name.startswith("prim.") or base.rstrip("_") in _NO_KERNEL or base in _NO_KERNEL)
        flops = 0
        fn = self._flops.get(getattr(func, "overloadpacket", None))
        if fn is not None:
            try:
                flops = int(fn(*args, **kwargs, out_val=out))
            except Exception:  # pragma: no cover - a formula that does not fit these args
                flops = 0
        ins = list(_flat_tensors((args, kwargs)))
        outs = list(_flat_tensors(out))
        nbytes = sum(_nbytes(t) for t in ins) + sum(_nbytes(t) for t in outs) if kernel else 0
        dt = next((str(t.dtype).replace("torch.", "") for t in ins if t.is_floating_point()), "")
        self.ops.append(OpRecord(name, kernel, flops, nbytes, dt))
        return out


# ----------------------------------------------------------------------------------------------------
# Legacy kernels: launches that do not go through _utils.launch yet
# ----------------------------------------------------------------------------------------------------


def _esize(t) -> int:
    return t.element_size() if isinstance(t, torch.Tensor) else 4


def _cost_matmul(grid, a, meta):
    # _matmul_kernel(a, s_a0, s_a1, w, s_wk, b, out, s_o0, s_o1, gate, s_g0, s_g1, goal, cost,
    #                M, TN, K, NOUT, ROWS_PER_GOAL, ...)
    x, w, out = a[0], a[3], a[6]
    M, K, N = int(a[14]), int(a[16]), int(a[17])
    bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
    gm, gn = grid[0], grid[1] if len(grid) > 1 else 1
    epi = int(meta.get("EPI", 0))
    out_rw = 2 if epi == 1 else 1  # the residual epilogue reads x and writes it
    hbm = M * K * _esize(x) + K * N * _esize(w) + out_rw * M * N * _esize(out)
    l2 = gn * gm * bm * K * _esize(x) + gm * gn * K * bn * _esize(w) + (gm * bm * N * 4 if epi == 1 else 0)
    return {"flops": 2 * M * K * N, "hbm_bytes": hbm, "l2_bytes": l2 + out_rw * M * N * _esize(out)}


def _cost_norm_matmul(grid, a, meta):
    # _norm_matmul_kernel(x, s_x0, s_x1, embed, x_out, s_xo0, s_xo1, mod, s_m0, s_m1, lnw, lnb, w, s_wk,
    #                     b, out, s_o0, s_o1, M, TN, D, NOUT, eps_mod, eps_ln, ...)
    x, w, out = a[0], a[12], a[15]
    M, D, N = int(a[18]), int(a[20]), int(a[21])
    bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
    gm, gn = grid[0], grid[1] if len(grid) > 1 else 1
    rows = M * D * _esize(x) * (3 if meta.get("MODULATE") else 1)  # x + shift + scale per row
    hbm = rows + D * N * _esize(w) + M * N * _esize(out)
    l2 = gn * rows * (gm * bm) / max(M, 1) + gm * gn * D * bn * _esize(w) + M * N * _esize(out)
    return {"flops": 2 * M * D * N + gn * M * D * 16, "hbm_bytes": hbm, "l2_bytes": int(l2)}


def _cost_attn_out(grid, a, meta):
    # _attn_out_kernel(qkv, s_q0, s_q1, out_w, s_ow, out_b, gate, s_g0, s_g1, x, s_x0, s_x1,
    #                  M, TQ, Q0, D, INNER, HEADS, DH, scale, ...)
    qkv, w, x = a[0], a[3], a[9]
    M, D, inner = int(a[12]), int(a[15]), int(a[16])
    T = int(meta.get("T_KEYS", 1))
    bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
    gm, gn = grid[0], grid[1] if len(grid) > 1 else 1
    kv = M * T * 3 * inner * _esize(qkv)
    hbm = kv + inner * D * _esize(w) + 3 * M * D * 4
    l2 = gn * kv + gm * gn * inner * bn * _esize(w) + 3 * M * D * 4
    return {"flops": 2 * M * inner * D + 4 * M * T * inner, "hbm_bytes": hbm, "l2_bytes": l2}


def _cost_sigreg_fwd(grid, a, meta):
    # _ecf_sums_fwd_kernel(Z, A, KNOTS, COS, SIN, B, D, M, K, ...); grid (T * cdiv(M, BLOCK_M),)
    z, A = a[0], a[1]
    B, D, M, K = (int(v) for v in a[5:9])
    T = z.shape[0] if isinstance(z, torch.Tensor) else 1
    gm = grid[0]
    hbm = T * B * D * _esize(z) + D * M * _esize(A) + 2 * T * M * K * 4
    l2 = gm * B * D * _esize(z) + T * D * M * _esize(A) + 2 * T * M * K * 4
    # projection + per (t, b, m, k) one cos and one sin (counted as 2 x 8 flops of SFU-assisted maths)
    return {"flops": 2 * T * B * D * M + 16 * T * B * M * K, "hbm_bytes": hbm, "l2_bytes": l2}


def _cost_sigreg_bwd(grid, a, meta):
    # _ecf_sums_bwd_kernel(Z, A, KNOTS, GC, GS, DH, B, D, M, K, ...)
    z, A = a[0], a[1]
    B, D, M, K = (int(v) for v in a[6:10])
    T = z.shape[0] if isinstance(z, torch.Tensor) else 1
    hbm = T * B * D * _esize(z) + D * M * _esize(A) + 2 * T * M * K * 4 + T * B * M * 4
    bb, bmm = meta.get("BLOCK_B", 32), meta.get("BLOCK_M", 64)
    ctas = grid[0]
    l2 = ctas * (bb * D * _esize(z) + D * bmm * _esize(A) + 2 * bmm * K * 4) + T * B * M * 4
    return {"flops": 2 * T * B * D * M + 20 * T * B * M * K, "hbm_bytes": hbm, "l2_bytes": l2}


_LEGACY_COSTS = {"_matmul_kernel": _cost_matmul, "_norm_matmul_kernel": _cost_norm_matmul,
                 "_attn_out_kernel": _cost_attn_out, "_ecf_sums_fwd_kernel": _cost_sigreg_fwd,
                 "_ecf_sums_bwd_kernel": _cost_sigreg_bwd}


def module_uses_launch(mod) -> bool:
    """True when the module launches its kernels through lewm_kernels._utils.launch."""
    try:
        src = inspect.getsource(mod)
    except (OSError, TypeError):  # pragma: no cover
        return True
    return "launch(" in src and "_utils" in src


class _LegacyKernel:
    """Stands in for a JITFunction: kernel[grid](*args, **meta) goes through _utils.launch."""

    def __init__(self, real, name):
        self.real, self.name = real, name

    def __getitem__(self, grid):
        from lewm_kernels import _utils

        def run(*args, **meta):
            g = tuple(int(v) for v in (grid(meta) if callable(grid) else grid))
            fn = _LEGACY_COSTS.get(self.name)
            cost = dict(fn(g, args, meta), estimated=True) if fn else {}
            _utils.launch(self.real, g, *args, tag=f"legacy:{self.name}", cost=cost, **meta)
        return run

    def __getattr__(self, item):
        return getattr(self.real, item)


@contextlib.contextmanager
def legacy_shim():
    """Route the direct `kernel[grid](...)` launches of not-yet-converted kernel modules through
    `_utils.launch` (see the module docstring), and let the rollout's wrapper accept CPU tensors
    while recording. A no-op for modules that already launch through `_utils.launch`."""
    import triton
    kinds = [triton.runtime.jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        kinds.append(InterpretedFunction)
    except ImportError:  # pragma: no cover
        pass
    patches = []  # (obj, attr, old)
    try:
        for name in KERNEL_MODULES:
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
            if module_uses_launch(mod):
                continue
            for attr, val in list(vars(mod).items()):
                if isinstance(val, tuple(kinds)) and attr in _LEGACY_COSTS:
                    patches.append((mod, attr, val))
                    setattr(mod, attr, _LegacyKernel(val, attr))
            if name.endswith("rollout") and hasattr(mod, "_check_inputs"):
                old = mod._check_inputs

                def check(w, z0, actions, goal, need_kernel_device, _old=old):
                    return _old(w, z0, actions, goal, False)
                patches.append((mod, "_check_inputs", old))
                mod._check_inputs = check
            if name.endswith("sigreg") and hasattr(mod, "_validate"):
                old = mod._validate

                def validate(z, directions, t, _old=old):
                    if z.device.type in ("cpu", "meta"):
                        return None
                    return _old(z, directions, t)
                patches.append((mod, "_validate", old))
                mod._validate = validate
        yield [f"{m.__name__}.{a}" for m, a, _ in patches]
    finally:
        for obj, attr, old in reversed(patches):
            setattr(obj, attr, old)


def legacy_modules() -> list[str]:
    """Kernel modules that do not launch through _utils.launch yet."""
    out = []
    for name in KERNEL_MODULES:
        try:
            if not module_uses_launch(importlib.import_module(name)):
                out.append(name)
        except ImportError:
            pass
    return out


# ----------------------------------------------------------------------------------------------------
# Recording a plan / a SIGReg step
# ----------------------------------------------------------------------------------------------------


@dataclass
class Recording:
    what: str  # "plan" | "sigreg"
    config: dict
    launches: list = field(default_factory=list)  # lewm_kernels._utils.LaunchRecord
    ops: list = field(default_factory=list)  # OpRecord
    notes: list = field(default_factory=list)

    @property
    def kernel_ops(self) -> list:
        return [o for o in self.ops if o.kernel]


def build_model(preset: str = "pusht", seed: int = 0):
    """A LeWM of the preset's size with random weights, on the CPU, in eval mode."""
    import lewm
    torch.manual_seed(seed)
    return lewm.LeWM(lewm.preset(preset)).eval()


def make_planner(model, kind: str, samples: int, elites: int, iterations: int, horizon: int,
                 dtype=torch.float32):
    """kind: "fast" (FastPlanner, Triton backend), "reference" (CEMPlanner, encode once) or
    "reference_reencode" (CEMPlanner re-encoding start and goal every iteration)."""
    from lewm.plan.cem import CEMPlanner
    kw = dict(samples=samples, elites=elites, iterations=iterations, horizon=horizon)
    if kind == "fast":
        import warnings

        from lewm.plan.engine import FastPlanner
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "triton needs CUDA": forced below
            p = FastPlanner.from_config(model, backend="triton", dtype=dtype, cuda_graph=False, **kw)
        if p.backend != "triton":
            p.backend = "triton"  # the Triton path on CPU tensors: its launches are recorded, not run
        return p
    if kind in ("reference", "reference_reencode"):
        return CEMPlanner.from_config(model, reencode=kind == "reference_reencode", **kw)
    raise ValueError(f"unknown planner kind {kind!r}")


@contextlib.contextmanager
def _maybe_fake(fake: bool):
    if not fake:
        yield
        return
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        yield


def record_plan(model, kind: str = "fast", envs: int = 1, dtype=torch.float32, *, samples: int = 300,
                elites: int = 30, iterations: int = 30, horizon: int = 5, fake: bool = True,
                aten: bool = True, planner=None) -> Recording:
    """One plan of `envs` environments, recorded: Triton launches (not run) and aten ops."""
    from lewm_kernels._utils import record_launches
    p = planner or make_planner(model, kind, samples, elites, iterations, horizon, dtype)
    S_px = model.cfg.model.image_size
    gen = torch.Generator().manual_seed(0)
    start = torch.randint(0, 256, (envs, S_px, S_px, 3), dtype=torch.uint8, generator=gen)
    goal = torch.randint(0, 256, (envs, S_px, S_px, 3), dtype=torch.uint8, generator=gen)
    noise = torch.randn(p.noise_shape(envs), generator=gen)
    rec = Recording("plan", dict(kind=kind, envs=envs, dtype=str(dtype).replace("torch.", ""),
                                 samples=p.samples, elites=p.elites, iterations=p.iterations,
                                 horizon=p.horizon, preset=getattr(model.cfg, "name", "")))
    shim = legacy_shim() if kind == "fast" else contextlib.nullcontext([])
    with shim as patched, record_launches(execute=False) as launches, torch.no_grad():
        if patched:
            rec.notes.append("legacy shim: " + ", ".join(patched))
        recorder = AtenRecorder() if aten else None
        with _maybe_fake(fake):
            with (recorder if recorder is not None else contextlib.nullcontext()):
                p.plan(start, goal, noise)
    rec.launches = list(launches)
    rec.ops = recorder.ops if recorder is not None else []
    return rec


def record_sigreg_step(T: int = 4, B: int = 128, D: int = 192, M: int = 1024, K: int = 17,
                       dtype=torch.float32, fake: bool = False) -> Recording:
    """One training step's SIGReg, forward and backward, through the fused kernels' functional API
    (lewm_kernels.sigreg.fused_ecf_sums + statistic_from_sums), recorded."""
    import lewm_kernels.sigreg as ks
    from lewm_kernels._utils import record_launches
    rec = Recording("sigreg", dict(T=T, B=B, D=D, M=M, K=K, dtype=str(dtype).replace("torch.", "")))
    with legacy_shim() as patched, record_launches(execute=False) as launches:
        if patched:
            rec.notes.append("legacy shim: " + ", ".join(patched))
        recorder = AtenRecorder()
        with _maybe_fake(fake), recorder:
            z = torch.randn(T, B, D).to(dtype).requires_grad_()
            a = torch.nn.functional.normalize(torch.randn(D, M), dim=0).to(dtype)
            t, w, phi = ks.knots_and_weights(K)
            cos_s, sin_s = ks.fused_ecf_sums(z, a, t)
            loss = ks.statistic_from_sums(cos_s, sin_s, B, w, phi)
            loss.backward()
    rec.launches = list(launches)
    rec.ops = recorder.ops
    return rec


def count(rec: Recording) -> dict:
    return {"launches": len(rec.launches), "kernel_ops": len(rec.kernel_ops), "ops": len(rec.ops)}


def scale_counts(n1: int, n2: int, i1: int, i2: int, iterations: int) -> float:
    """An affine count (fixed + per-iteration x iterations) from two iteration counts."""
    per = (n2 - n1) / (i2 - i1)
    return n1 + per * (iterations - i1)


def tensor_desc(t) -> str:
    return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"


def ceil_div(a: int, b: int) -> int:
    return -(-int(a) // int(b))


__all__ = ["AtenRecorder", "OpRecord", "Recording", "build_model", "make_planner", "record_plan",
           "record_sigreg_step", "legacy_shim", "legacy_modules", "scale_counts", "PAPER_CEM", "math"]


def append_csv(path, rows, fields):
    """Append dict rows to the CSV at `path` (columns `fields`; the header only if the file is new)."""
    import csv
    from pathlib import Path
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)
    return path
