"""An analytic GPU cost model of one plan AS BUILT: the launch list comes from the planner's own code
path, each launch is costed from its recorded FLOPs / bytes / CTAs, and the time is predicted for an
H100 and an H200 from stated device figures. Modelled, never measured: every number this prints is a
model's, and says so.

    python bench/gpu_model.py                       # pusht preset, paper CEM, 1 and 50 envs, fp32 + bf16
    python bench/gpu_model.py --configs 1env-bf16 --csv ''
    python bench/gpu_model.py --measured profiles/planning_latency.csv   # beside measured CUDA rows

The launch list (profiles/launches.py): the plan runs on CPU tensors inside
`lewm_kernels._utils.record_launches(execute=False)` (every Triton launch recorded with its grid and
cost dict, none run) and a TorchDispatchMode (every aten op: the encoder, the CEM sampling, top-k,
refit, the bookkeeping between kernels); under FakeTensorMode, so nothing is computed. The plan is
recorded at 1 and 2 CEM iterations and every additive quantity (time, FLOPs, bytes, launches) is
scaled affinely to the iterations asked for (static shapes: every iteration launches the same).

Per Triton launch (cost dict keys "flops", "hbm_bytes", "l2_bytes", optional "phases"):

    t_work  = max(max(flops / peak, hbm_bytes / HBM) x ceil(ctas / SMs) x SMs / ctas,
                  l2_bytes / (a SM's L2 rate x min(ctas, SMs)) x the same quantisation for ctas > SMs)
              a SM's L2 rate = min(SM_L2, L2 / SMs reading): few CTAs cannot draw the aggregate
    peak    = by the kernel's MMA class: wgmma (HGMMA) the bf16 tensor-core rate; mma.sync (HMMA)
              that rate x HMMA_FRACTION; no MMA: the fp32 FMA rate. The class comes from the SASS of
              the kernel compiled for sm_90 (--mma sass, profiles/kernels_sm90.py), from the rows
              profiles/kernels_sm90.csv holds for that kernel and dtype (--mma report), or from the
              dtypes (--mma dtype: a launch with bf16/fp16 tensors = HMMA class)
    phases  = a persistent kernel: per phase, an item takes tau = max(flops / (peak / SMs),
              l2_bytes / a SM's L2 rate with min(items, ctas) SMs reading, trips x LAT) ("trips":
              the item's chain of dependent L2 round trips); the phase takes
              ceil(items / min(ctas, SMs)) x tau + SYNC + max(tail_bytes / SM_L2, tail_trips x LAT)
              (ROLLOUT_CTAS_PER_SM resident CTAs per SM: the occupancy its sm_90 compile allows,
              checked against profiles/kernels_sm90.py's by a test; the tail:
              what the phase's last item does alone once every item of its row block arrived, e.g.
              the fused epilogue of a split GEMM); t_work = max(sum of phases, hbm_bytes / HBM)
    t       = GAP + t_work                     (one CUDA-graph kernel node)

Per aten op of the fast planner (inside its CUDA graph): GAP + max(flops / rate, bytes / HBM) for an
op that launches a kernel (views, allocations and metadata ops launch none), rate = the fp32 FMA rate
(FastPlanner's encoder and CEM ops run in fp32, TF32 off), the tensor-core rate for bf16 matmuls.

The eager reference (lewm.plan.CEMPlanner, the same CEM): no graph, host-bound: each kernel-launching
aten op costs max(HOST, its device time), HOST = 8 and 12 us (the range of PyTorch's eager per-op
host + launch cost on a fast host: Python, dispatcher, allocator, cudaLaunchKernel); views are folded
into their neighbours. The ratio to the fast planner is of the two models.

Device figures (DEVICES below): bf16 dense tensor cores 790 TFLOP/s (measured here on an H200 for
an 8192^3 GEMM; the H100 SXM has the same tensor cores); fp32 FMA 60 TFLOP/s; HBM 3.35 (H100) /
4.8 (H200) TB/s; L2 -> SM 5.5 TB/s aggregate; 132 SMs; GAP 2.0 us per dependent graph kernel node
(the upper end of the 1.5-2 us seen for back-to-back small kernels in a CUDA graph on Hopper: the
launch, the ramp and the tail of a short kernel; the table gives 1.5 us beside it), HMMA_FRACTION
0.5 (mma.sync reaches about half the wgmma rate on Hopper: FlashAttention-2 vs -3), SYNC 1.0 us
(an inter-CTA hand-off through global memory: an L2 round trip for the flag and the data), LAT 0.3 us
(one dependent L2 round trip of a load: an L2 hit is ~260-480 cycles at 1.75 GHz, plus its issue and
use; a chain of loads that each wait for the last is latency-bound whatever the bandwidth), SM_L2
100 GB/s (one SM's L2 -> SM bandwidth when the aggregate is not the limit: about 50 bytes per clock).
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "profiles"))
import launches as L  # noqa: E402

GAP_US = 2.0
GAP_LOW_US = 1.5
SYNC_US = 1.0
LAT_US = 0.3
HMMA_FRACTION = 0.5
HOST_US = (8.0, 12.0)
SM_L2 = 100e9  # one SM's L2 -> SM bandwidth when the aggregate is not the limit (~50 B per clock)
# resident CTAs per SM of the persistent rollout kernel: what its sm_90 compile allows (registers, shared
# memory; profiles/kernels_sm90.csv's ctas_per_sm), checked against that compile by
# tests/test_kernel_report.py, so the model cannot assume an occupancy the compiler does not give
ROLLOUT_CTAS_PER_SM = 1

DEVICES = {
    "H100": dict(name="H100 (modelled)", sms=132, tc=790e12, fma=60e12, hbm=3.35e12, l2=5.5e12),
    "H200": dict(name="H200 (modelled)", sms=132, tc=790e12, fma=60e12, hbm=4.8e12, l2=5.5e12),
}
TARGETS = {"plan_1env_ms": 5.0, "ratio_vs_reference": 100.0, "per_env_ms_50": 10.0, "launches": 600}

# config name -> (envs, dtype)
CONFIGS = {"1env-fp32": (1, torch.float32), "1env-bf16": (1, torch.bfloat16),
           "50env-fp32": (50, torch.float32), "50env-bf16": (50, torch.bfloat16)}

CSV_FIELDS = ["date", "commit", "device", "config", "planner", "launches", "flops", "hbm_bytes", "l2_bytes",
              "modelled_ms", "ratio_vs_reference", "assumptions", "ms_per_env", "triton_launches",
              "aten_kernel_ops", "modelled_ms_gap_low", "measured_ms", "model_error"]


def assumptions(dev: dict, mma_mode: str) -> str:
    return (f"tc {dev['tc'] / 1e12:.0f} TF/s, HMMA x{HMMA_FRACTION}, fma {dev['fma'] / 1e12:.0f} TF/s, "
            f"HBM {dev['hbm'] / 1e12:.2f} TB/s, L2 {dev['l2'] / 1e12:.1f} TB/s (<= {SM_L2 / 1e9:.0f} GB/s per SM), "
            f"{dev['sms']} SMs, gap {GAP_US} us "
            f"(low {GAP_LOW_US}), sync {SYNC_US} us, host {HOST_US[0]:g}-{HOST_US[1]:g} us/op (reference), "
            f"mma class from {mma_mode}")


# ----------------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------------


@dataclass
class Totals:
    """Additive quantities of a plan (so that they scale affinely with the CEM iterations)."""
    t_us: float = 0.0  # modelled time at GAP_US
    t_low_us: float = 0.0  # the same at GAP_LOW_US
    flops: float = 0.0
    hbm: float = 0.0
    l2: float = 0.0
    launches: float = 0.0  # Triton launches
    ops: float = 0.0  # kernel-launching aten ops
    host_lo_us: float = 0.0  # the eager model at HOST_US[0] / HOST_US[1]
    host_hi_us: float = 0.0
    missing_cost: float = 0.0  # Triton launches without a cost dict
    spilling: set = field(default_factory=set)

    def scaled(self, other: "Totals", i1: int, i2: int, iterations: int) -> "Totals":
        """self at i1 iterations, other at i2: the affine extrapolation to `iterations`."""
        out = Totals()
        for k in ("t_us", "t_low_us", "flops", "hbm", "l2", "launches", "ops", "host_lo_us", "host_hi_us",
                  "missing_cost"):
            a, b = getattr(self, k), getattr(other, k)
            setattr(out, k, a + (b - a) / (i2 - i1) * (iterations - i1))
        out.spilling = self.spilling | other.spilling
        return out


def _fill(ctas: int, sms: int) -> float:
    """Wave quantisation: the factor by which a launch of `ctas` CTAs is slower than the same work
    spread evenly over every SM."""
    ctas = max(int(ctas), 1)
    return math.ceil(ctas / sms) * sms / ctas


def peak_for(mma: str, dev: dict) -> float:
    if mma in ("HGMMA", "QGMMA"):
        return dev["tc"]
    if mma in ("HMMA", "IMMA"):
        return dev["tc"] * HMMA_FRACTION
    if mma in ("DFMA", "DMMA"):
        return dev["fma"] / 2
    return dev["fma"]


def launch_time_us(rec, dev: dict, mma: str) -> float:
    """Device work of one recorded Triton launch (without the graph gap), microseconds."""
    c = rec.cost or {}
    peak = peak_for(mma, dev)
    sms = dev["sms"]
    ctas = max(rec.ctas, 1)
    hbm_t = c.get("hbm_bytes", 0) / dev["hbm"]
    phases = c.get("phases")
    if phases:
        total = sum(_phase_us(p, dev, peak, ctas) for p in phases) * 1e-6
        return max(total, hbm_t) * 1e6
    t = max(c.get("flops", 0) / peak, hbm_t) * _fill(ctas, sms)
    waves = math.ceil(ctas / sms)
    t_l2 = c.get("l2_bytes", 0) / (_sm_l2(dev, min(ctas, sms)) * min(ctas, sms)) * (
        waves * sms / ctas if ctas > sms else 1.0)
    return max(t, t_l2) * 1e6


def _sm_l2(dev: dict, active: int) -> float:
    """L2 -> SM bytes/s one SM gets while `active` SMs read: the aggregate's share, at most SM_L2."""
    return min(SM_L2, dev["l2"] / max(int(active), 1))


def _phase_us(p: dict, dev: dict, peak: float, ctas: int, unlimited: bool = False) -> float:
    """One phase of a persistent launch (see the module docstring), microseconds. `unlimited`: as if
    every item had an SM of its own (one round of items, each reading at one SM's L2 rate): the
    phase's share of the launch's critical path."""
    items = max(int(p.get("items", 1)), 1)
    slots = min(ctas, dev["sms"] * ROLLOUT_CTAS_PER_SM)  # resident CTAs (the compiled occupancy)
    if unlimited:
        slots, items = items, 1
    tau = max(p.get("flops", 0) / (peak / dev["sms"]), p.get("l2_bytes", 0) / _sm_l2(dev, min(items, slots)),
              p.get("trips", 0) * LAT_US * 1e-6)
    tail = max(p.get("tail_bytes", 0) / SM_L2, p.get("tail_trips", 0) * LAT_US * 1e-6)
    return (math.ceil(items / slots) * tau + SYNC_US * 1e-6 + tail) * 1e6


def critical_path_us(rec, dev: dict, mma: str) -> tuple:
    """(critical path us, phases) of one launch of phases (persistent, or one phase launched alone: its
    graph gap is the caller's to add): its phases one after the other, each as
    fast as its slowest chain allows with unlimited SMs (every item at once, one SM each: its FLOPs
    at one SM's peak, its L2 bytes at one SM's rate, its round trips, then the hand-off and the serial
    tail). No schedule of these phases on any number of SMs is faster: what is left above it in
    launch_time_us is the SMs' share (items queued behind each other). (0, 0) for a launch without
    phases."""
    c = rec.cost or {}
    phases = c.get("phases") or []
    peak, ctas = peak_for(mma, dev), max(rec.ctas, 1)
    return sum(_phase_us(p, dev, peak, ctas, unlimited=True) for p in phases), len(phases)


def op_time_us(op, dev: dict) -> float:
    rate = dev["tc"] * HMMA_FRACTION if op.dtype in ("bfloat16", "float16") and op.flops else dev["fma"]
    return max(op.flops / rate, op.bytes / dev["hbm"]) * 1e6


REPORT_CSV = REPO / "profiles" / "kernels_sm90.csv"


def _report_classes(path=REPORT_CSV) -> dict:
    """(kernel, dtype) -> (MMA class, spill bytes) from profiles/kernels_sm90.csv: the rows of the
    installed triton version if it has any (else of any version), of the commit of the last of them."""
    import triton
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return {}
    mine = [r for r in rows if r.get("triton") == triton.__version__] or rows
    if not mine:
        return {}
    last = mine[-1]["commit"]  # the file is an append log: its last rows are the latest
    out = {}
    for r in mine:
        if r.get("commit") != last:
            continue
        mma = (r.get("mma") or "-").split()
        cls = "-"
        for k in ("HGMMA", "QGMMA", "HMMA", "IMMA", "DMMA", "DFMA", "FFMA"):
            if any(m.startswith(k + ":") for m in mma):
                cls = k
                break
        key = (r["kernel"], r["dtype"])
        prev = out.get(key, ("-", 0))
        out[key] = (cls if prev[0] == "-" else prev[0], max(prev[1], int(r.get("spills") or 0)))
    return out


def mma_of(rec, mode: str, cache: dict) -> str:
    """The MMA class of a launch's kernel: from its sm_90 SASS (mode "sass"), from the rows of
    profiles/kernels_sm90.csv (mode "report": same kernel name and dtype) or from its dtypes."""
    low = any(isinstance(a, torch.Tensor) and a.dtype in (torch.bfloat16, torch.float16) for a in rec.args)
    if mode == "report":
        if "report" not in cache:
            cache["report"] = _report_classes()
        hit = cache["report"].get((rec.name, "bfloat16" if low else "float32"))
        if hit is not None:
            return hit
    if mode == "sass":
        try:
            import kernels_sm90 as K
            if "spec" not in cache:
                cache["spec"] = K.Specialiser()
            key, fn, sig, consts, attrs, opts = cache["spec"](rec)
            if key not in cache:
                a = K.analyse(K.compile_spec(fn, sig, consts, attrs, opts))
                cache[key] = (K.mma_class(a["mma"]), a["spill_stores"] + a["spill_loads"])
            return cache[key]
        except Exception as e:  # interpreted kernels, no ptxas: fall back to the dtypes
            cache.setdefault("errors", []).append(f"{rec.name}: {type(e).__name__}: {e}"[:200])
    return ("HMMA" if low else "FFMA"), 0


def model_recording(rec, dev: dict, planner: str, mma_mode: str, cache: dict) -> Totals:
    t = Totals()
    for lr in rec.launches:
        mma, spills = mma_of(lr, mma_mode, cache)
        w = launch_time_us(lr, dev, mma)
        t.t_us += GAP_US + w
        t.t_low_us += GAP_LOW_US + w
        c = lr.cost or {}
        t.flops += c.get("flops", 0)
        t.hbm += c.get("hbm_bytes", 0)
        t.l2 += c.get("l2_bytes", 0)
        t.launches += 1
        if not c:
            t.missing_cost += 1
        if spills:
            t.spilling.add(lr.name)
    for op in rec.kernel_ops:
        d = op_time_us(op, dev)
        t.flops += op.flops
        t.hbm += op.bytes
        t.ops += 1
        if planner == "fast":  # inside the CUDA graph
            t.t_us += GAP_US + d
            t.t_low_us += GAP_LOW_US + d
        else:  # eager: host-bound
            t.host_lo_us += max(HOST_US[0], d)
            t.host_hi_us += max(HOST_US[1], d)
    if planner != "fast":
        t.t_us, t.t_low_us = t.host_hi_us, t.host_lo_us
    return t


def model_plan(model, planner: str, envs: int, dtype, iterations: int, mma_mode: str, points=(1, 2),
               cem=None, fake: bool = True) -> dict:
    """{device key: Totals} of one plan, recorded at `points` iterations and scaled to `iterations`."""
    cem = dict(cem or {k: v for k, v in L.PAPER_CEM.items() if k != "iterations"})
    recs = [L.record_plan(model, planner, envs, dtype, iterations=i, fake=fake, **cem) for i in points]
    cache: dict = {}
    out = {}
    for key, dev in DEVICES.items():
        ts = [model_recording(r, dev, planner, mma_mode, cache) for r in recs]
        out[key] = ts[0].scaled(ts[1], points[0], points[1], iterations) if len(ts) == 2 else ts[0]
    out["_notes"] = sorted({n for r in recs for n in r.notes}) + cache.get("errors", [])[:3]
    return out


# ----------------------------------------------------------------------------------------------------
# measured rows, printing, CSV
# ----------------------------------------------------------------------------------------------------

_PLANNER_OF = {"fast": "(c) fast + CUDA graph", "reference": "(b) reference, encode once",
               "reference_reencode": "(a) reference, re-encode"}


def measured_rows(path) -> list[dict]:
    """CUDA rows of profiles/planning_latency.csv (device names an NVIDIA GPU)."""
    rows = []
    for p in [Path(path)] + sorted(Path(path).parent.glob(Path(path).stem + ".*" + Path(path).suffix)):
        if not p.exists():
            continue
        with open(p, newline="") as f:
            for r in csv.DictReader(f):
                if any(s in (r.get("device") or "") for s in ("NVIDIA", "H100", "H200")) and \
                        "modelled" not in r.get("device", ""):
                    rows.append(r)
    return rows


def find_measured(rows, dev_key: str, planner: str, envs: int, dtype: str, samples: int, iterations: int):
    best = None
    for r in rows:
        if dev_key not in r.get("device", ""):
            continue
        if r.get("planner") != _PLANNER_OF[planner] or int(r.get("envs") or 0) != envs:
            continue
        if int(r.get("samples") or 0) != samples or int(r.get("iterations") or 0) != iterations:
            continue
        if planner == "fast" and (r.get("dtype") or "float32") != dtype:
            continue
        best = r  # the last matching row
    return float(best["median_ms"]) if best else None


def _commit() -> str:
    if os.environ.get("LEWM_COMMIT"):
        return os.environ["LEWM_COMMIT"]
    import benchutil as bu
    return bu.git_commit()


def run(configs, iterations: int = 30, mma_mode: str = "sass", measured_csv=None, preset: str = "pusht",
        cem=None, points=(1, 2), reference=True, fake: bool = True) -> list[dict]:
    """Model every config (fast planner) and the eager reference at the same env counts; returns CSV rows."""
    model = L.build_model(preset)
    cem = dict(cem or {k: v for k, v in L.PAPER_CEM.items() if k != "iterations"})
    meas = measured_rows(measured_csv) if measured_csv else []
    results = {}  # (config, planner) -> {dev: Totals}
    for c in configs:
        envs, dtype = CONFIGS[c]
        results[(c, "fast")] = model_plan(model, "fast", envs, dtype, iterations, mma_mode, points, cem, fake)
        if reference:
            for kind in ("reference", "reference_reencode"):
                rk = (f"{envs}env-fp32", kind)
                if rk not in results:
                    results[rk] = model_plan(model, kind, envs, torch.float32, iterations, mma_mode, points, cem, fake)
    rows = []
    date = _dt.datetime.now().isoformat(timespec="seconds")
    commit = _commit()
    for (c, planner), per_dev in results.items():
        envs = int(c.split("env")[0])
        dtype = "bfloat16" if c.endswith("bf16") else "float32"
        for dk, dev in DEVICES.items():
            t: Totals = per_dev[dk]
            ref = results.get((f"{envs}env-fp32", "reference_reencode"), {}).get(dk)
            ms = t.t_us / 1e3
            ratio = ref.t_us / t.t_us if ref is not None and planner == "fast" else (
                ref.t_us / t.t_us if ref is not None else float("nan"))
            m = find_measured(meas, dk, planner, envs, dtype, cem["samples"], iterations)
            rows.append(dict(date=date, commit=commit, device=dev["name"], config=f"{preset} {cem['samples']}x"
                             f"{cem['elites']}x{iterations} H{cem['horizon']} {c}", planner=planner,
                             launches=f"{t.launches + t.ops:.0f}",
                             flops=f"{t.flops:.4g}", hbm_bytes=f"{t.hbm:.4g}", l2_bytes=f"{t.l2:.4g}",
                             modelled_ms=f"{ms:.3f}", ratio_vs_reference=f"{ratio:.2f}",
                             assumptions=assumptions(dev, mma_mode), ms_per_env=f"{ms / envs:.3f}",
                             triton_launches=f"{t.launches:.0f}", aten_kernel_ops=f"{t.ops:.0f}",
                             modelled_ms_gap_low=f"{t.t_low_us / 1e3:.3f}",
                             measured_ms=f"{m:.3f}" if m else "",
                             model_error=f"{(ms - m) / m:+.0%}" if m else "",
                             _spilling=sorted(t.spilling), _missing=t.missing_cost,
                             _notes=per_dev.get("_notes", []), _host=(t.host_lo_us / 1e3, t.host_hi_us / 1e3)))
    return rows


def print_report(rows, out=None):
    out = out or sys.stdout
    hdr = ["device", "planner", "config", "launches", "(triton+aten)", "GFLOP", "HBM GB", "L2 GB",
           "modelled ms", "ms/env", "vs (a)", "measured ms", "error"]
    tab = []
    for r in rows:
        conf = r["config"].split()[-1]
        ms, lo = float(r["modelled_ms"]), float(r["modelled_ms_gap_low"])
        tab.append([r["device"], r["planner"], conf, r["launches"], f"{r['triton_launches']}+{r['aten_kernel_ops']}",
                    f"{float(r['flops']) / 1e9:.0f}", f"{float(r['hbm_bytes']) / 1e9:.2f}",
                    f"{float(r['l2_bytes']) / 1e9:.1f}",
                    f"{lo:.2f}-{ms:.2f}" if r["planner"] == "fast" else f"{lo:.0f}-{ms:.0f}",
                    f"{ms / int(conf.split('env')[0]):.2f}", r["ratio_vs_reference"] + "x",
                    r["measured_ms"] or "-", r["model_error"] or "-"])
    w = [max(len(str(x)) for x in col) for col in zip(hdr, *tab)]
    print("  ".join(h.ljust(n) for h, n in zip(hdr, w)), file=out)
    for t in tab:
        print("  ".join(str(x).ljust(n) for x, n in zip(t, w)), file=out)
    print(f"(modelled, not measured. 'modelled ms': fast planner at a graph gap of {GAP_LOW_US}-{GAP_US} us per "
          f"kernel node; reference at {HOST_US[0]:g}-{HOST_US[1]:g} us of host time per eager op. 'vs (a)': the "
          f"eager reference re-encoding every iteration, modelled the same way / this, at the upper figures.)",
          file=out)
    print(f"targets: one plan, 1 env, bf16 <= {TARGETS['plan_1env_ms']:g} ms and >= {TARGETS['ratio_vs_reference']:g}x "
          f"the eager reference; 50 envs <= {TARGETS['per_env_ms_50']:g} ms per env; launches per plan <= "
          f"{TARGETS['launches']}", file=out)
    for r in rows:
        if r["planner"] != "fast" or "H100" not in r["device"]:
            continue
        conf = r["config"].split()[-1]
        envs = int(conf.split("env")[0])
        ms = float(r["modelled_ms"])
        verdict = []
        if envs == 1:
            verdict.append(f"{ms:.2f} ms {'<=' if ms <= TARGETS['plan_1env_ms'] else '>'} {TARGETS['plan_1env_ms']:g}")
            ratio = float(r["ratio_vs_reference"])
            verdict.append(f"{ratio:.0f}x {'>=' if ratio >= TARGETS['ratio_vs_reference'] else '<'} "
                           f"{TARGETS['ratio_vs_reference']:g}x")
        else:
            pe = ms / envs
            verdict.append(f"{pe:.2f} ms/env {'<=' if pe <= TARGETS['per_env_ms_50'] else '>'} "
                           f"{TARGETS['per_env_ms_50']:g}")
        n = float(r["launches"])
        verdict.append(f"{n:.0f} launches {'<=' if n <= TARGETS['launches'] else '>'} {TARGETS['launches']}")
        extra = []
        if r["_spilling"]:
            extra.append(f"spilling kernels (time is a lower bound): {', '.join(r['_spilling'])}")
        if r["_missing"]:
            extra.append(f"{r['_missing']:.0f} launches without a cost dict (gap only)")
        print(f"  H100 {conf}: " + "; ".join(verdict) + (" [" + "; ".join(extra) + "]" if extra else ""), file=out)
    notes = sorted({n for r in rows for n in r["_notes"]})
    for n in notes:
        print(f"note: {n}", file=out)


def _phase_gap_us(rec) -> float:
    """The graph gap each phase of a launch pays: none inside a persistent kernel (its phases hand off
    in place), GAP_US where each phase is a launch of its own."""
    return 0.0 if (rec.meta or {}).get("PERSISTENT") else GAP_US


def print_breakdown(configs, mma_mode: str, preset: str, cem: dict, out=None, iterations: int = 30) -> None:
    """Per config, the modelled H100 time of ONE CEM iteration's Triton launches, grouped by kernel
    and, for a persistent kernel, by phase kind (the phase name's first word)."""
    out = out or sys.stdout
    model = L.build_model(preset)
    dev = DEVICES["H100"]
    for c in configs:
        envs, dtype = CONFIGS[c]
        r1 = L.record_plan(model, "fast", envs, dtype, iterations=1, fake=True, aten=False, **cem)
        r2 = L.record_plan(model, "fast", envs, dtype, iterations=2, fake=True, aten=False, **cem)
        per_iter = r2.launches[len(r1.launches) - 1:len(r2.launches) - 1] or r2.launches[:1]
        cache: dict = {}
        groups: dict = {}
        for lr in per_iter:
            mma, _ = mma_of(lr, mma_mode, cache)
            if (lr.cost or {}).get("phases"):
                peak, ctas = peak_for(mma, dev), max(lr.ctas, 1)
                gap = _phase_gap_us(lr)
                for p in lr.cost["phases"]:
                    name = p.get("name", "?")
                    kind = " ".join(name.split()[:2 if name.startswith("reduce") else 1])
                    g = groups.setdefault(f"{lr.name}: {kind}", [0, 0.0, 0, 0.0])
                    g[0] += 1
                    g[1] += gap + _phase_us(p, dev, peak, ctas)
                    g[2] += max(int(p.get("items", 1)), 1)
                    g[3] += gap + _phase_us(p, dev, peak, ctas, unlimited=True)
            else:
                g = groups.setdefault(lr.name, [0, 0.0, 0, 0.0])
                g[0] += 1
                g[1] += GAP_US + launch_time_us(lr, dev, mma)
                g[2] += lr.ctas
        total = sum(g[1] for g in groups.values())
        print(f"breakdown, H100 (modelled), {c}, one CEM iteration's Triton launches ({len(per_iter)}): "
              f"{total:.0f} us; 'critical': the same phases with unlimited SMs (critical_path_us)", file=out)
        for k, (n, t, items, cp) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
            crit = f"{cp:>9.1f} us critical" if cp else ""
            print(f"  {k:<40} {n:>4} phases/launches {items:>8} items/CTAs {t:>9.1f} us {t / total:>6.1%} {crit}",
                  file=out)
        paths = [critical_path_us(lr, dev, mma_of(lr, mma_mode, cache)[0]) for lr in per_iter]
        gaps = sum(_phase_gap_us(lr) * n for lr, (_, n) in zip(per_iter, paths))
        cp, nph = sum(t for t, _ in paths) + gaps, sum(n for _, n in paths)
        if nph:
            print(f"  critical path of its phases, unlimited SMs: {cp:.0f} us of the {total:.0f} "
                  f"({nph} dependent phases; their hand-offs alone {nph * SYNC_US:.0f} us at {SYNC_US:g} us each"
                  + (f", and {gaps:.0f} us of graph gaps for those launched one by one" if gaps else "") + "): "
                  f"{cp * iterations / 1e3:.1f} ms over {iterations} iterations, before any other launch", file=out)


def append_csv(path, rows):
    return L.append_csv(path, rows, CSV_FIELDS)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="all", help=f"'all' or a comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--iterations", type=int, default=30, help="CEM iterations of the modelled plan (paper: 30)")
    ap.add_argument("--samples", type=int, default=L.PAPER_CEM["samples"])
    ap.add_argument("--elites", type=int, default=L.PAPER_CEM["elites"])
    ap.add_argument("--horizon", type=int, default=L.PAPER_CEM["horizon"])
    ap.add_argument("--preset", default="pusht")
    ap.add_argument("--mma", choices=["auto", "sass", "report", "dtype"], default="auto",
                    help="MMA class per kernel: from its sm_90 SASS (needs ptxas, kernels not interpreted; slow on a "
                         "cold triton cache), from profiles/kernels_sm90.csv's rows (report), from the dtypes, or "
                         "auto (sass where possible)")
    ap.add_argument("--no-reference", action="store_true", help="skip the eager reference's model")
    ap.add_argument("--breakdown", action="store_true",
                    help="also print where one rollout's time goes (per launch; per phase of a persistent kernel)")
    ap.add_argument("--measured", default=str(REPO / "profiles" / "planning_latency.csv"),
                    help="planning_latency CSV whose CUDA rows are printed beside the model ('' = none)")
    ap.add_argument("--csv", default=str(REPO / "profiles" / "gpu_model.csv"), help="CSV to append to ('' = none)")
    args = ap.parse_args(argv)
    configs = list(CONFIGS) if args.configs == "all" else [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        print(f"gpu_model: unknown config(s) {', '.join(bad)} (known: {', '.join(CONFIGS)})", file=sys.stderr)
        return 2
    mode = args.mma
    if mode == "auto":
        mode = "dtype"
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            try:
                import kernels_sm90 as K
                mode = "sass" if not K.missing_tools() else "dtype"
            except Exception:
                pass
    cem = dict(samples=args.samples, elites=min(args.elites, args.samples), horizon=args.horizon)
    import triton
    print(f"gpu_model: MODELLED H100/H200 times of one plan as built (commit {_commit()}, triton {triton.__version__},"
          f" torch {torch.__version__}); preset {args.preset}, CEM {cem['samples']} x {cem['elites']} x "
          f"{args.iterations}, horizon {cem['horizon']}; plans recorded at 1 and 2 iterations and scaled; MMA class "
          f"from {mode}")
    rows = run(configs, args.iterations, mode, args.measured or None, args.preset, cem, reference=not args.no_reference)
    print_report(rows)
    if args.breakdown:
        print_breakdown(configs, mode, args.preset, cem, iterations=args.iterations)
    if args.csv:
        print(f"appended {len(rows)} rows to {append_csv(args.csv, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
