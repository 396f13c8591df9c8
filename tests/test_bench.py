"""Smoke test of the benchmark and profiling scripts (bench/, profiles/) at toy sizes on the CPU: they
run, check before timing, print their tables and append well-formed CSV rows; a failed check fails the
run. The numbers themselves are not tested (the machine is shared)."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(args, timeout=120):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_planning_latency_quick(tmp_path):
    out = tmp_path / "pl.csv"
    r = _run(["bench/planning_latency.py", "--quick", "--threads", "1", "--csv", str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    text = r.stdout
    assert "device:" in text and "torch" in text and "timm" in text
    for name in ("(a) reference, re-encode", "(b) reference, encode once", "(c) fast", "(d) DINO-WM-cost"):
        assert f"check {name}" in text and name in text.split("RATIOS", 1)[1]
    assert "FAIL" not in text
    # ratios lead: the summary line comes before the table, whose first numeric columns are ratios
    head = text.split("RATIOS", 1)[1].splitlines()[1]
    assert head.split()[:4] == ["planner", "vs", "(a)", "(d)"]
    rows = _rows(out)
    assert [r["planner"] for r in rows] == ["(a) reference, re-encode", "(b) reference, encode once", "(c) fast",
                                           "(d) DINO-WM-cost"]
    for row in rows:
        assert row["device"] and row["torch"] and row["commit"] and row["date"]
        assert float(row["median_ms"]) > 0 and float(row["p10_ms"]) <= float(row["p90_ms"])
        assert float(row["gflop_per_plan"]) > 0
    assert float(rows[0]["ratio_vs_reference"]) == pytest.approx(1.0)
    assert rows[0]["preset"] == "tiny" and rows[0]["samples"] == "16"


@pytest.mark.slow
def test_planning_latency_mismatch_fails(tmp_path):
    # a tolerance no plan can meet: every check fails, nothing is timed, exit status 1
    out = tmp_path / "pl.csv"
    r = _run(["bench/planning_latency.py", "--quick", "--threads", "1", "--no-dinowm", "--atol", "-1",
              "--csv", str(out)])
    assert r.returncode == 1
    assert "FAILED" in r.stderr and not out.exists()


@pytest.mark.slow
def test_train_throughput_quick(tmp_path):
    out = tmp_path / "tt.csv"
    r = _run(["bench/train_throughput.py", "--quick", "--no-compile", "--threads", "1", "--workers", "0",
              "--csv", str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "RATIOS" in r.stdout and "samples/s" in r.stdout
    modes = [row["mode"] for row in _rows(out)]
    assert modes[:2] == ["data path only (RAM cache)", "data path only (HDF5, 0 workers)"] and "eager" in modes
    assert all(float(row["samples_per_s"]) > 0 for row in _rows(out))


@pytest.mark.slow
def test_trace_scripts_quick(tmp_path):
    r = _run(["profiles/trace_plan.py", "--quick", "--threads", "1", "--out", str(tmp_path)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "aten ops dispatched" in r.stdout and "rollout+cost" in r.stdout
    assert (tmp_path / "plan_reference_cpu.json").stat().st_size > 0
    assert (tmp_path / "plan_fast_cpu.json").stat().st_size > 0
    r = _run(["profiles/trace_train.py", "--quick", "--threads", "1", "--out", str(tmp_path)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "check: profiled step loss" in r.stdout and "backward" in r.stdout
    assert (tmp_path / "train_eager_cpu.json").stat().st_size > 0


def test_dinowm_cost_model_shapes():
    """The DINO-WM-cost model keeps DINO-WM's shapes: 196 patch tokens x 384 from ViT-S/14 (21.6M
    params, as timm's vit_small_patch14_dinov2), 404-d predictor tokens, a frame-causal mask."""
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from dinowm import DinoWMConfig, generate_mask_matrix
    c = DinoWMConfig()
    assert c.num_patches == 196 and c.token_dim == 404
    m = generate_mask_matrix(2, 3)[0, 0]
    assert m.shape == (6, 6) and m[0, 2] == 0 and m[2, 0] == 1 and m[2, 3] == 1 and m[5, 0] == 1
    assert torch.equal(m[:2, :2], torch.ones(2, 2))
