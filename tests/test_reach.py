"""The reachability head (lewm/plan/reach.py, `lewm reach`): trained on the training episodes' frozen
embeddings, saved beside the checkpoint, the planners' terminal cost l2 | reach | mix in the reference
CEM and the fast planner alike (same draws, same plans)."""
from __future__ import annotations

import json

import pytest
import torch

from lewm.cli import main as cli
from lewm.errors import UserError
from lewm.evals.planning import evaluate
from lewm.model import LeWM
from lewm.plan import make_planner
from lewm.plan.cem import terminal_cost
from lewm.plan.reach import GoalCost, ReachHead, load_reach
from lewm.train_reach import fit_reach

from conftest import one_torch_thread, random_frames, untrained_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def ckpt(tworoom_data, tmp_path_factory):
    path = untrained_checkpoint(tworoom_data, tmp_path_factory.mktemp("ckpt"))
    with one_torch_thread():
        r = fit_reach(path, tworoom_data, pairs=4000, steps=300, device="cpu", progress=False)
    return path, r


def test_fit_saves_beside_the_checkpoint(ckpt):
    path, r = ckpt
    meta = json.loads((path / "reach.json").read_text())
    assert meta["format"] == "lewm-reach/1" and meta["head"]["max_steps"] == 10 and r["pairs"] == 4000
    assert meta["heldout_mae"] == r["heldout_mae"] and 0 <= r["heldout_order_acc"] <= 1
    back = load_reach(path)
    for (k, a), (_, b) in zip(r["head"].state_dict().items(), back.state_dict().items()):
        assert torch.equal(a.cpu(), b), k


def test_goal_cost_modes():
    torch.manual_seed(0)
    head = ReachHead(4, 10).eval()
    pred, zg = torch.randn(2, 3, 4), torch.randn(2, 4)
    l2 = (pred - zg[:, None]).pow(2).sum(-1)
    with torch.no_grad():
        r = head(pred, zg[:, None].expand_as(pred))
        torch.testing.assert_close(GoalCost("l2")(pred, zg), l2)
        torch.testing.assert_close(GoalCost("reach", head)(pred, zg), r)
        torch.testing.assert_close(GoalCost("mix", head, 0.5)(pred, zg), l2 / 4 + 0.5 * r)
    assert ((r > 0) & (r < 1)).all()
    with pytest.raises(UserError, match="needs the reachability head"):
        GoalCost("reach")
    with pytest.raises(UserError, match="--cost must be one of"):
        GoalCost("nope", head)


@pytest.mark.parametrize("cost", ["reach", "mix"])
def test_reference_and_fast_plan_alike_with_the_reach_cost(ckpt, cost):
    path, _ = ckpt
    m, head = LeWM.load(path), load_reach(path)
    kw = dict(samples=24, elites=4, iterations=2, cost=cost, reach=head)
    ref = make_planner("cem", m, **kw)
    fast = make_planner("fast", m, backend="torch", **kw)
    start, goal = random_frames(2, 3), random_frames(2, 4)
    noise = ref.draw_noise(2)
    a, b = ref.plan(start, goal, noise), fast.plan(start, goal, noise)
    torch.testing.assert_close(a.actions, b.actions, atol=1e-4, rtol=0)
    torch.testing.assert_close(a.cost, b.cost, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        z0, zg = m.encode(start), m.encode(goal)
        torch.testing.assert_close(a.cost, terminal_cost(m, z0, zg, a.actions[:, None], ref.goal_cost)[:, 0])
    plain = make_planner("cem", m, samples=24, elites=4, iterations=2).plan(start, goal, noise)
    assert not torch.allclose(plain.cost, a.cost)  # another cost


def test_evaluate_and_the_cli(ckpt, tworoom_data, tmp_path, capsys):
    path, _ = ckpt
    r = evaluate(path, "tworoom", tworoom_data, planner="cem", episodes=3, budget=5, device="cpu",
                 planner_kw={"samples": 16, "elites": 4, "iterations": 2, "cost": "mix", "reach_weight": 2.0})
    pk = r["config"]["planner_kw"]
    assert (pk["cost"], pk["reach"], pk["reach_weight"]) == ("mix", str(path), 2.0)
    assert cli(["reach", "--checkpoint", str(path), "--data", str(tworoom_data), "--steps", "20", "--pairs", "500",
                "--device", "cpu", "--no-progress"]) == 0
    assert "lewm reach:" in capsys.readouterr().out
    bare = LeWM.load(path).save(tmp_path / "bare")
    assert cli(["eval", "tworoom", "--checkpoint", str(bare), "--data", str(tworoom_data), "--cost", "reach",
                "--episodes", "2", "--budget", "5", "--device", "cpu", "--no-progress"]) == 2
    assert "lewm reach --checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_head_on_a_trained_model_orders_held_out_time(tworoom_data, tworoom_model, tmp_path):
    """On the trained fixture model the head generalises to the held-out episodes: a smaller error than the
    best constant, and later frames of an episode rated farther than earlier ones most of the time."""
    import shutil
    ck = tmp_path / "ck"
    shutil.copytree(tworoom_model, ck)
    with one_torch_thread():
        r = fit_reach(ck, tworoom_data, steps=1000, device="cpu", progress=False)
    assert r["heldout_mae"] < 0.8 * r["heldout_mae_constant"], r
    assert r["heldout_order_acc"] > 0.7, r
