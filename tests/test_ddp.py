"""Distributed SIGReg: 2 gloo processes give the statistic (and gradient) of the concatenated batch."""
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from lewm.sigreg import draw_directions, sigreg_tbd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, z_full, A, q):
    # Results go back as numpy arrays (pickled by value). A tensor on a multiprocessing queue travels as
    # a shared-memory file descriptor that the parent fetches from this process *after* it has exited
    # (FileNotFoundError in resource_sharer when it already had): the race this test used to have.
    import torch.distributed as dist
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        B = z_full.shape[1] // world
        z = z_full[:, rank * B:(rank + 1) * B].clone().requires_grad_(True)
        stat = sigreg_tbd(z, A)  # detects the process group and all-reduces the cos/sin sums
        # DDP averages gradients over ranks; emulate it so the result is the gradient a step would use
        stat.backward()
        q.put((rank, float(stat.detach()), (z.grad / world).numpy().copy()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_statistic_equals_single_process_on_concatenated_batch():
    g = torch.Generator().manual_seed(0)
    T, B, D, M, world = 3, 24, 8, 16, 2
    z_full = torch.randn(T, B, D, generator=g) * 0.7 + 0.1
    A = draw_directions(D, M, generator=g)
    zf = z_full.clone().requires_grad_(True)
    single = sigreg_tbd(zf, A, distributed=False)
    single.backward()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, z_full, A, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in range(world)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    results.sort(key=lambda r: r[0])
    for rank, stat, grad in results:
        grad = torch.from_numpy(grad)
        assert abs(stat - float(single.detach())) < 1e-5 * float(single.detach()), stat
        # the rank's gradient, after DDP's averaging, equals the global gradient on its slice
        sl = zf.grad[:, rank * (B // world):(rank + 1) * (B // world)]
        assert torch.allclose(grad, sl, rtol=1e-4, atol=1e-6)
    # and it differs from what per-rank statistics (the reference's behaviour) would give
    local = sigreg_tbd(z_full[:, :B // world], A, distributed=False)
    assert abs(float(local) - float(single.detach())) > 1e-3


@pytest.mark.slow
def test_torchrun_two_processes_train(tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    from lewm.data.synthetic import write_synthetic
    data = write_synthetic(tmp_path / "syn.h5", episodes=8, length=30, image_size=32)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "lewm.cli", "train", "--data", str(data),
           "--out", str(tmp_path / "run"), "--preset", "tiny", "--steps", "6", "--batch-size", "8",
           "--log-every", "3", "--ckpt-every", "6", "--no-progress"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "step_00000006" / "model.safetensors").exists()
    assert "x2" in r.stdout  # the banner names the world size
