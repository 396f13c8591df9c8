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
def test_plan_reference(benchmark, lewm_model, plan_setup, sizes, sync):
    """CEMPlanner, encoding once; checked by evaluating its plan independently: the cost it reports equals
    the terminal cost of rolling its plan out with the model, and no worse than the first mean's (zeros)."""
    ref, start, goal, noise, want = plan_setup
    with torch.no_grad():
        z0, zg = lewm_model.encode(start), lewm_model.encode(goal)
        def cost(actions):
            return ((bu.rollout_by_predict(lewm_model, z0[:, None], actions)[:, -1] - zg) ** 2).sum(-1)
        bu.check_close("plan reference: reported cost vs rollout of its plan", want.cost, cost(want.actions),
                       1e-4, 1e-5)
        zero = cost(torch.zeros_like(want.actions))
        assert bool((want.cost <= zero * (1 + 1e-5)).all()), f"plan cost {want.cost} worse than zeros' {zero}"
    bu.bench_run(benchmark, lambda: ref.plan(start, goal, noise), sync, _rounds(sizes))


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
