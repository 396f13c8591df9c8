"""The fused reachability terminal cost (lewm_kernels/reach_cost.py) against its oracle, the planner's
PyTorch cost reach.GoalCost, and the fast planner's Triton path with `cost="reach" | "mix"` against the eager
reference CEM.

CPU tolerance (fp32, TRITON_INTERPRET=1): atol 1e-5 on costs in [0, ~10] (observed <= 2e-6: only the
summation order of the LayerNorm and the dots differs)."""
from __future__ import annotations

import pytest
import torch

from lewm.plan import CEMPlanner
from lewm.plan.engine import FastPlanner
from lewm.plan.reach import GoalCost, ReachHead
from lewm_kernels.reach_cost import fused_reach_cost, head_tensors

from test_engine import assert_same_plan, frames, make_model

pytestmark = pytest.mark.usefixtures("single_thread")
interp = pytest.mark.interp


def make_head(dim, hidden, depth, seed=0):
    torch.manual_seed(seed)
    head = ReachHead(dim, 10, hidden=hidden, depth=depth).eval()
    with torch.no_grad():  # LayerNorm away from (1, 0): the kernel must read its parameters
        head.net[0].weight.uniform_(0.5, 1.5)
        head.net[0].bias.normal_(std=0.1)
    return head


@interp
@pytest.mark.parametrize("depth,dim,hidden", [(1, 12, 40), (2, 40, 72), (2, 16, 32)])
@pytest.mark.parametrize("mode", ["reach", "mix"])
def test_kernel_equals_goal_cost(depth, dim, hidden, mode):
    head = make_head(dim, hidden, depth)
    E, S = 3, 13  # 39 candidates: a partial last row block; D 40 = a full and a partial BLOCK_K chunk,
    # hidden 72 = four full and one partial BLOCK_O block
    g = torch.Generator().manual_seed(1)
    pred, goal = torch.randn(E * S, dim, generator=g), torch.randn(E, dim, generator=g)
    out = fused_reach_cost(head_tensors(head), pred, goal, mode, weight=0.7)
    with torch.no_grad():
        gc = GoalCost(mode, head, 0.7)(pred.view(E, S, dim), goal).reshape(-1)
    assert out.shape == (E * S,) and out.dtype == torch.float32
    torch.testing.assert_close(out, gc, atol=1e-5, rtol=1e-5)
    assert out.std() > 1e-3  # the candidates' costs differ: the check is not vacuous


@interp
def test_kernel_reads_strided_rows_of_the_rollout():
    """The planner hands it preds[:, -1] of the (N, H, D) rollout: rows with a stride of H * D."""
    head = make_head(8, 24, 2)
    preds = torch.randn(10, 5, 8, generator=torch.Generator().manual_seed(2))
    goal = torch.randn(2, 8, generator=torch.Generator().manual_seed(3))
    out = fused_reach_cost(head_tensors(head), preds[:, -1], goal, "reach")
    with torch.no_grad():
        ref = GoalCost("reach", head)(preds[:, -1].reshape(2, 5, 8), goal).reshape(-1)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_errors_name_the_problem():
    head = make_head(8, 16, 2)
    t = head_tensors(head)
    p, g = torch.randn(6, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match="mode must be one of reach, mix"):
        fused_reach_cost(t, p, g, "l2")
    with pytest.raises(ValueError, match="do not match"):
        fused_reach_cost(t, p, torch.randn(4, 8), "reach")  # 6 candidates over 4 goals
    with pytest.raises(ValueError, match="takes latents of 8 dims, got 4"):
        fused_reach_cost(t, torch.randn(6, 4), torch.randn(2, 4), "reach")
    with pytest.raises(ValueError, match="contiguous rows"):
        fused_reach_cost(t, torch.randn(8, 6).t(), g, "reach")
    with pytest.raises(ValueError, match="depth 3, hidden 16"):
        head_tensors(ReachHead(8, 10, hidden=16, depth=3))


@interp
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["reach", "mix"])
def test_fast_triton_planner_with_the_reach_cost_equals_the_reference(mode):
    model = make_model()
    head = make_head(model.mcfg.embed_dim, 32, 2)
    kw = dict(samples=16, elites=4, iterations=2)
    ref, fast = CEMPlanner(model, **kw), FastPlanner(model, **kw, backend="triton")
    assert fast.backend == "triton"
    for pl in (ref, fast):
        pl.goal_cost = GoalCost(mode, head, 0.5)
    start, goal = frames(2, 3), frames(2, 4)
    noise = ref.draw_noise(2)
    a, b = ref.plan(start, goal, noise), fast.plan(start, goal, noise)
    assert_same_plan(a, b)
    assert fast._reach is not None and fast._reach[0] is head  # the fused kernel ran, its tensors cached
    plain = CEMPlanner(model, **kw).plan(start, goal, noise)
    assert not torch.allclose(plain.cost, a.cost)  # another cost than L2
