"""One training step (eager vs torch.compile vs compile + CUDA graphs) and the data loader's samples/s
from an HDF5 file (pixels cached in RAM vs read from HDF5 per batch).

Every step benchmark is first checked over CHECK_STEPS optimizer steps against the training step
written from its definition (benchutil.plain_training_losses: the same seeded model, AdamW, schedule,
clipping and SIGReg directions in a plain loop, no Trainer), so a wrong optimizer step, schedule or
(for CUDA graphs) a wrong restore of the warm-up steps shows before anything is timed."""
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


CHECK_STEPS = 4


@pytest.fixture(scope="module")
def train_batch(sizes, h5_file, tmp_path_factory):
    """The checked batches (from the Trainer's own sampler) and the plain loop's losses on them."""
    tr = _trainer(sizes, h5_file, tmp_path_factory.mktemp("ref_step"))
    from lewm.data.dataset import BatchSampler
    sampler = BatchSampler(len(tr.train_ds), sizes["train_batch"], tr.cfg.train.seed, 0, CHECK_STEPS)
    batches = [tr.train_ds.batch(idx) for idx in sampler]
    ref = bu.plain_training_losses(tr.cfg, h5_file, bu.DEVICE, batches, CHECK_STEPS)
    return batches, ref


def _step_bench(benchmark, sizes, h5_file, tmp_path_factory, train_batch, sync, name, rtol, **kw):
    batches, ref = train_batch
    tr = _trainer(sizes, h5_file, tmp_path_factory.mktemp(name), **kw)
    got = [float(tr.train_step(px, act)["loss"]) for px, act in batches]  # same initial weights and batches
    for i, (g, r) in enumerate(zip(got, ref)):
        assert abs(g - r) <= rtol * abs(r) + 1e-6, f"{name}: step {i} loss {g:.6f} != plain loop's {r:.6f}"
    px, act = batches[0]
    bu.bench_run(benchmark, lambda: tr.train_step(px, act), sync, sizes["rounds"], warmup=2)
    benchmark.extra_info["samples_per_s"] = px.shape[0] / benchmark.stats.stats.median
    benchmark.extra_info["checked_losses"] = got


@pytest.mark.benchmark(group="train step")
def test_train_step_eager(benchmark, sizes, h5_file, tmp_path_factory, train_batch, sync):
    _step_bench(benchmark, sizes, h5_file, tmp_path_factory, train_batch, sync, "eager", 2e-2 if bu.CUDA else 1e-5)


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
