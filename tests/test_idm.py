"""The inverse-dynamics head (lewm/plan/idm.py, `lewm idm`): trained on the training episodes' frozen
embeddings, saved beside the checkpoint, planner "idm" alone and CEM's first mean (init="idm") in the
reference and the fast planner alike."""
from __future__ import annotations

import json

import pytest
import torch

from lewm.cli import main as cli
from lewm.errors import UserError
from lewm.evals.planning import evaluate
from lewm.model import LeWM
from lewm.plan import CEMPlanner, FastPlanner, make_planner
from lewm.plan.cem import terminal_cost
from lewm.plan.idm import IDM_CONFIG, IDMHead, IDMPlanner, load_idm
from lewm.train_idm import fit_idm

from conftest import one_torch_thread, random_frames, untrained_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def ckpt(tworoom_data, tmp_path_factory):
    """A tiny LeWM that never trained (with the data's action statistics), and its IDM head."""
    path = untrained_checkpoint(tworoom_data, tmp_path_factory.mktemp("ckpt"))
    with one_torch_thread():
        r = fit_idm(path, tworoom_data, steps=300, max_pairs=4000, device="cpu", progress=False)
    return path, r


def test_fit_saves_beside_the_checkpoint(ckpt):
    path, r = ckpt
    assert (path / "idm.safetensors").exists() and r["saved"] == str(path / "idm.safetensors")
    meta = json.loads((path / IDM_CONFIG).read_text())
    assert meta["format"] == "lewm-idm/1" and meta["head"]["horizon"] == 5
    assert r["pairs"] == 4000 and r["heldout_pairs"] > 0 and meta["heldout_mse"] == r["heldout_mse"]
    back = load_idm(path)
    for (k, a), (_, b) in zip(r["head"].state_dict().items(), back.state_dict().items()):
        assert torch.equal(a.cpu(), b), k


def test_idm_planner_acts_from_the_head_and_reports_the_models_cost(ckpt):
    path, r = ckpt
    m, head = LeWM.load(path), load_idm(path)
    pl = make_planner("idm", m, idm=head)
    assert isinstance(pl, IDMPlanner)
    start, goal = random_frames(3, 1), random_frames(3, 2)
    res = pl.plan(start, goal)
    with torch.no_grad():
        z0, zg = m.encode(start), m.encode(goal)
        want = head(z0, zg)
        torch.testing.assert_close(res.actions, want)
        torch.testing.assert_close(res.cost, terminal_cost(m, z0, zg, want[:, None])[:, 0])
    assert res.raw_actions.shape == (3, 25, 2)


def test_cem_starts_from_the_proposal_in_both_planners(ckpt):
    path, _ = ckpt
    m, head = LeWM.load(path), load_idm(path)
    kw = dict(samples=24, elites=4, iterations=2)
    ref = make_planner("cem", m, idm=head, init="idm", **kw)
    fast = make_planner("fast", m, idm=head, init="idm", backend="torch", **kw)
    assert isinstance(ref, CEMPlanner) and isinstance(fast, FastPlanner)
    start, goal = random_frames(2, 3), random_frames(2, 4)
    with torch.no_grad():
        z0, zg = m.encode(start), m.encode(goal)
    torch.testing.assert_close(ref.initial_mean(z0, zg), head(z0, zg))
    noise = ref.draw_noise(2)
    a, b = ref.plan(start, goal, noise), fast.plan(start, goal, noise)
    torch.testing.assert_close(a.actions, b.actions, atol=1e-4, rtol=0)
    plain = make_planner("cem", m, **kw).plan(start, goal, noise)
    assert not torch.allclose(plain.actions, a.actions)  # the start changes the search


def test_evaluate_with_the_head_and_the_mistakes(ckpt, tworoom_data, tmp_path):
    path, _ = ckpt
    r = evaluate(path, "tworoom", tworoom_data, planner="idm", episodes=4, budget=5, device="cpu")
    assert r["config"]["planner"] == "idm" and r["config"]["planner_kw"]["idm"] == str(path)
    assert len(r["successes"]) == 4
    m = LeWM.load(path)
    with pytest.raises(UserError, match="needs the IDM head"):
        make_planner("idm", m)
    with pytest.raises(UserError, match="applies to the CEM planners"):
        make_planner("mppi", m, idm=load_idm(path), init="idm")
    with pytest.raises(UserError, match="horizon is 3"):
        make_planner("cem", m, idm=load_idm(path), init="idm", horizon=3)
    bare = LeWM.load(path).save(tmp_path / "bare")
    with pytest.raises(UserError, match="lewm idm --checkpoint"):
        evaluate(bare, "tworoom", tworoom_data, planner="idm", episodes=2, budget=5, device="cpu")
    assert IDMHead(4, 2, 3)(torch.zeros(5, 4), torch.zeros(5, 4)).shape == (5, 2, 3)


def test_cli_trains_and_evaluates(ckpt, tworoom_data, capsys):
    path, _ = ckpt
    assert cli(["idm", "--checkpoint", str(path), "--data", str(tworoom_data), "--steps", "20", "--max-pairs",
                "500", "--device", "cpu", "--no-progress"]) == 0
    assert "lewm idm:" in capsys.readouterr().out
    assert cli(["eval", "tworoom", "--checkpoint", str(path), "--data", str(tworoom_data), "--planner", "cem",
                "--init", "idm", "--samples", "16", "--elites", "4", "--iterations", "2", "--episodes", "3",
                "--budget", "5", "--device", "cpu", "--no-progress"]) == 0
    assert cli(["idm", "--checkpoint", str(path), "--data", str(tworoom_data), "--steps", "0"]) == 2
    assert "--steps must be a positive integer" in capsys.readouterr().err


@pytest.mark.slow
def test_head_on_a_trained_model_generalises_and_plans(tworoom_data, tworoom_model, tmp_path):
    """On the trained fixture model: the held-out episodes' actions are predicted better than by their
    mean, and the head alone reaches the goals far more often than the random policy (same episodes)."""
    import shutil
    ck = tmp_path / "ck"
    shutil.copytree(tworoom_model, ck)
    with one_torch_thread():
        r = fit_idm(ck, tworoom_data, steps=1000, device="cpu", progress=False)
        ev = evaluate(ck, "tworoom", tworoom_data, planner="idm", device="cpu")
    # the data are the noisy expert (noise 2.0 on unit actions, clipped): most of an action is noise
    assert r["heldout_mse"] < 0.99 * r["zero_mse"], r
    assert ev["success_rate"] >= ev["random_baseline"]["success_rate"] + 0.3, (ev["success_rate"],
                                                                              ev["random_baseline"]["success_rate"])
