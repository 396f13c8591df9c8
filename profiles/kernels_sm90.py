"""What the compiler makes of every kernel one plan and one SIGReg step launch, for Hopper (sm_90),
without a GPU.

    python profiles/kernels_sm90.py                  # every config below; rows -> profiles/kernels_sm90.csv
    python profiles/kernels_sm90.py --configs plan-1env-bf16,sigreg-fp32 --csv '' --json out.json
    python profiles/kernels_sm90.py --check          # exit 1 on a spill or a bf16 GEMM without tensor cores

What it does:

1. Records the launches of the real code paths (profiles/launches.py): one plan of the fast planner
   (`FastPlanner(model, backend="triton", dtype=...)`, pusht preset, paper CEM: 300 samples, 30
   elites, horizon 5) for 1 and 50 environments in fp32 and bf16, and one training step's SIGReg
   forward + backward (T=4, B=128, D=192, M=1024, K=17) through `lewm_kernels.sigreg`, all inside
   `lewm_kernels._utils.record_launches(execute=False)`: nothing runs, every launch is recorded.
   Every CEM iteration launches the same specialisations with the same grids (static shapes), so
   plans are recorded at 1 and 2 iterations and the launch counts scaled to --plan-iterations
   (default 30, the paper's): count = fixed part + iterations x per-iteration part.
2. Deduplicates the specialisations with triton's own binder for an sm_90 target (the same code that
   specialises a launch at run time: tensor dtypes, ints equal to 1, divisibility by 16 of ints and
   of pointers, the constexprs and num_warps / num_stages). Tensor arguments are replaced by meta
   tensors of the same dtype, shape, strides and storage offset, so a pointer's alignment is that
   of the offset into a 256-byte-aligned allocation, as on the GPU.
3. Compiles each specialisation for sm_90 (`triton.compile(ASTSource(...), target=GPUTarget("cuda",
   90, 32))`), then reads: registers and shared memory (cuobjdump -res-usage of the cubin; dynamic
   shared memory from the kernel's metadata), stack frame and spill bytes (ptxas -v: the compile's
   own log, or on a triton cache hit ptxas run again on the PTX with the options triton uses), the SASS opcodes (cuobjdump --dump-sass: HGMMA = wgmma, HMMA =
   mma.sync, FFMA, DFMA, and LDL/STL local-memory accesses) and whether the kernel has a tl.dot on
   bf16 operands (from the TTIR).
4. Occupancy on an H100/H200 SM (65,536 registers in 256-register warp allocations, 64 warps, 228 KB
   shared memory with 1 KB reserved per CTA, 32 CTAs), CTAs at the recorded grid and waves =
   CTAs / (132 SMs x CTAs per SM).

One CSV row per (config, specialisation, grid): date, commit, triton, kernel, tag, dtype, grid,
ctas, waves, regs, spills (spill stores + loads, bytes per thread), smem, mma, launches per plan,
then config, num_warps, num_stages, ctas_per_sm, stack, spill_stores, spill_loads, local_ops,
bf16_dot, spec (a short hash of the specialisation) and source ("launch" or "legacy shim": a kernel
module not yet launching through `_utils.launch`, recorded by profiles/launches.py's shim).

Needs the triton wheel's ptxas and cuobjdump (triton/backends/nvidia/bin); runs with triton 3.6 and
3.8. TRITON_INTERPRET is dropped from the environment before triton is imported (interpreted
kernels cannot be compiled).
"""
from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import collections  # noqa: E402
import datetime as _dt  # noqa: E402
import hashlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import launches as L  # noqa: E402

CSV_FIELDS = ["date", "commit", "triton", "kernel", "tag", "dtype", "grid", "ctas", "waves", "regs", "spills",
              "smem", "mma", "launches_per_plan", "config", "num_warps", "num_stages", "ctas_per_sm", "stack",
              "spill_stores", "spill_loads", "local_ops", "bf16_dot", "spec", "source"]

# config name -> (what, envs, dtype)
CONFIGS = {
    "plan-1env-fp32": ("plan", 1, torch.float32),
    "plan-1env-bf16": ("plan", 1, torch.bfloat16),
    "plan-50env-fp32": ("plan", 50, torch.float32),
    "plan-50env-bf16": ("plan", 50, torch.bfloat16),
    "plan-1env-bf16-reach": ("plan", 1, torch.bfloat16),  # with the reachability cost (REACH_CONFIGS)
    "sigreg-fp32": ("sigreg", 0, torch.float32),
    "sigreg-bf16": ("sigreg", 0, torch.bfloat16),
}
REACH_CONFIGS = {"plan-1env-bf16-reach"}  # plans whose terminal cost is "mix" (the fused reach-cost kernel)
SMALL = ["plan-1env-fp32", "plan-1env-bf16", "plan-1env-bf16-reach", "sigreg-fp32"]

SM90 = dict(sms=132, regs=65536, warps=64, smem=228 * 1024, smem_reserved=1024, ctas=32)
MMA_OPS = ("HGMMA", "HMMA", "QGMMA", "IMMA", "DMMA", "FFMA", "DFMA", "HFMA2")


# ----------------------------------------------------------------------------------------------------
# tools
# ----------------------------------------------------------------------------------------------------


def nvidia_bin(tool: str) -> str | None:
    """Path of a tool shipped in the triton wheel (ptxas, cuobjdump), or None."""
    import triton
    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    return str(p) if p.exists() and os.access(p, os.X_OK) else None


def missing_tools() -> list[str]:
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        return ["triton.backends.nvidia"]
    return [t for t in ("ptxas", "cuobjdump") if nvidia_bin(t) is None]


def _target():
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", 90, 32)


def _backend():
    from triton.compiler import make_backend
    return make_backend(_target())


def _sm_arch() -> str:
    try:
        from triton.backends.nvidia.compiler import sm_arch_from_capability
        return sm_arch_from_capability(90)
    except ImportError:  # pragma: no cover
        return "sm_90a"


def _ptxas_extra() -> list[str]:
    """The ptxas options triton's own make_cubin passes besides -v and the arch (version-dependent)."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend
        src = inspect.getsource(CUDABackend.make_cubin)
    except Exception:  # pragma: no cover
        return ["-lineinfo"]
    extra = ["-lineinfo"]
    if "--regAllocOptLevel=2" in src:
        extra.append("--regAllocOptLevel=2")
    return extra


# ----------------------------------------------------------------------------------------------------
# specialisation (triton's own binder, for an sm_90 target)
# ----------------------------------------------------------------------------------------------------


def _as_meta(x):
    if not isinstance(x, torch.Tensor):
        return x
    need = x.storage_offset() + sum((s - 1) * st for s, st in zip(x.shape, x.stride()) if s > 0) + 1
    base = torch.empty(max(need, 1), dtype=x.dtype, device="meta")
    return base.as_strided(tuple(x.shape), tuple(x.stride()), x.storage_offset())


def _jit(kernel):
    """The JITFunction behind a recorded kernel object."""
    import triton
    k = kernel
    while not isinstance(k, triton.runtime.jit.JITFunction):
        nxt = getattr(k, "real", None) or getattr(k, "fn", None)
        if nxt is None or nxt is k:
            raise TypeError(f"not a Triton JITFunction: {kernel!r}")
        k = nxt
    return k


class Specialiser:
    def __init__(self):
        from triton.runtime.jit import create_function_from_signature
        self.backend = _backend()
        self._mk = create_function_from_signature
        self._binders = {}

    def __call__(self, rec):
        """LaunchRecord -> (key, fn, signature, constexprs, attrs, options dict)."""
        fn = _jit(rec.kernel)
        b = self._binders.get(id(fn))
        if b is None:
            b = self._binders[id(fn)] = self._mk(fn.signature, fn.params, self.backend)
        args = [_as_meta(a) for a in rec.args]
        meta = dict(rec.meta)
        bound, spec, opts = b(*args, **meta)
        options, sig, consts, attrs = fn._pack_args(self.backend, meta, bound, spec, opts)
        odict = dict(options.__dict__)
        key = json.dumps([fn.__name__, sorted(sig.items()), sorted((str(k), repr(v)) for k, v in consts.items()),
                          sorted((str(k), repr(v)) for k, v in attrs.items()),
                          odict.get("num_warps"), odict.get("num_stages"), odict.get("maxnreg")], default=str)
        return key, fn, sig, consts, attrs, odict


# ----------------------------------------------------------------------------------------------------
# compile + read what the compiler made
# ----------------------------------------------------------------------------------------------------

_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_SASS_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")


def _cache_dir() -> Path:
    try:
        from triton import knobs
        base = Path(knobs.cache.dir)
    except Exception:  # pragma: no cover
        base = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    d = base / "lewm_sm90_reports"
    d.mkdir(parents=True, exist_ok=True)
    return d


def analyse(ck) -> dict:
    """Registers, spills, shared memory, SASS opcode counts of one CompiledKernel (cached by its hash)."""
    h = getattr(ck, "hash", None) or ck.metadata.hash
    cache = _cache_dir() / f"{h}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    md = ck.metadata
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(ck.asm["cubin"])
        res = subprocess.run([nvidia_bin("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([nvidia_bin("cuobjdump"), "--dump-sass", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
        log = getattr(ck, "_lewm_ptxas_log", None)
        if log is None:  # a cache hit: run ptxas -v on the PTX with the options triton uses
            ptx = Path(tmp) / "k.ptx"
            ptx.write_text(ck.asm["ptx"])
            fmad = [] if getattr(md, "enable_fp_fusion", True) else ["--fmad=false"]
            r = subprocess.run([nvidia_bin("ptxas"), *_ptxas_extra(), *fmad, "-v", f"--gpu-name={_sm_arch()}",
                                str(ptx), "-o", str(Path(tmp) / "k.o")], capture_output=True, text=True)
            log = r.stderr + r.stdout
    m = _RES.search(res)
    regs, stack, static_smem, local = (int(v) for v in m.groups()) if m else (0, 0, 0, 0)
    p = _PTXAS.search(log)
    ptx_stack, stores, loads = (int(v) for v in p.groups()) if p else (0, 0, 0)
    r = _REGS.search(log)
    ops = collections.Counter(_SASS_OP.findall(sass))
    ttir = ck.asm.get("ttir", "")
    bf16_dot = any("tt.dot" in ln and "xbf16>" in ln.split("->")[0] for ln in ttir.splitlines())
    out = dict(regs=regs or (int(r.group(1)) if r else 0), stack=max(stack, ptx_stack), spill_stores=stores,
               spill_loads=loads, local=local, smem=max(int(getattr(md, "shared", 0) or 0), static_smem),
               num_warps=int(md.num_warps), num_stages=int(getattr(md, "num_stages", 0) or 0),
               mma={k: ops[k] for k in MMA_OPS if ops.get(k)}, local_ops=ops.get("LDL", 0) + ops.get("STL", 0),
               bf16_dot=bf16_dot, ptxas_regs=int(r.group(1)) if r else None)
    cache.write_text(json.dumps(out))
    return out


def compile_spec(fn, sig, consts, attrs, options):
    """triton.compile for sm_90. When the compile runs ptxas (not a cache hit), its -v log is kept
    on the result (`_lewm_ptxas_log`), so `analyse` need not run ptxas a second time."""
    import contextlib
    import io

    import triton
    from triton.compiler import ASTSource
    src = ASTSource(fn, sig, consts, attrs)
    opts = {k: v for k, v in options.items() if k in ("num_warps", "num_stages", "num_ctas", "maxnreg",
                                                      "enable_fp_fusion", "launch_cooperative_grid",
                                                      "debug", "ptx_options")}
    buf = io.StringIO()
    knob = None
    try:
        from triton import knobs
        knob = knobs.nvidia
        old = knob.dump_ptxas_log
        knob.dump_ptxas_log = True
    except Exception:  # pragma: no cover - a triton without the knob: analyse runs ptxas itself
        knob = None
    try:
        with contextlib.redirect_stdout(buf):
            ck = triton.compile(src, target=_target(), options=opts)
    finally:
        if knob is not None:
            knob.dump_ptxas_log = old
    log = buf.getvalue()
    if "bytes stack frame" in log:
        ck._lewm_ptxas_log = log
    return ck


def occupancy(regs: int, smem: int, warps: int) -> int:
    """CTAs resident per sm_90 SM, from registers, shared memory, warps and the CTA cap."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (SM90["regs"] // per_warp) // max(warps, 1)
    by_smem = SM90["smem"] // (smem + SM90["smem_reserved"]) if smem else SM90["ctas"]
    by_warps = SM90["warps"] // max(warps, 1)
    return max(0, min(by_regs, by_smem, by_warps, SM90["ctas"]))


def mma_class(mma: dict) -> str:
    """'HGMMA' (wgmma), 'HMMA' (mma.sync), 'FFMA' (fp32 FMA only), 'DFMA', or '-'."""
    for k in ("HGMMA", "QGMMA", "HMMA", "IMMA", "DMMA", "DFMA", "FFMA"):
        if mma.get(k):
            return k
    return "-"


# ----------------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------------


def record(config: str, model, iterations: int, preset: str):
    """Recordings of one config: plans at `iterations` (a small count), or one SIGReg step."""
    what, envs, dtype = CONFIGS[config]
    if what == "plan":
        kw = {k: v for k, v in L.PAPER_CEM.items() if k != "iterations"}
        planner = None
        if config in REACH_CONFIGS:  # the terminal cost "mix" of a reachability head (lewm reach's default size)
            from lewm.plan.reach import GoalCost, ReachHead
            planner = L.make_planner(model, "fast", kw["samples"], kw["elites"], iterations, kw["horizon"], dtype)
            planner.goal_cost = GoalCost("mix", ReachHead(model.mcfg.embed_dim, 10), 1.0)
        return L.record_plan(model, "fast", envs, dtype, iterations=iterations, aten=False, fake=True,
                             planner=planner, **kw)
    return L.record_sigreg_step(dtype=dtype, fake=True)


def build_rows(configs, plan_iterations: int = 30, points=(1, 2), preset: str = "pusht", log=print,
               coarse: bool = False):
    """Record, deduplicate, compile and analyse; returns (rows, problems, notes). `coarse`: compile one
    specialisation per (kernel, constexprs, options) and reuse its analysis for the others (those
    differ only in the integer / alignment specialisation of runtime arguments): fewer compiles."""
    import triton
    spec = Specialiser()
    model = None
    compiled = {}  # key -> analysis
    rows, problems, notes = [], [], []
    commit = _commit()
    date = _dt.date.today().isoformat()
    for config in configs:
        what, envs, dtype = CONFIGS[config]
        if what == "plan":
            if model is None:
                model = L.build_model(preset)
            recs = [record(config, model, i, preset) for i in points]
        else:
            recs = [record(config, None, 0, preset)]
        for r in recs:
            notes.extend(n for n in r.notes if n not in notes)
        counts = []  # per recording: (key, grid) -> [n, tag, rec]
        for r in recs:
            c = collections.OrderedDict()
            for lr in r.launches:
                key, fn, sig, consts, attrs, opts = spec(lr)
                e = c.setdefault((key, lr.grid), [0, lr.tag, lr, (fn, sig, consts, attrs, opts)])
                e[0] += 1
            counts.append(c)
        if not counts[-1]:
            notes.append(f"{config}: no launch recorded")
        for (key, grid), (n_last, tag, lr, cargs) in counts[-1].items():
            if what == "plan" and len(counts) == 2:
                n1 = counts[0].get((key, grid), [0])[0]
                n = L.scale_counts(n1, n_last, points[0], points[1], plan_iterations)
            else:
                n = n_last
            ckey = key
            if coarse:
                fn_, sig_, consts_, attrs_, opts_ = cargs
                ckey = json.dumps([fn_.__name__, sorted((str(k), repr(v)) for k, v in consts_.items()),
                                   sorted(v for k, v in sig_.items() if str(v).startswith("*")),
                                   opts_.get("num_warps"), opts_.get("num_stages")])
            if ckey not in compiled:
                t0 = time.perf_counter()
                ck = compile_spec(*cargs)
                compiled[ckey] = analyse(ck)
                log(f"  compiled {lr.name:<28} {time.perf_counter() - t0:5.1f} s")
            a = compiled[ckey]
            ctas = 1
            for g in grid:
                ctas *= int(g)
            occ = occupancy(a["regs"], a["smem"], a["num_warps"])
            waves = ctas / (SM90["sms"] * occ) if occ else float("inf")
            spills = a["spill_stores"] + a["spill_loads"]
            row = dict(date=date, commit=commit, triton=triton.__version__, kernel=lr.name, tag=tag,
                       dtype=str(dtype).replace("torch.", ""), grid="x".join(str(g) for g in grid), ctas=ctas,
                       waves=f"{waves:.2f}", regs=a["regs"], spills=spills, smem=a["smem"],
                       mma=" ".join(f"{k}:{v}" for k, v in a["mma"].items()) or "-",
                       launches_per_plan=f"{n:g}", config=config, num_warps=a["num_warps"],
                       num_stages=a["num_stages"], ctas_per_sm=occ, stack=a["stack"],
                       spill_stores=a["spill_stores"], spill_loads=a["spill_loads"], local_ops=a["local_ops"],
                       bf16_dot=a["bf16_dot"], spec=hashlib.sha1(key.encode()).hexdigest()[:8],
                       source="legacy shim" if str(tag).startswith("legacy:") else "launch")
            rows.append(row)
            if any(row["spec"] in q for q in problems):
                continue
            if spills:
                problems.append(f"{config} {lr.name} [{row['spec']}]: {a['spill_stores']} B spill stores, "
                                f"{a['spill_loads']} B spill loads per thread")
            if a["bf16_dot"] and not (a["mma"].get("HMMA") or a["mma"].get("HGMMA")):
                problems.append(f"{config} {lr.name} [{row['spec']}]: bf16 tl.dot without tensor-core MMA "
                                f"({row['mma']})")
    return rows, problems, notes


def _commit() -> str:
    """The commit of the kernels and planner recorded (LEWM_COMMIT overrides it: for a run on an
    exported tree); '+dirty' when kernels/ or lewm/ have uncommitted changes."""
    if os.environ.get("LEWM_COMMIT"):
        return os.environ["LEWM_COMMIT"]
    try:
        return subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip() + ("+dirty" if _dirty() else "")
    except Exception:
        return "unknown"


def _dirty() -> bool:
    r = subprocess.run(["git", "-C", str(HERE.parent), "status", "--porcelain", "--", "kernels", "lewm"],
                       capture_output=True, text=True)
    return bool(r.stdout.strip())


def print_table(rows, out=None):
    out = out or sys.stdout
    hdr = ["config", "kernel", "tag", "grid", "ctas", "waves", "regs", "spills", "stack", "smem", "warps", "mma",
           "launches/plan"]
    tab = [[r["config"], r["kernel"], str(r["tag"])[:26], r["grid"], r["ctas"], r["waves"], r["regs"], r["spills"],
            r["stack"], r["smem"], r["num_warps"], r["mma"], r["launches_per_plan"]] for r in rows]
    w = [max(len(str(x)) for x in col) for col in zip(hdr, *tab)] if tab else [len(h) for h in hdr]
    print("  ".join(h.ljust(n) for h, n in zip(hdr, w)), file=out)
    for t in tab:
        print("  ".join(str(x).ljust(n) for x, n in zip(t, w)), file=out)


def append_csv(path, rows):
    return L.append_csv(path, rows, CSV_FIELDS)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="all", help=f"'all', 'small' ({','.join(SMALL)}) or a comma list of "
                                                     f"{','.join(CONFIGS)}")
    ap.add_argument("--plan-iterations", type=int, default=30, help="CEM iterations the launch counts are scaled to")
    ap.add_argument("--points", default="1,2", help="CEM iteration counts the plans are recorded at (one count: no "
                                                    "scaling; the launch counts are then those of that plan)")
    ap.add_argument("--preset", default="pusht")
    ap.add_argument("--coarse", action="store_true",
                    help="one compile per (kernel, constexprs, options): the test's shortcut")
    ap.add_argument("--csv", default=str(HERE / "kernels_sm90.csv"), help="CSV to append to ('' = none)")
    ap.add_argument("--json", default="", help="also write rows, problems and notes as JSON here")
    ap.add_argument("--check", action="store_true", help="exit 1 on a spill or a bf16 GEMM without tensor cores")
    args = ap.parse_args(argv)
    miss = missing_tools()
    if miss:
        print(f"kernels_sm90: this triton wheel lacks {', '.join(miss)}; cannot compile for sm_90", file=sys.stderr)
        return 2
    configs = list(CONFIGS) if args.configs == "all" else SMALL if args.configs == "small" else \
        [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        print(f"kernels_sm90: unknown config(s) {', '.join(unknown)} (known: {', '.join(CONFIGS)})", file=sys.stderr)
        return 2
    import triton
    print(f"kernels_sm90: triton {triton.__version__}, torch {torch.__version__}, target sm_90 ({_sm_arch()}), "
          f"commit {_commit()}; configs {', '.join(configs)}; plans recorded at {args.points} CEM iterations"
          + (f", launch counts scaled to {args.plan_iterations}" if "," in args.points else ""))
    t0 = time.perf_counter()
    points = tuple(int(v) for v in args.points.split(","))
    if len(points) not in (1, 2) or min(points) < 1 or (len(points) == 2 and points[0] >= points[1]):
        print(f"kernels_sm90: --points must be one count or two increasing counts, got {args.points}",
              file=sys.stderr)
        return 2
    rows, problems, notes = build_rows(configs, args.plan_iterations, points=points, preset=args.preset,
                                       coarse=args.coarse)
    for n in notes:
        print(f"note: {n}")
    print_table(rows)
    print(f"{len(rows)} rows, {len({r['spec'] for r in rows})} specialisations, {time.perf_counter() - t0:.0f} s")
    for p in problems:
        print(f"PROBLEM: {p}")
    if args.csv:
        print(f"appended {len(rows)} rows to {append_csv(args.csv, rows)}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, problems=problems, notes=notes,
                                                   triton=triton.__version__), indent=1, default=str))
    return 1 if (args.check and problems) else 0


if __name__ == "__main__":
    sys.exit(main())
