"""SIGReg's fused kernels without a GPU: their sm_90 build, and an analytic H100 cost model.

Two things, both from the kernels' own code path (the launches `lewm_kernels.sigreg` makes through
`lewm_kernels._utils.launch`, recorded on meta tensors), never from a hand-kept list:

1. `--sm90`: compile every kernel specialisation of one SIGReg forward + backward, for each input
   variant (fp32, the bf16-z / fp32-A training case, bf16, fast_trig, fp64), for sm_90 with
   triton.compile(ASTSource(...), GPUTarget("cuda", 90, 32)), and read registers, spill stores /
   loads and stack frame (ptxas -v, the compile's own log), shared memory (the kernel's metadata)
   and the MMA / FMA opcodes in the SASS (cuobjdump --dump-sass, shipped in the triton wheel).
   `--triton-python PY` does the compiling with another interpreter (e.g. a venv with triton 3.6,
   the GPU machines' version, and no torch): the kernels are then loaded from the Triton section of
   kernels/sigreg.py alone (see `load_kernel_source`), and the launch specs travel as JSON.
2. the cost model (default): FLOPs, bytes, CTAs and waves of each fused launch and the eager
   reference's per-op traffic (its materialised (T, B, M, K) tensors), turned into a *modelled* H100
   time under the assumptions in `H100`; prints a table and appends a row to
   profiles/sigreg_model.csv. Modelled, not measured: when a GPU is lent, the measured ratio of
   tests/test_kernel_sigreg.py::test_cuda_target_size_memory_and_speed goes beside it.

    python bench/sigreg_model.py                      # model table + CSV row
    python bench/sigreg_model.py --sm90               # compile report, installed triton
    python bench/sigreg_model.py --sm90 --triton-python /work/venv36/bin/python

This file imports torch only where it records launches, so that `--compile-specs` (the part that
runs under the other triton) needs nothing but triton.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import datetime
import importlib.util
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KERNEL_FILE = REPO / "kernels" / "sigreg.py"
CSV_PATH = REPO / "profiles" / "sigreg_model.csv"
TARGET = (4, 128, 192, 1024, 17)  # (T, B, D, M, K): LeWM's SIGReg call

# name -> (z dtype, directions dtype, fast_trig)
VARIANTS = {
    "fp32": ("float32", "float32", False),
    "bf16z-fp32A": ("bfloat16", "float32", False),
    "bf16": ("bfloat16", "bfloat16", False),
    "fp32-fast_trig": ("float32", "float32", True),
    "fp64": ("float64", "float64", False),
}
# variants whose kernels must not spill (fp64 is the gradcheck path: it must compile, nothing more)
NO_SPILL_VARIANTS = ("fp32", "bf16z-fp32A", "bf16", "fp32-fast_trig")

# Device figures and overheads the model assumes (H100 SXM).
H100 = dict(
    sms=132,
    fp32_tflops=67.0,  # FFMA peak (an FMA counts 2 flops)
    alu_efficiency=0.5,  # of that peak, for the trig loops (reductions, selects, address maths)
    hbm_tbs=3.35,
    hbm_efficiency=0.85,  # what large elementwise kernels reach
    l2_tbs=10.0,
    sgemm_tflops=40.0,  # cuBLAS fp32 (no TF32) at these small shapes
    graph_node_us=1.0,  # gap between dependent kernels inside a CUDA graph
    torch_op_host_us=3.0,  # host cost of one eager PyTorch op (dispatch + launch), not in a graph
    triton_launch_host_us=6.0,  # host cost of one Triton launch from Python
    autograd_fn_host_us=10.0,  # the Python of FusedECFSums.forward + backward, beyond launches
    regs_per_sm=65536,
    threads_per_sm=2048,
    max_ctas_per_sm=32,
    smem_per_sm=228 * 1024,
)


# ----------------------------------------------------------------------------------------------------
# Recording the launches (needs torch and lewm_kernels)
# ----------------------------------------------------------------------------------------------------


def record_step(shape=TARGET, variant="fp32", device="meta"):
    """The launches of one forward + backward of fused_ecf_sums (through the SIGReg statistic), recorded
    without running (meta tensors by default). Returns the list of _utils.LaunchRecord."""
    import torch
    import lewm_kernels.sigreg as ks
    from lewm_kernels import _utils
    T, B, D, M, K = shape
    zdt, adt, fast = VARIANTS[variant]
    zdt, adt = getattr(torch, zdt), getattr(torch, adt)
    cdt = torch.float64 if zdt == torch.float64 else torch.float32
    with _utils.record_launches(execute=False) as rec:
        z = torch.empty(T, B, D, device=device, dtype=zdt).requires_grad_()
        a = torch.empty(D, M, device=device, dtype=adt).requires_grad_()
        t, w, phi = ks.knots_and_weights(K, device=device, dtype=cdt)
        c, s = ks.fused_ecf_sums(z, a, t, fast_trig=fast)
        ks.statistic_from_sums(c, s, B, w, phi).backward()
    return list(rec)


def _arg_names(kernel):
    import inspect
    fn = getattr(kernel, "fn", kernel)
    return list(inspect.signature(fn).parameters)


def _encode(v):
    import triton.language as tl
    if isinstance(v, tl.dtype):
        return {"tl": str(v.name)}
    if isinstance(v, tl.constexpr):
        return _encode(v.value)
    return v


def spec_of(record, variant: str) -> dict:
    """A JSON-able compile spec of one launch: the signature and divisibility attributes as the JIT
    would specialise them (triton's own native_specialize_impl), the constexprs and num_warps."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    names = _arg_names(record.kernel)
    signature, constexprs, divisible = {}, {}, []
    for i, (name, arg) in enumerate(zip(names, record.args)):
        ty, key = native_specialize_impl(BaseBackend, arg, False, True, True)
        if ty == "constexpr":
            signature[name] = "constexpr"
            constexprs[name] = key
        else:
            signature[name] = ty
            if key == "D":
                divisible.append(i)
    meta = dict(record.meta)
    num_warps = int(meta.pop("num_warps", 4))
    num_stages = meta.pop("num_stages", None)
    for name, v in meta.items():
        signature[name] = "constexpr"
        constexprs[name] = _encode(v)
    return dict(kernel=record.name, variant=variant, tag=record.tag, grid=list(record.grid),
                signature=signature, constexprs=constexprs, divisible=divisible,
                num_warps=num_warps, num_stages=num_stages, cost=record.cost)


def step_specs(shape=TARGET, variants=tuple(VARIANTS)) -> list[dict]:
    """Specs of every launch of one step, per variant (duplicates across variants are kept: the
    variant names which input dtypes reach which kernel)."""
    return [spec_of(r, v) for v in variants for r in record_step(shape, v)]


# ----------------------------------------------------------------------------------------------------
# Compiling for sm_90 (triton only: this part also runs under another triton, without torch)
# ----------------------------------------------------------------------------------------------------


def load_kernel_source(path: Path = KERNEL_FILE):
    """The Triton section of kernels/sigreg.py as a module of its own: its imports of math / triton,
    its tl.constexpr globals, the libdevice import and the @triton.jit functions, nothing of torch.
    Written to a temporary file (triton.jit reads the functions' source) and imported."""
    src = path.read_text()
    tree = ast.parse(src)
    keep = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if all(m.split(".")[0] in ("math", "triton", "__future__") for m in mods):
                keep.append(node)
        elif isinstance(node, ast.Try) and "libdevice" in ast.get_source_segment(src, node):
            keep.append(node)
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) \
                and ast.get_source_segment(src, node.value.func) == "tl.constexpr":
            keep.append(node)
        elif isinstance(node, ast.FunctionDef) and any(
                ast.get_source_segment(src, d) in ("triton.jit", "triton.jit()") for d in node.decorator_list):
            keep.append(node)
    text = "\n\n".join(ast.get_source_segment(src, n) if not isinstance(n, ast.FunctionDef)
                       else "\n".join(src.splitlines()[n.decorator_list[0].lineno - 1:n.end_lineno])
                       for n in keep)
    out_dir = Path(tempfile.mkdtemp(prefix="sigreg_kernels_"))
    mod_path = out_dir / "sigreg_kernels_only.py"
    mod_path.write_text(text + "\n")
    spec = importlib.util.spec_from_file_location("sigreg_kernels_only", mod_path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def have_ptxas() -> bool:
    try:
        return os.path.exists(_tool("ptxas")) and os.path.exists(_tool("cuobjdump"))
    except ImportError:
        return False


_MMA_OPS = ("HGMMA", "HMMA", "DMMA", "IMMA")


def _decode(v):
    import triton.language as tl
    if isinstance(v, dict) and "tl" in v:
        return tl.dtype(v["tl"])
    return v


def compile_spec(spec: dict, module) -> dict:
    """Compile one spec for sm_90 and read what the compiler produced. Returns a row: kernel,
    variant, triton version, regs, spill stores / loads, stack frame, shared memory, MMA opcodes,
    counts of FFMA / MUFU / local-memory instructions in the SASS, CTAs at the real grid."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = getattr(module, spec["kernel"])
    constexprs = {k: _decode(v) for k, v in spec["constexprs"].items()}
    attrs = {(i,): [["tt.divisibility", 16]] for i in spec["divisible"]}
    options = {"num_warps": spec["num_warps"]}
    if spec.get("num_stages") is not None:
        options["num_stages"] = spec["num_stages"]
    log = io.StringIO()
    knobs = getattr(triton, "knobs", None)
    old = None
    if knobs is not None:
        old = (knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile)
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn, spec["signature"], constexprs=constexprs, attrs=attrs),
                               target=GPUTarget("cuda", 90, 32), options=options)
    finally:
        if knobs is not None:
            knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = old
    ptxas_log = log.getvalue()
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        if "registers" not in ptxas_log:  # no log captured: run the wheel's ptxas on the PTX
            ptx = os.path.join(d, "k.ptx")
            with open(ptx, "w") as f:
                f.write(k.asm["ptx"])
            r = subprocess.run([_tool("ptxas"), "-v", "--gpu-name=sm_90a", ptx, "-o", ptx + ".o"],
                               capture_output=True, text=True)
            ptxas_log = r.stderr
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", cubin], capture_output=True,
                              text=True).stdout
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, ptxas_log)) else -1  # noqa: E731
    opcodes = re.findall(r"^\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", sass, flags=re.M)
    count = lambda op: sum(1 for o in opcodes if o == op)  # noqa: E731
    mma = sorted({o for o in opcodes if o in _MMA_OPS})
    ctas = 1
    for g in spec["grid"]:
        ctas *= int(g)
    return dict(kernel=spec["kernel"], variant=spec["variant"], triton=triton.__version__,
                regs=num(r"Used (\d+) registers"), spill_stores=num(r"(\d+) bytes spill stores"),
                spill_loads=num(r"(\d+) bytes spill loads"), stack=num(r"(\d+) bytes stack frame"),
                smem=int(k.metadata.shared), num_warps=spec["num_warps"], ctas=ctas,
                grid="x".join(str(g) for g in spec["grid"]), mma="+".join(mma) or "none",
                ffma=count("FFMA"), dfma=count("DFMA"), mufu=count("MUFU"),
                local=count("STL") + count("LDL"), sass_instructions=len(opcodes))


def compile_specs(specs: list[dict]) -> list[dict]:
    """compile_spec for each distinct (kernel, signature, constexprs, num_warps); each row lists the
    variants that launch that specialisation."""
    module = load_kernel_source()
    seen: dict = {}
    for s in specs:
        key = json.dumps([s["kernel"], s["signature"], s["constexprs"], s["divisible"],
                          s["num_warps"], s["grid"]], sort_keys=True)
        if key in seen:
            seen[key]["variant"] += "," + s["variant"]
            continue
        seen[key] = compile_spec(s, module)
    return list(seen.values())


def compile_with(python: str, specs: list[dict], timeout: int = 900) -> list[dict]:
    """compile_specs in another interpreter (another triton), without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_cache_")
    r = subprocess.run([python, str(Path(__file__).resolve()), "--compile-specs", "-"],
                       input=json.dumps(specs), capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{python} --compile-specs failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def occupancy(regs: int, num_warps: int, smem: int, dev=H100) -> int:
    """Resident CTAs per SM from registers (per-warp allocation in units of 256), threads, shared
    memory and the CTA limit."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = dev["regs_per_sm"] // (per_warp * num_warps)
    by_threads = dev["threads_per_sm"] // (32 * num_warps)
    by_smem = dev["smem_per_sm"] // smem if smem else dev["max_ctas_per_sm"]
    return max(0, min(by_regs, by_threads, by_smem, dev["max_ctas_per_sm"]))


def format_rows(rows: list[dict]) -> str:
    cols = ["triton", "kernel", "variant", "grid", "ctas", "num_warps", "regs", "spill_stores",
            "spill_loads", "stack", "smem", "mma", "ffma", "mufu", "local"]
    table = [cols] + [[str(r[c]) for c in cols] for r in rows]
    w = [max(len(r[i]) for r in table) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w[i]) for i, v in enumerate(r)) for r in table)


# ----------------------------------------------------------------------------------------------------
# The cost model (modelled H100 time, fused vs eager)
# ----------------------------------------------------------------------------------------------------


def eager_ops(shape=TARGET, es: int = 4) -> list[dict]:
    """The eager reference's kernels for one forward + backward (ecf_sums_reference + autograd), each
    with its bytes moved and FLOPs; S is one materialised (T, B, M, K) tensor."""
    T, B, D, M, K = shape
    S = T * B * M * K * es
    H = T * B * M * es
    small = T * M * K * es
    gemm = 2 * T * B * M * D
    ops = [
        ("fwd matmul h = z A", gemm, T * B * D * es + D * M * es + H),
        ("fwd x = h * t", 0, H + S),
        ("fwd cos(x)", 0, 2 * S),
        ("fwd sum_b cos", 0, S + small),
        ("fwd sin(x)", 0, 2 * S),
        ("fwd sum_b sin", 0, S + small),
        ("bwd sin(x) (cos')", 0, 2 * S),
        ("bwd neg", 0, 2 * S),
        ("bwd mul g_cos", 0, 2 * S),
        ("bwd cos(x) (sin')", 0, 2 * S),
        ("bwd mul g_sin", 0, 2 * S),
        ("bwd add grads of x", 0, 3 * S),
        ("bwd mul t", 0, 2 * S),
        ("bwd sum_k -> dh", 0, S + H),
        ("bwd matmul dz", gemm, H + D * M * es + T * B * D * es),
        ("bwd matmul dA", gemm, H + T * B * D * es + D * M * es),
    ]
    return [dict(name=n, flops=f, bytes=b) for n, f, b in ops]


def eager_peak_extra_bytes(shape=TARGET, es: int = 4) -> int:
    """Peak memory of the eager path beyond inputs, outputs and gradients (liveness of its
    (T, B, M, K) tensors): the saved angles x, and in the backward sin(x), -sin(x) and the cos
    branch's product alive at once."""
    T, B, D, M, K = shape
    return 4 * T * B * M * K * es + T * B * M * es


def fused_ops(shape=TARGET, variant="fp32", rows: list[dict] | None = None, dev=H100) -> list[dict]:
    """The fused path's kernels (recorded launches, with occupancy from the sm_90 rows when given)
    plus the two cuBLAS matmuls of its backward."""
    T, B, D, M, K = shape
    ops = []
    by_kernel = {r["kernel"]: r for r in rows or [] if variant in r["variant"].split(",")}
    for rec in record_step(shape, variant):
        c = rec.cost
        r = by_kernel.get(rec.name)
        nw = int(rec.meta.get("num_warps", 4))
        per_sm = occupancy(r["regs"], nw, r["smem"], dev) if r else None
        ops.append(dict(name=rec.name, flops=c["flops"], bytes=c["hbm_bytes"], l2=c["l2_bytes"],
                        ctas=rec.ctas, per_sm=per_sm, triton=True))
    H = T * B * M * 4
    gemm = 2 * T * B * M * D
    ops.append(dict(name="bwd matmul dz (cuBLAS)", flops=gemm, bytes=H + D * M * 4 + T * B * D * 4))
    ops.append(dict(name="bwd matmul dA (cuBLAS)", flops=gemm, bytes=H + T * B * D * 4 + D * M * 4))
    return ops


def op_time_us(op: dict, dev=H100) -> float:
    hbm = op["bytes"] / (dev["hbm_tbs"] * 1e12 * dev["hbm_efficiency"]) * 1e6
    if op.get("triton"):
        ctas = op["ctas"]
        # SM-level balance: CTAs are spread over the SMs; the last round may be partial
        rounds = math.ceil(ctas / dev["sms"])
        balance = ctas / (rounds * dev["sms"])
        alu = op["flops"] / (dev["fp32_tflops"] * 1e12 * dev["alu_efficiency"] * balance) * 1e6
        l2 = op["l2"] / (dev["l2_tbs"] * 1e12) * 1e6
        return max(alu, hbm, l2)
    return max(hbm, op["flops"] / (dev["sgemm_tflops"] * 1e12) * 1e6)


def model(shape=TARGET, variant="fp32", rows=None, dev=H100) -> dict:
    """Modelled H100 time of one forward + backward, fused and eager; in a CUDA graph (GPU time plus
    a gap per dependent kernel) and called eagerly (the larger of GPU time and host time)."""
    f_ops, e_ops = fused_ops(shape, variant, rows, dev), eager_ops(shape)
    for o in f_ops + e_ops:
        o["us"] = op_time_us(o, dev)
    n_tr = sum(1 for o in f_ops if o.get("triton"))
    f_gpu = sum(o["us"] for o in f_ops)
    e_gpu = sum(o["us"] for o in e_ops)
    f_graph = f_gpu + len(f_ops) * dev["graph_node_us"]
    e_graph = e_gpu + len(e_ops) * dev["graph_node_us"]
    f_host = n_tr * dev["triton_launch_host_us"] + (len(f_ops) - n_tr + 2) * dev["torch_op_host_us"] \
        + dev["autograd_fn_host_us"]  # + 2: output / dh allocations
    e_host = len(e_ops) * dev["torch_op_host_us"]
    f_eager, e_eager = max(f_gpu, f_host), max(e_gpu, e_host)
    T, B, D, M, K = shape
    nb = math.ceil(B / 32)
    fused_extra = 2 * nb * T * K * M * 4 if nb > 1 else 0
    fused_extra = max(fused_extra, T * B * M * 4)  # the workspace (forward) or dh (backward)
    return dict(shape=shape, variant=variant, fused=f_ops, eager=e_ops, fused_gpu_us=f_gpu,
                eager_gpu_us=e_gpu, fused_graph_us=f_graph, eager_graph_us=e_graph,
                fused_eager_us=f_eager, eager_eager_us=e_eager, fused_host_us=f_host,
                eager_host_us=e_host, ratio_graph=e_graph / f_graph, ratio_eager=e_eager / f_eager,
                fused_extra_bytes=fused_extra, eager_extra_bytes=eager_peak_extra_bytes(shape))


def assumptions(dev=H100) -> str:
    return ("H100 SXM modelled: {sms} SMs, fp32 {fp32_tflops} TFLOP/s x {alu_efficiency} for the trig "
            "loops, HBM {hbm_tbs} TB/s x {hbm_efficiency}, L2 {l2_tbs} TB/s, cuBLAS fp32 {sgemm_tflops} "
            "TFLOP/s, {graph_node_us} us per graph node, eager host {torch_op_host_us} us per torch op, "
            "{triton_launch_host_us} us per Triton launch, {autograd_fn_host_us} us autograd.Function "
            "Python; no L2 reuse between eager ops").format(**dev)


def print_model(m: dict) -> None:
    print(f"SIGReg fwd+bwd {m['shape']} {m['variant']} (modelled H100, not measured)")
    print(f"{'launch':34s} {'GFLOP':>8s} {'MB':>8s} {'CTAs':>6s} {'CTA/SM':>6s} {'waves':>5s} {'us':>7s}")
    for part in ("fused", "eager"):
        for o in m[part]:
            ctas = o.get("ctas")
            per_sm = o.get("per_sm")
            waves = (math.ceil(ctas / (H100["sms"] * per_sm)) if ctas and per_sm else "")
            print(f"{part[0]} {o['name']:32s} {o['flops'] / 1e9:8.3f} {o['bytes'] / 1e6:8.2f} "
                  f"{ctas or '':>6} {per_sm or '':>6} {waves:>5} {o['us']:7.2f}")
    print(f"in a CUDA graph: fused {m['fused_graph_us']:.1f} us, eager {m['eager_graph_us']:.1f} us, "
          f"ratio {m['ratio_graph']:.1f}x")
    print(f"called eagerly:  fused {m['fused_eager_us']:.1f} us (host {m['fused_host_us']:.1f}), eager "
          f"{m['eager_eager_us']:.1f} us (host {m['eager_host_us']:.1f}), ratio {m['ratio_eager']:.1f}x")
    print(f"extra memory: fused {m['fused_extra_bytes'] / 2**20:.2f} MiB, eager "
          f"{m['eager_extra_bytes'] / 2**20:.1f} MiB "
          f"({100 * m['fused_extra_bytes'] / m['eager_extra_bytes']:.1f} %)")
    print("assumptions:", assumptions())


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip()
    except OSError:  # pragma: no cover
        return ""


def append_csv(m: dict, path: Path = CSV_PATH) -> None:
    cols = ["date", "commit", "device", "config", "fused_us", "eager_us", "ratio", "assumptions"]
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    T, B, D, M, K = m["shape"]
    rows = [("graph", m["fused_graph_us"], m["eager_graph_us"], m["ratio_graph"]),
            ("eager-call", m["fused_eager_us"], m["eager_eager_us"], m["ratio_eager"])]
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(cols)
        for mode, fu, eu, ratio in rows:
            w.writerow([datetime.date.today().isoformat(), _commit(), "H100 (modelled)",
                        f"T={T} B={B} D={D} M={M} K={K} {m['variant']} fwd+bwd {mode}",
                        f"{fu:.1f}", f"{eu:.1f}", f"{ratio:.2f}", assumptions()])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sm90", action="store_true", help="compile report for sm_90")
    ap.add_argument("--triton-python", action="append", default=[],
                    help="also compile with this interpreter (another triton); repeatable")
    ap.add_argument("--compile-specs", metavar="FILE", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="fp32", choices=list(VARIANTS))
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--json", metavar="FILE", help="write the sm_90 rows as JSON")
    args = ap.parse_args(argv)
    if args.compile_specs:  # the torch-free part, possibly under another triton
        specs = json.load(sys.stdin if args.compile_specs == "-" else open(args.compile_specs))
        print(json.dumps(compile_specs(specs)))
        return 0
    os.environ.pop("TRITON_INTERPRET", None)
    rows = []
    if args.sm90 or args.triton_python:
        specs = step_specs()
        for py in [sys.executable] + args.triton_python:
            rows += compile_with(py, specs)
        print(format_rows(rows))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    m = model(variant=args.variant, rows=[r for r in rows if r["triton"] == rows[0]["triton"]] if rows else None)
    print_model(m)
    if not args.no_csv:
        append_csv(m)
    return 0


if __name__ == "__main__":
    sys.exit(main())
