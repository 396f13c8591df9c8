"""The sm_90 kernel report (profiles/kernels_sm90.py), without a GPU.

Compiles for Hopper with the installed triton's ptxas (in a subprocess without TRITON_INTERPRET:
interpreted kernels cannot be compiled):

* the report's machinery on toy kernels launched through `lewm_kernels._utils.launch`: triton's own
  specialisation (ints equal to 1, divisibility by 16), spill detection, the MMA class in the SASS;
* the gate: every kernel one plan (pusht preset, 300 samples, 1 env, fp32 and bf16; bf16 with the
  reachability cost "mix", whose fused terminal-cost kernel runs after each rollout) and one SIGReg
  step (fp32) launch compiles with zero spill bytes, and every bf16 GEMM kernel (a tl.dot on bf16
  operands) uses tensor-core MMA (HMMA or HGMMA). The plan is recorded at one CEM iteration: every
  iteration launches the same specialisations; one compile per (kernel, constexprs, options)
  (--coarse: the integer specialisations of runtime arguments share it).

Skips (with the reason) only where the triton wheel lacks ptxas / cuobjdump. Kernel modules that do
not yet launch through `_utils.launch` (recorded through profiles/launches.py's shim) and fail the
gate make the test xfail with the list; a failing kernel launched through `_utils.launch` fails it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _tools_or_skip():
    try:
        import triton
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this triton wheel has no NVIDIA backend: cannot compile for sm_90")
    b = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    missing = [t for t in ("ptxas", "cuobjdump") if not (b / t).exists()]
    if missing:
        pytest.skip(f"this triton wheel lacks {', '.join(missing)} ({b}): cannot compile for sm_90")


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "profiles"), str(tmp_path), env.get("PYTHONPATH", "")])
    return env


_TOYS = r'''
import triton
import triton.language as tl


@triton.jit
def toy_dot(a, b, c, M, N, K, s_am, STRIDE_ONE, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
            IEEE: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k in range(0, K, BK):
        x = tl.load(a + rm[:, None] * s_am + (k + rk)[None, :] * STRIDE_ONE,
                    mask=(rm[:, None] < M) & ((k + rk)[None, :] < K), other=0.0)
        y = tl.load(b + (k + rk)[:, None] * N + rn[None, :], mask=((k + rk)[:, None] < K) & (rn[None, :] < N),
                    other=0.0)
        if IEEE:
            acc += tl.dot(x, y, input_precision="ieee")
        else:
            acc += tl.dot(x, y)
    tl.store(c + rm[:, None] * N + rn[None, :], acc.to(c.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def toy_spill(x, y, BM: tl.constexpr, BN: tl.constexpr):
    r = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
    v = tl.load(x + r)
    s = tl.sum(v, axis=0)
    m = tl.max(v * s[None, :], axis=1)
    tl.store(y + r, v * m[:, None] + tl.exp(v))
'''

_MACHINERY = r'''
import json, sys
import torch
import kernels_sm90 as K
import toys
from lewm_kernels._utils import launch, record_launches

out = {}
with record_launches(execute=False) as rec:
    for name, dt, bm, ieee in [("bf16_64", torch.bfloat16, 64, False), ("bf16_16", torch.bfloat16, 16, False),
                               ("fp32_ieee", torch.float32, 32, True)]:
        a = torch.empty(300, 192, dtype=dt)
        b = torch.empty(192, 576, dtype=dt)
        c = torch.empty(300, 576, dtype=dt)
        launch(toys.toy_dot, (triton_cdiv := -(-300 // bm), 9), a, b, c, 300, 576, 192, 192, 1,
               tag=name, cost={"flops": 2 * 300 * 576 * 192}, BM=bm, BN=64, BK=64, IEEE=ieee, num_warps=4)
    x = torch.empty(64 * 64)
    launch(toys.toy_spill, (1,), x, torch.empty_like(x), tag="spill", BM=64, BN=64, num_warps=1, maxnreg=40)
spec = K.Specialiser()
for r in rec:
    key, fn, sig, consts, attrs, opts = spec(r)
    a = K.analyse(K.compile_spec(fn, sig, consts, attrs, opts))
    out[r.tag] = dict(sig=sig, consts={str(k): v for k, v in consts.items()},
                      attrs={str(k): v for k, v in attrs.items()}, **a, mma_class=K.mma_class(a["mma"]),
                      occ=K.occupancy(a["regs"], a["smem"], a["num_warps"]))
print("JSON" + json.dumps(out, default=str))
'''


def test_report_machinery_on_toy_kernels(tmp_path):
    _tools_or_skip()
    (tmp_path / "toys.py").write_text(_TOYS)
    script = tmp_path / "machinery.py"
    script.write_text(_MACHINERY)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_env(tmp_path),
                       timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.split("JSON", 1)[1])
    # triton's own specialisation: the int 1 becomes a constexpr, 192 / 576 / 300 as i32 with or without
    # the divisibility-by-16 attribute, pointers to bf16 / fp32
    sig = out["bf16_64"]["sig"]
    assert sig["a"] == "*bf16" and out["fp32_ieee"]["sig"]["a"] == "*fp32"
    assert sig["STRIDE_ONE"] == "constexpr" and sig["M"] == "i32"
    attrs = out["bf16_64"]["attrs"]
    assert "tt.divisibility" in str(attrs["(4,)"]) and "tt.divisibility" not in str(attrs["(3,)"])  # 576 / 300
    # MMA class from the SASS: wgmma for a 64-row bf16 tile, mma.sync for a 16-row one, FMA for fp32 ieee
    assert out["bf16_64"]["mma_class"] == "HGMMA" and out["bf16_64"]["bf16_dot"]
    assert out["bf16_16"]["mma_class"] == "HMMA" and out["bf16_16"]["bf16_dot"]
    assert out["fp32_ieee"]["mma_class"] == "FFMA" and not out["fp32_ieee"]["bf16_dot"]
    for k in ("bf16_64", "bf16_16", "fp32_ieee"):
        assert out[k]["spill_stores"] == 0 and out[k]["regs"] > 0 and out[k]["occ"] >= 1
    # a register cap forces spills: they are seen (ptxas -v) and the SASS has local-memory accesses
    sp = out["spill"]
    assert sp["regs"] <= 40 and sp["spill_stores"] > 0 and sp["spill_loads"] > 0 and sp["local_ops"] > 0


@pytest.mark.slow
def test_planner_and_sigreg_kernels_do_not_spill_and_use_tensor_cores(tmp_path):
    """The gate of issue 10: 0 spill bytes in any planner or SIGReg kernel, tensor-core MMA in every
    bf16 GEMM kernel, compiled for sm_90 at the shapes the planner and a training step use."""
    _tools_or_skip()
    js = tmp_path / "report.json"
    r = subprocess.run([sys.executable, str(REPO / "profiles" / "kernels_sm90.py"), "--configs", "small",
                        "--points", "1", "--coarse", "--csv", "", "--json", str(js)], capture_output=True, text=True,
                       env=_env(tmp_path), timeout=1500, cwd=REPO)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    rep = json.loads(js.read_text())
    configs = {row["config"] for row in rep["rows"]}
    want = {"plan-1env-fp32", "plan-1env-bf16", "plan-1env-bf16-reach", "sigreg-fp32"}
    assert want <= configs, f"no launches recorded for {want - configs}: " \
        f"notes {rep['notes']}"
    legacy = [n for n in rep["notes"] if n.startswith("legacy shim")]
    if rep["problems"] and legacy:
        # the kernels before issue 10's rewrite (launched directly, recorded through the shim) are known to
        # spill in fp32: reported, not a regression; kernels launched through _utils.launch must pass
        bad = [p for p in rep["problems"] if any(r["spec"] in p and r["source"] == "launch" for r in rep["rows"])]
        assert not bad, "\n".join(bad)
        pytest.xfail("kernels not yet launched through lewm_kernels._utils.launch fail the gate:\n"
                     + "\n".join(rep["problems"]))
    assert not rep["problems"], "\n".join(rep["problems"])
    reach = [row for row in rep["rows"] if row["kernel"] == "_reach_cost_kernel"]
    assert reach and {row["config"] for row in reach} == {"plan-1env-bf16-reach"}, "the fused reach cost never launched"
    assert all("HMMA" in row["mma"] or "HGMMA" in row["mma"] for row in reach), [row["mma"] for row in reach]
    # the cost model's occupancy of the persistent rollout kernel is the compiled one
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_model as G
    occ = {int(row["ctas_per_sm"]) for row in rep["rows"] if row["kernel"] == "_rollout_kernel"}
    assert occ == {G.ROLLOUT_CTAS_PER_SM}, f"compiled CTAs per SM {occ}, bench/gpu_model.py assumes " \
                                           f"{G.ROLLOUT_CTAS_PER_SM}"

