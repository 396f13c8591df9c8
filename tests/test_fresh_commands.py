"""The three commands the project is named for, run as a new user runs them (CI runs this file in a fresh
virtual environment: .ci/run):

* `python bench/planning_latency.py`: tests/test_bench.py runs it at --quick sizes;
* `pytest bench/ --benchmark-only`: run here at quick sizes (LEWM_BENCH_QUICK=1), JSON written to the
  default place (LEWM_BENCH_JSON_DIR points it at a temporary folder);
* `lewm train ... --compile --cuda-graphs`: on a machine without CUDA, one line and exit status 2.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _bench_conftest():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import importlib.util
        spec = importlib.util.spec_from_file_location("lewm_bench_conftest", ROOT / "bench" / "conftest.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_default_benchmark_json_path_works_with_every_pytest_benchmark(tmp_path):
    """pytest-benchmark 5.3 does `open(session.json, "wb")`, 4.x-5.2 `with session.json as fh`: the
    default JSON target supports both, and creates its folder only when written."""
    lazy = _bench_conftest()._LazyFile(tmp_path / "a" / "cpu.json")
    assert not (tmp_path / "a").exists()
    with open(lazy, "wb") as fh:  # 5.3
        fh.write(b"{}")
    assert (tmp_path / "a" / "cpu.json").read_bytes() == b"{}"
    lazy = _bench_conftest()._LazyFile(tmp_path / "b" / "cpu.json")
    with lazy as fh:  # 4.x - 5.2
        fh.write(b"[]")
    assert (tmp_path / "b" / "cpu.json").read_bytes() == b"[]"
    assert str(lazy) == str(tmp_path / "b" / "cpu.json")


@pytest.mark.slow
def test_pytest_bench_benchmark_only_writes_its_json(tmp_path):
    env = dict(os.environ, LEWM_BENCH_QUICK="1", LEWM_BENCH_THREADS="1", LEWM_BENCH_JSON_DIR=str(tmp_path),
               PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "bench/", "--benchmark-only", "-q", "-p", "no:cacheprovider"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "Traceback" not in r.stdout + r.stderr
    files = list(tmp_path.glob("*.json"))
    assert [f.name for f in files] == ["cpu.json" if not torch.cuda.is_available() else files[0].name]
    data = json.loads(files[0].read_text())
    names = {b["name"] for b in data["benchmarks"]}
    for want in ("test_encoder_eager_fp32", "test_rollout_reference_eager", "test_sigreg_eager",
                 "test_plan_reference", "test_plan_fast", "test_train_step_eager", "test_loader_cached_ram"):
        assert want in names, names
    assert data["machine_info"]["lewm_device"] and data["machine_info"]["lewm_versions"]["torch"]
    assert all(b["stats"]["median"] > 0 for b in data["benchmarks"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_train_compile_cuda_graphs_is_refused_in_one_line_without_cuda(tmp_path):
    from lewm.data.synthetic import write_synthetic
    data = write_synthetic(tmp_path / "s.h5", episodes=4, length=30, image_size=32)
    lewm_cmd = shutil.which("lewm") or str(Path(sys.executable).with_name("lewm"))
    r = subprocess.run([lewm_cmd, "train", "--data", str(data), "--out", str(tmp_path / "run"), "--preset", "tiny",
                        "--compile", "--cuda-graphs"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("lewm train: error: --cuda-graphs needs a CUDA device")
    assert not (tmp_path / "run").exists()
