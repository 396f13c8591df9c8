"""pytest-benchmark suite setup: `pytest bench/ --benchmark-only` from the repository root.

* Sizes: CPU sizes by default, GPU sizes when CUDA is present (the `sizes` fixture).
* Results: unless --benchmark-json / --benchmark-save / --benchmark-autosave is given, the run's JSON
  (all timings, machine info with the device and versions) is written to
  profiles/benchmarks/<device>.json (one file per device kind, overwritten by the next run).
* Every benchmark checks its output against the reference before it is timed (`check_close`).
* Triton and CUDA-graph benchmarks are skipped without CUDA (`needs_cuda`).
* LEWM_BENCH_THREADS=N sets torch's CPU threads (default: torch's own choice).
* LEWM_BENCH_QUICK=1: toy sizes (the tiny preset, a few rounds), so that the whole suite runs in about
  a minute: what tests/test_fresh_commands.py runs. The numbers then mean nothing.
* LEWM_BENCH_JSON_DIR=DIR writes the default JSON to DIR/<device>.json instead.

The repository's pyproject sets `testpaths = ["tests"]`, which only applies when pytest is given no
path: `pytest bench/` collects this folder and nothing else, and plain `pytest` never runs it.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402

CUDA, DEVICE = bu.CUDA, bu.DEVICE
if os.environ.get("LEWM_BENCH_THREADS"):  # e.g. 1 on a shared, loaded machine
    torch.set_num_threads(int(os.environ["LEWM_BENCH_THREADS"]))


def device_tag() -> str:
    if not CUDA:
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")


class _LazyFile(os.PathLike):
    """The default JSON path, created only when pytest-benchmark writes its JSON (so a run without
    benchmarks leaves no empty folder or file behind).

    pytest-benchmark 5.3 calls `open(session.json, "wb")` (the option became a path), 4.x-5.2 use
    `with session.json as fh` (the option was an open file): this object is a path (`os.fspath`
    creates the parent folder) and a context manager, so both work."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fh = None

    def __fspath__(self) -> str:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return str(self.path)

    def __enter__(self):
        self._fh = open(os.fspath(self), "wb")
        return self._fh

    def __exit__(self, *exc):
        self._fh.close()
        return False

    def __str__(self):
        return str(self.path)


def default_json_path() -> Path:
    """profiles/benchmarks/<device>.json, or LEWM_BENCH_JSON_DIR/<device>.json when that is set."""
    root = Path(os.environ["LEWM_BENCH_JSON_DIR"]) if os.environ.get("LEWM_BENCH_JSON_DIR") \
        else bu.PROFILES / "benchmarks"
    return root / f"{device_tag()}.json"


def pytest_sessionstart(session):
    config = session.config
    bs = getattr(config, "_benchmarksession", None)
    if bs is None:
        return
    if not (bs.json or bs.save or bs.autosave):
        bs.json = _LazyFile(default_json_path())


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["lewm_device"] = bu.device_name(DEVICE)
    machine_info["lewm_versions"] = bu.versions()
    machine_info["lewm_commit"] = bu.git_commit()
    machine_info["lewm_load"] = bu.load_average()
    machine_info["lewm_threads"] = torch.get_num_threads()


def pytest_report_header(config):
    return f"lewm bench: {bu.header(DEVICE)}"


# -- sizes ----------------------------------------------------------------------------------------------
CPU_SIZES = {
    # the real architecture (the pusht preset: ViT-tiny/14 at 224 px, 6-layer predictor, D = 192) with
    # batches cut to what two cores do in about a second
    "preset": "pusht",
    "encode_frames": 8,
    "rollout_candidates": 64,
    "sigreg": (4, 128, 192, 1024),  # T, B, D, M: the spec's training size
    "plan": {"samples": 64, "elites": 8, "iterations": 2},
    "train_preset": "tiny",  # 32 px: a pusht-size step is minutes on two cores, and so is its compile
    "train_batch": 16,
    "data": {"episodes": 40, "length": 60, "image_size": 64, "batch": 64, "batches": 10},
    "rounds": 5,
}
GPU_SIZES = {
    "preset": "pusht",  # the reference's full size: ViT-tiny/14 at 224 px, D = 192
    "encode_frames": 512,  # batch 128 x 4 frames
    "rollout_candidates": 300,
    "sigreg": (4, 128, 192, 1024),  # the spec's training size
    "plan": {"samples": 300, "elites": 30, "iterations": 30},
    "train_preset": "pusht",
    "train_batch": 128,
    "data": {"episodes": 32, "length": 100, "image_size": 224, "batch": 128, "batches": 20},
    "rounds": 20,
}


QUICK_SIZES = {
    # a smoke run: every benchmark and check at toy sizes
    "preset": "tiny",
    "encode_frames": 4,
    "rollout_candidates": 16,
    "sigreg": (2, 16, 32, 64),
    "plan": {"samples": 16, "elites": 4, "iterations": 2},
    "train_preset": "tiny",
    "train_batch": 8,
    "data": {"episodes": 8, "length": 30, "image_size": 32, "batch": 8, "batches": 3},
    "rounds": 3,
}


def quick() -> bool:
    return os.environ.get("LEWM_BENCH_QUICK", "") not in ("", "0")


@pytest.fixture(scope="session")
def sizes():
    if quick():
        return QUICK_SIZES
    return GPU_SIZES if CUDA else CPU_SIZES


@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture(scope="session")
def lewm_model(sizes):
    import lewm
    torch.manual_seed(0)
    model = lewm.LeWM(lewm.preset(sizes["preset"])).to(DEVICE).eval()
    bu.randomize_predictor(model)
    return model


@pytest.fixture(scope="session")
def sync():
    return bu.sync_fn(DEVICE)
