"""One CEM plan: the eager reference planner vs the fast planner, same frames and same noise (the fast
plan is checked against the reference plan before it is timed)."""
from __future__ import annotations

import pytest
import torch

import benchutil as bu

needs_cuda = bu._needs_cuda()


@pytest.fixture(scope="module")
def plan_setup(lewm_model, sizes, device):
    from lewm.plan.cem import CEMPlanner
    kw = sizes["plan"]
    ref = CEMPlanner.from_config(lewm_model, **kw)
    S = lewm_model.cfg.model.image_size
    g = torch.Generator().manual_seed(4)
    start = torch.randint(0, 256, (1, S, S, 3), dtype=torch.uint8, generator=g).to(device)
    goal = torch.randint(0, 256, (1, S, S, 3), dtype=torch.uint8, generator=g).to(device)
    noise = ref.draw_noise(1)
    return ref, start, goal, noise, ref.plan(start, goal, noise)


def _rounds(sizes):
    return max(3, sizes["rounds"] // 2)


@pytest.mark.benchmark(group="CEM plan (1 env)")
def test_plan_reference_reencode(benchmark, lewm_model, plan_setup, sizes, sync):
    """The reference system's cost: start and goal re-encoded every CEM iteration."""
    from lewm.plan.cem import CEMPlanner
    _, start, goal, noise, want = plan_setup
    p = CEMPlanner.from_config(lewm_model, reencode=True, **sizes["plan"])
    got = p.plan(start, goal, noise)
    bu.check_close("plan reference re-encode", got.actions, want.actions, 0, 1e-5)
    bu.bench_run(benchmark, lambda: p.plan(start, goal, noise), sync, _rounds(sizes))


@pytest.mark.benchmark(group="CEM plan (1 env)")
def test_plan_reference(benchmark, plan_setup, sizes, sync):
    ref, start, goal, noise, want = plan_setup
    got = bu.bench_run(benchmark, lambda: ref.plan(start, goal, noise), sync, _rounds(sizes))
    bu.check_close("plan reference (rerun)", got.actions, want.actions, 0, 1e-6)


def _fast(lewm_model, sizes, **kw):
    from lewm.plan.engine import FastPlanner
    return FastPlanner.from_config(lewm_model, backend="auto", **sizes["plan"], **kw)


@pytest.mark.benchmark(group="CEM plan (1 env)")
def test_plan_fast(benchmark, lewm_model, plan_setup, sizes, sync):
    """FastPlanner, backend auto (CPU: the PyTorch KV-cache rollout; CUDA: Triton), no CUDA graph."""
    _, start, goal, noise, want = plan_setup
    p = _fast(lewm_model, sizes, cuda_graph=False)
    bu.check_close("plan fast", p.plan(start, goal, noise).actions, want.actions, 0, 1e-3)
    bu.bench_run(benchmark, lambda: p.plan(start, goal, noise), sync, _rounds(sizes))
    benchmark.extra_info["backend"] = p.backend


@needs_cuda
@pytest.mark.benchmark(group="CEM plan (1 env)")
def test_plan_fast_cuda_graph(benchmark, lewm_model, plan_setup, sizes, sync):
    _, start, goal, noise, want = plan_setup
    p = _fast(lewm_model, sizes, cuda_graph=True)
    bu.check_close("plan fast + CUDA graph", p.plan(start, goal, noise).actions, want.actions, 0, 1e-3)
    bu.bench_run(benchmark, lambda: p.plan(start, goal, noise), sync, sizes["rounds"])
    benchmark.extra_info["backend"] = p.backend
