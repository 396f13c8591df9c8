"""bench/gpu_model.py: the analytic GPU cost model, checked by hand-computable numbers on toy
launches, and its launch list checked to come from the planner's code path (the counts are affine in
the CEM iterations, and the model's scaling from two iteration counts equals the direct model)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "profiles"))

import gpu_model as G  # noqa: E402
import launches as L  # noqa: E402
from lewm_kernels._utils import launch, record_launches  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


@triton.jit
def _toy(x, y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y + offs, tl.load(x + offs, mask=offs < n), mask=offs < n)


def _toy_records(dtype, grid, cost):
    x = torch.empty(4096, dtype=dtype)
    with record_launches(execute=False) as rec:
        launch(_toy, grid, x, torch.empty_like(x), 4096, tag="toy", cost=cost, BLOCK=64)
    assert len(rec) == 1 and rec[0].tag == "toy" and rec[0].grid == tuple(grid)
    return L.Recording("toy", {}, launches=list(rec))


def test_one_compute_bound_launch_is_flops_over_peak_plus_gap():
    dev = G.DEVICES["H100"]
    flops = 2 * 300 * 576 * 192 * 1000
    # bf16 tensors, no SASS: the HMMA class, half the tensor-core rate; 264 CTAs = 2 full waves on 132 SMs
    rec = _toy_records(torch.bfloat16, (264,), {"flops": flops, "hbm_bytes": 1000, "l2_bytes": 1000})
    t = G.model_recording(rec, dev, "fast", "dtype", {})
    expect_us = G.GAP_US + flops / (790e12 * 0.5) * 1e6
    assert t.t_us == pytest.approx(expect_us, rel=1e-9)
    assert t.launches == 1 and t.flops == flops and t.ops == 0
    # fp32 tensors: the FMA rate
    rec = _toy_records(torch.float32, (264,), {"flops": flops})
    assert G.model_recording(rec, dev, "fast", "dtype", {}).t_us == pytest.approx(
        G.GAP_US + flops / 60e12 * 1e6, rel=1e-9)


def test_memory_bound_launch_and_wave_quantisation():
    h100, h200 = G.DEVICES["H100"], G.DEVICES["H200"]
    nbytes = 3.35e9  # 1 ms at the H100's HBM rate
    rec = _toy_records(torch.float32, (132,), {"flops": 1, "hbm_bytes": nbytes})
    assert G.model_recording(rec, h100, "fast", "dtype", {}).t_us == pytest.approx(G.GAP_US + 1000.0)
    assert G.model_recording(rec, h200, "fast", "dtype", {}).t_us == pytest.approx(G.GAP_US + 1000.0 * 3.35 / 4.8)
    # 133 CTAs: a second wave for one CTA, so the work of 264 CTA slots
    rec = _toy_records(torch.float32, (133,), {"hbm_bytes": nbytes})
    assert G.model_recording(rec, h100, "fast", "dtype", {}).t_us == pytest.approx(
        G.GAP_US + 1000.0 * 264 / 133)
    # L2: 132 CTAs draw the aggregate rate; 33 CTAs only 33 x one SM's rate
    rec = _toy_records(torch.float32, (132,), {"l2_bytes": 5.5e9})
    assert G.model_recording(rec, h100, "fast", "dtype", {}).t_us == pytest.approx(G.GAP_US + 1000.0)
    rec = _toy_records(torch.float32, (33,), {"l2_bytes": 5.5e9})
    assert G.model_recording(rec, h100, "fast", "dtype", {}).t_us == pytest.approx(
        G.GAP_US + 5.5e9 / (33 * G.SM_L2) * 1e6)
    # no cost dict: the gap only, counted as missing
    rec = _toy_records(torch.float32, (8,), None)
    t = G.model_recording(rec, h100, "fast", "dtype", {})
    assert t.t_us == pytest.approx(G.GAP_US) and t.missing_cost == 1


def test_persistent_kernel_phases_critical_path():
    dev = G.DEVICES["H100"]
    per_sm_fma = 60e12 / 132
    # phase A: 264 items over 132 CTAs (2 rounds) of 1 us each, then the hand-off
    fa = per_sm_fma * 1e-6
    phases = [{"name": "A", "items": 264, "flops": fa, "l2_bytes": 0}]
    rec = _toy_records(torch.float32, (132,), {"flops": 264 * fa, "hbm_bytes": 0, "phases": phases})
    t = G.model_recording(rec, dev, "fast", "dtype", {})
    assert t.t_us == pytest.approx(G.GAP_US + 2 * 1.0 + G.SYNC_US, rel=1e-9)
    # phase B: 10 items of 1 us, then a serial tail of 1 MB read by one SM after they all arrived
    phases = [{"name": "B", "items": 10, "flops": fa, "l2_bytes": 0, "tail_bytes": 1e6, "tail_trips": 2}]
    rec = _toy_records(torch.float32, (132,), {"phases": phases})
    expect = G.GAP_US + 1.0 + G.SYNC_US + 1e6 / G.SM_L2 * 1e6
    assert G.model_recording(rec, dev, "fast", "dtype", {}).t_us == pytest.approx(expect, rel=1e-9)
    # an L2-bound phase of 40 items: each of the 40 SMs reads at one SM's rate
    phases = [{"name": "C", "items": 40, "flops": 0, "l2_bytes": 1e6}]
    rec = _toy_records(torch.float32, (132,), {"phases": phases})
    tau = 1e6 / min(G.SM_L2, 5.5e12 / 40) * 1e6
    assert G.model_recording(rec, dev, "fast", "dtype", {}).t_us == pytest.approx(G.GAP_US + tau + G.SYNC_US)
    # a latency-bound phase: 100 dependent L2 round trips per item, whatever its bytes and FLOPs
    phases = [{"name": "D", "items": 40, "flops": fa, "l2_bytes": 1e3, "trips": 100, "tail_trips": 10}]
    rec = _toy_records(torch.float32, (132,), {"phases": phases})
    expect = G.GAP_US + 100 * G.LAT_US + G.SYNC_US + 10 * G.LAT_US
    assert G.model_recording(rec, dev, "fast", "dtype", {}).t_us == pytest.approx(expect)


def test_critical_path_is_the_phases_with_unlimited_sms():
    dev = G.DEVICES["H100"]
    fa = 60e12 / 132 * 1e-6  # 1 us of one SM's FMA rate
    # 264 items of 1 us on 132 CTAs: 2 rounds in the launch, 1 on the critical path; then a 2-trip tail
    phases = [{"name": "A", "items": 264, "flops": fa, "l2_bytes": 0, "tail_trips": 2},
              {"name": "B", "items": 1, "flops": 0, "l2_bytes": 0, "trips": 10}]
    rec = _toy_records(torch.float32, (132,), {"phases": phases})
    cp, n = G.critical_path_us(rec.launches[0], dev, "FFMA")
    assert n == 2
    assert cp == pytest.approx(1.0 + G.SYNC_US + 2 * G.LAT_US + 10 * G.LAT_US + G.SYNC_US)
    t = G.model_recording(rec, dev, "fast", "dtype", {}).t_us
    assert t == pytest.approx(G.GAP_US + cp + 1.0)  # the second round of A is the SMs' share
    # an L2-bound phase: with unlimited SMs each item reads at one SM's full rate
    phases = [{"name": "C", "items": 400, "flops": 0, "l2_bytes": 1e6}]
    rec = _toy_records(torch.float32, (132,), {"phases": phases})
    cp, _ = G.critical_path_us(rec.launches[0], dev, "FFMA")
    assert cp == pytest.approx(1e6 / G.SM_L2 * 1e6 + G.SYNC_US)
    assert cp < G.model_recording(rec, dev, "fast", "dtype", {}).t_us
    # not persistent: no phases, no critical path of its own
    rec = _toy_records(torch.float32, (132,), {"flops": fa})
    assert G.critical_path_us(rec.launches[0], dev, "FFMA") == (0, 0)


def test_rollout_phase_costs_count_the_epilogue_where_it_runs():
    """The fused epilogue of a split GEMM (its last item, alone) is a serial tail; as RED phases it is
    spread over items of a few rows: the model must see the difference (that is why RED exists)."""
    import lewm
    from lewm.plan.engine import pack_predictor
    from lewm_kernels.rollout import build_phases, phase_costs, rollout_config
    m = lewm.LeWM(lewm.preset("pusht")).eval()
    w = pack_predictor(m, dtype=torch.bfloat16).to(device="meta")
    dev = G.DEVICES["H100"]
    times = {}
    for rr in (0, 4):
        cfg = rollout_config(w, 300, gpu=True, sms=132, override={"red_rows": rr})
        cs = phase_costs(w, build_phases(w, 300, 1, 5, cfg), cfg)
        att = [c for c in cs if c["name"].startswith("attention")]
        assert all(c["trips"] > 0 for c in cs)
        assert all((c["tail_trips"] > 0) == (rr == 0) for c in att)
        times[rr] = sum(G._phase_us(c, dev, dev["tc"], 132) for c in cs)
    assert times[4] < 0.7 * times[0]


def test_eager_reference_is_host_bound():
    dev = G.DEVICES["H100"]
    ops = [L.OpRecord("aten.add.Tensor", True, 0, 4096, "float32"),
           L.OpRecord("aten.view.default", False, 0, 0, "float32"),
           L.OpRecord("aten.mm.default", True, int(120e6), 0, "float32")]  # 2 us of FMA: under the host cost
    rec = L.Recording("plan", {}, ops=ops)
    t = G.model_recording(rec, dev, "reference", "dtype", {})
    assert t.ops == 2 and t.t_us == pytest.approx(2 * G.HOST_US[1]) and t.t_low_us == pytest.approx(2 * G.HOST_US[0])
    big = L.OpRecord("aten.mm.default", True, int(60e12 * 1e-3), 0, "float32")  # 1 ms of device time
    t = G.model_recording(L.Recording("plan", {}, ops=[big]), dev, "reference", "dtype", {})
    assert t.t_us == pytest.approx(1000.0)
    # inside the fast planner's graph the same ops cost the gap plus their device time
    t = G.model_recording(rec, dev, "fast", "dtype", {})
    assert t.t_us == pytest.approx(2 * G.GAP_US + 4096 / 3.35e12 * 1e6 + 120e6 / 60e12 * 1e6)


def test_scaling_is_affine():
    a = G.Totals(t_us=10, launches=3, ops=5)
    b = G.Totals(t_us=14, launches=5, ops=9)
    c = a.scaled(b, 1, 2, 30)
    assert (c.t_us, c.launches, c.ops) == (10 + 4 * 29, 3 + 2 * 29, 5 + 4 * 29)


@pytest.fixture(scope="module")
def tiny_model():
    return L.build_model("tiny")


CEM = dict(samples=8, elites=3, horizon=3)


@pytest.mark.parametrize("planner", ["fast", "reference"])
def test_launch_list_comes_from_the_code_path(tiny_model, planner):
    """Counts at 1, 2, 3 iterations are affine with a positive slope, and the model scaled from
    (1, 2) to 3 iterations equals the model of the plan recorded at 3."""
    recs = {i: L.record_plan(tiny_model, planner, 2, torch.float32, iterations=i, fake=False, **CEM)
            for i in (1, 2, 3)}
    n = {i: (len(r.launches), len(r.kernel_ops)) for i, r in recs.items()}
    for k in (0, 1):
        assert n[3][k] - n[2][k] == n[2][k] - n[1][k], n
    assert n[2][1] > n[1][1]  # aten ops per iteration (sampling, top-k, refit, and the eager rollout)
    if planner == "fast":
        assert n[2][0] > n[1][0], f"no Triton launch per CEM iteration recorded: {recs[1].notes}"
    dev = G.DEVICES["H200"]
    ts = {i: G.model_recording(recs[i], dev, planner, "dtype", {}) for i in recs}
    s = ts[1].scaled(ts[2], 1, 2, 3)
    assert s.t_us == pytest.approx(ts[3].t_us, rel=1e-9)
    assert s.flops == pytest.approx(ts[3].flops, rel=1e-9)


def test_run_prints_targets_and_measured_rows(tiny_model, tmp_path, capsys, monkeypatch):
    meas = tmp_path / "planning_latency.csv"
    meas.write_text("date,device,planner,envs,samples,iterations,median_ms,dtype\n"
                    "x,NVIDIA H100 80GB HBM3,(c) fast + CUDA graph,1,8,2,1.5,float32\n")
    monkeypatch.setattr(L, "build_model", lambda preset="tiny", seed=0: tiny_model)
    rows = G.run(["1env-fp32"], iterations=2, mma_mode="dtype", measured_csv=meas, preset="tiny",
                 cem=dict(samples=8, elites=3, horizon=3), fake=False)
    G.print_report(rows)
    out = capsys.readouterr().out
    assert "modelled" in out and "targets:" in out
    fast_h100 = [r for r in rows if r["planner"] == "fast" and "H100" in r["device"]][0]
    assert fast_h100["measured_ms"] == "1.500" and fast_h100["model_error"]
    ref = [r for r in rows if r["planner"] == "reference_reencode" and "H100" in r["device"]][0]
    assert float(ref["ratio_vs_reference"]) == pytest.approx(1.0)
    path = G.append_csv(tmp_path / "gpu_model.csv", rows)
    assert path.read_text().splitlines()[0].startswith("date,commit,device,config,planner,launches")
    assert math.isfinite(float(fast_h100["modelled_ms"]))


def test_mma_class_from_the_kernel_report(tmp_path):
    """--mma report: the class of a kernel comes from profiles/kernels_sm90.csv's rows (same kernel and dtype)."""
    rep = tmp_path / "kernels_sm90.csv"
    rep.write_text(f"date,commit,triton,kernel,dtype,mma,spills\n"
                   f"2026-12-02,abc,{triton.__version__},_toy,bfloat16,HGMMA:4 FFMA:10,0\n"
                   f"2026-12-02,abc,{triton.__version__},_toy,float32,FFMA:99,8\n")
    cache = {"report": G._report_classes(rep)}
    flops = 2 * 300 * 576 * 192 * 1000
    dev = G.DEVICES["H100"]
    rec = _toy_records(torch.bfloat16, (264,), {"flops": flops})
    t = G.model_recording(rec, dev, "fast", "report", cache)
    assert t.t_us == pytest.approx(G.GAP_US + flops / 790e12 * 1e6, rel=1e-9) and not t.spilling
    rec = _toy_records(torch.float32, (264,), {"flops": flops})
    t = G.model_recording(rec, dev, "fast", "report", cache)
    assert t.t_us == pytest.approx(G.GAP_US + flops / 60e12 * 1e6, rel=1e-9) and t.spilling == {"_toy"}
