"""One training step (eager vs torch.compile vs compile + CUDA graphs) and the data loader's samples/s
from an HDF5 file (pixels cached in RAM vs read from HDF5 per batch).

The step benchmarks check the first step's loss of every path against the eager step's, from the same
initial weights on the same batch, before timing."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import benchutil as bu

needs_cuda = bu._needs_cuda()


@pytest.fixture(scope="module")
def h5_file(tmp_path_factory, sizes):
    from lewm.data.synthetic import write_synthetic
    d = sizes["data"]
    return write_synthetic(tmp_path_factory.mktemp("bench_data") / "synthetic.h5", episodes=d["episodes"],
                           length=d["length"], image_size=d["image_size"], seed=0)


# -- training step -----------------------------------------------------------------------------------------
def _trainer(sizes, h5, out, **kw):
    import lewm
    from lewm.train import Trainer
    cfg = lewm.preset(sizes["train_preset"], train={"batch_size": sizes["train_batch"], "steps": 10_000,
                                                    "cache": "ram", "workers": 0})
    return Trainer(cfg, h5, out, device=str(bu.DEVICE), progress=False, log=lambda *a: None, **kw)


@pytest.fixture(scope="module")
def train_batch(sizes, h5_file, tmp_path_factory):
    tr = _trainer(sizes, h5_file, tmp_path_factory.mktemp("ref_step"))
    px, act = tr.train_ds.batch(np.arange(sizes["train_batch"]))
    out = tr.train_step(px, act)
    return px, act, float(out["loss"])


def _step_bench(benchmark, sizes, h5_file, tmp_path_factory, train_batch, sync, name, rtol, **kw):
    px, act, ref_loss = train_batch
    tr = _trainer(sizes, h5_file, tmp_path_factory.mktemp(name), **kw)
    first = float(tr.train_step(px, act)["loss"])  # same initial weights and batch as the reference
    assert abs(first - ref_loss) <= rtol * abs(ref_loss) + 1e-6, \
        f"{name}: first-step loss {first:.6f} != eager {ref_loss:.6f}"
    bu.bench_run(benchmark, lambda: tr.train_step(px, act), sync, sizes["rounds"], warmup=2)
    benchmark.extra_info["samples_per_s"] = px.shape[0] / benchmark.stats.stats.median
    benchmark.extra_info["first_loss"] = first


@pytest.mark.benchmark(group="train step")
def test_train_step_eager(benchmark, sizes, h5_file, tmp_path_factory, train_batch, sync):
    _step_bench(benchmark, sizes, h5_file, tmp_path_factory, train_batch, sync, "eager", 1e-6)


@pytest.mark.benchmark(group="train step")
def test_train_step_compile(benchmark, sizes, h5_file, tmp_path_factory, train_batch, sync):
    _step_bench(benchmark, sizes, h5_file, tmp_path_factory, train_batch, sync, "compile",
                2e-2 if bu.CUDA else 1e-4, compile=True)


@needs_cuda
@pytest.mark.benchmark(group="train step")
def test_train_step_compile_cuda_graphs(benchmark, sizes, h5_file, tmp_path_factory, train_batch, sync):
    _step_bench(benchmark, sizes, h5_file, tmp_path_factory, train_batch, sync, "graphs", 2e-2,
                compile=True, cuda_graphs=True)


# -- data loader -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def datasets(h5_file):
    from lewm.data.dataset import ClipDataset
    ram = ClipDataset(h5_file, cache="ram")
    disk = ClipDataset(h5_file, cache="none")
    idx = np.arange(0, len(ram), 7)[:16]
    for a, b in zip(ram.batch(idx), disk.batch(idx)):  # the two paths give the same clips
        assert torch.equal(a, b), "cached and HDF5-read batches differ"
    return ram, disk


def _loader_bench(benchmark, ds, sizes, workers):
    from lewm.data.dataset import BatchSampler, make_loader
    d = sizes["data"]
    n = d["batches"]

    def epoch():
        sampler = BatchSampler(len(ds), d["batch"], seed=0, total_steps=n)
        return sum(px.shape[0] for px, _ in itertools.islice(make_loader(ds, sampler, workers), n))

    got = benchmark.pedantic(epoch, rounds=3, iterations=1, warmup_rounds=1)
    assert got == n * d["batch"]
    benchmark.extra_info["samples_per_s"] = got / benchmark.stats.stats.median


@pytest.mark.benchmark(group="data loader")
def test_loader_cached_ram(benchmark, datasets, sizes):
    _loader_bench(benchmark, datasets[0], sizes, 0)


@pytest.mark.benchmark(group="data loader")
def test_loader_hdf5_in_process(benchmark, datasets, sizes):
    _loader_bench(benchmark, datasets[1], sizes, 0)


@pytest.mark.benchmark(group="data loader")
def test_loader_hdf5_2_workers(benchmark, datasets, sizes):
    _loader_bench(benchmark, datasets[1], sizes, 2)
