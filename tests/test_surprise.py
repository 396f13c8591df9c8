"""Surprise (`lewm surprise`): the surprise series against the model's own predict, the TwoRoom
perturbations, the whole command on a tiny checkpoint, a trained TwoRoom model finding teleportation
surprising, and every bad input named.

Fixtures from conftest.py: `tworoom_data` (TwoRoom expert episodes at 32 px) and `tworoom_model`
(the tiny preset trained on it)."""
import json

import h5py
import numpy as np
import pytest
import torch

import lewm
from lewm.errors import UserError
from lewm.cli import main as cli_main
from lewm.envs import make
from lewm.envs import tworoom as T
from lewm.envs.base import swap_red_green
from lewm.evals.surprise import surprise_series, run_surprise

from conftest import one_torch_thread as one_thread


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return lewm.LeWM(lewm.preset("tiny")).eval()


@pytest.fixture(scope="module")
def untrained_ckpt(tiny, tmp_path_factory):
    return tiny.save(tmp_path_factory.mktemp("surprise_ckpt") / "untrained")


def test_surprise_series_is_the_prediction_error(tiny):
    """s_j = ||predict(z_{j-W..j-1}, a_{j-W..j-1})[-1] - z_j||^2 for j = W .. K-1."""
    g = torch.Generator().manual_seed(0)
    N, K, D, W = 3, 8, tiny.mcfg.embed_dim, tiny.mcfg.history
    z = torch.randn(N, K, D, generator=g)
    a = torch.randn(N, K, tiny.mcfg.action_input_dim, generator=g)
    s = surprise_series(tiny, z, a, batch_size=4)  # several batches
    assert s.shape == (N, K - W)
    with torch.no_grad():
        for j in range(W, K):
            pred = tiny.predict(z[:, j - W:j], a[:, j - W:j])[:, -1]
            ref = (pred - z[:, j]).pow(2).sum(-1).numpy()
            np.testing.assert_allclose(s[:, j - W], ref, rtol=1e-4, atol=1e-5)


def test_red_green_swap_recolours_only_the_agent():
    frame = T.draw(np.array([60.0, 150.0]), 64)
    out = swap_red_green(frame)
    grey = (frame[..., 0] == frame[..., 1]) & (frame[..., 1] == frame[..., 2])
    assert (out[grey] == frame[grey]).all()  # walls, borders and background unchanged
    assert (~grey).sum() > 10
    assert (out[~grey][:, 1] > out[~grey][:, 0]).all()  # the agent is green now


def test_tworoom_teleport():
    env = make("tworoom", image_size=32)
    env.reset(seed=3)
    row = env.row()
    for i in range(50):
        new = env.teleport(row, np.random.default_rng(i), 50.0)
        xy = new["proprio"][:2]
        assert np.linalg.norm(xy - row["proprio"][:2]) >= 50.0
        assert abs(xy[0] - T.WALL_CENTER) > T.WALL_HALF + T.RADIUS  # never inside the wall
        assert np.allclose(new["state"][:2], xy) and np.allclose(new["state"][2:], row["state"][2:])
    assert np.allclose(env.row()["proprio"], row["proprio"])  # the row was copied, the env not touched


def test_cli_end_to_end(tworoom_data, untrained_ckpt, tmp_path, capsys):
    with one_thread():
        rc = cli_main(["surprise", "--checkpoint", str(untrained_ckpt), "--data", str(tworoom_data), "--out",
                       str(tmp_path / "s"), "--trajectories", "6", "--frames", "9", "--t0", "4", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "lewm surprise: tworoom, 6 heldout trajectories of 9 frames" in out
    for v in ("unperturbed", "visual", "physical"):
        assert v in out
    res = json.loads((tmp_path / "s" / "surprise.json").read_text())
    assert res["frames_from"] == "env" and res["render_vs_data_mean_abs_diff"] == 0.0  # the env renders the data
    assert res["steps"] == list(range(3, 9)) and res["t0"] == 4 and res["trajectories"] == 6
    for v in ("unperturbed", "visual", "physical"):
        per = np.array(res["per_trajectory"][v])
        assert per.shape == (6, 6) and np.isfinite(per).all()
        # frame 3 comes before t0: the same frames and so the same surprise in every variant
        np.testing.assert_allclose(per[:, 0], np.array(res["per_trajectory"]["unperturbed"])[:, 0], rtol=1e-5)
    assert set(res["tests"]) == {"visual_vs_unperturbed", "physical_vs_unperturbed", "physical_vs_visual"}
    assert set(res["tests"]["physical_vs_unperturbed"]["at_t0"]) >= {"t", "p", "p_greater", "mean_diff"}
    assert len(res["teleported_rows"]) == 6
    for png in ("surprise.png", "surprise_frames.png"):
        assert (tmp_path / "s" / png).stat().st_size > 5000


@pytest.mark.slow
def test_trained_model_finds_teleportation_surprising(tworoom_data, tworoom_model):
    """Teleporting the agent at t0 gives a much larger prediction error at t0 than the recorded
    trajectory (paired t-test over the held-out trajectories); the recoloured agent too.

    Measured with the conftest fixture (300 episodes at 32 px, 1500 steps), 17 held-out trajectories
    of 10 frames, t0 = 5: surprise at t0 unperturbed 0.48, visual 127, physical 84; physical vs
    unperturbed t = 9.6, p = 5e-8; visual vs unperturbed (max over t0..t0+2) p = 0.005. With train
    seeds 1, 2, 3 instead: physical 54-80 vs unperturbed 0.6-1.0, p <= 6e-7."""
    with one_thread():
        res = run_surprise(tworoom_model, tworoom_data, progress=False)
    v, t = res["variants"], res["tests"]
    assert res["trajectories"] >= 10
    assert v["physical"]["at_t0"]["mean"] > 5 * v["unperturbed"]["at_t0"]["mean"], v
    assert t["physical_vs_unperturbed"]["at_t0"]["p"] < 0.01, t
    assert t["visual_vs_unperturbed"]["window_max"]["p_greater"] < 0.05, t
    # before t0 the three variants are the same frames
    assert v["physical"]["before_t0"]["mean"] == pytest.approx(v["unperturbed"]["before_t0"]["mean"])


def test_without_a_simulator_frames_come_from_the_data(tworoom_data, untrained_ckpt, tmp_path):
    """A data set whose env is unknown here: no physical variant, the visual one swaps R and G."""
    p = tmp_path / "copy.h5"
    with h5py.File(tworoom_data, "r") as src, h5py.File(p, "w") as dst:
        for k in ("pixels", "action", "ep_len", "ep_offset"):
            dst[k] = src[k][()]
        dst.attrs["env"] = "elsewhere"
    logs = []
    with one_thread():
        res = run_surprise(untrained_ckpt, p, trajectories=4, progress=False, log=logs.append)
    assert res["frames_from"] == "data" and set(res["variants"]) == {"unperturbed", "visual"}
    assert "physical_vs_unperturbed" not in res["tests"]
    assert any("no simulator for 'elsewhere'" in m for m in logs)


# -- bad inputs --------------------------------------------------------------------------------------
def test_missing_checkpoint(tworoom_data, tmp_path, capsys):
    rc = cli_main(["surprise", "--checkpoint", str(tmp_path / "nope"), "--data", str(tworoom_data)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--checkpoint" in err and "nope: not found" in err


def test_trajectory_longer_than_the_episodes(tworoom_data, untrained_ckpt):
    with pytest.raises(UserError, match=r"have the 496 rows that --frames 100 at frameskip 5 needs .* lower --frames"):
        run_surprise(untrained_ckpt, tworoom_data, frames=100, t0=10, progress=False)


def test_bad_frames_and_t0(tworoom_data, untrained_ckpt):
    with pytest.raises(UserError, match=r"--frames must be at least history \+ 2 = 5"):
        run_surprise(untrained_ckpt, tworoom_data, frames=4, progress=False)
    with pytest.raises(UserError, match=r"--t0 must be in \[3, 9\]"):
        run_surprise(untrained_ckpt, tworoom_data, frames=10, t0=2, progress=False)
    with pytest.raises(UserError, match="--window must be positive"):
        run_surprise(untrained_ckpt, tworoom_data, window=0, progress=False)
    with pytest.raises(UserError, match="--trajectories must be at least 2"):
        run_surprise(untrained_ckpt, tworoom_data, trajectories=1, progress=False)


def test_action_dim_mismatch(tworoom_data, tmp_path):
    ck = lewm.LeWM(lewm.preset("tiny", model={"action_dim": 5})).save(tmp_path / "a5")
    with pytest.raises(UserError, match="column 'action' has 2 dims but the checkpoint's model has action_dim 5"):
        run_surprise(ck, tworoom_data, progress=False)


def test_data_without_state_columns(tworoom_data, untrained_ckpt, tmp_path):
    p = tmp_path / "nostate.h5"
    with h5py.File(tworoom_data, "r") as src, h5py.File(p, "w") as dst:
        for k in ("pixels", "action", "ep_len", "ep_offset"):
            dst[k] = src[k][()]
        dst.attrs["env"] = "tworoom"
    with pytest.raises(UserError, match="none of the state columns proprio, state that 'tworoom' needs"):
        run_surprise(untrained_ckpt, p, progress=False)


def test_env_disagrees_with_data(tworoom_data, untrained_ckpt, capsys):
    rc = cli_main(["surprise", "--checkpoint", str(untrained_ckpt), "--data", str(tworoom_data), "--env", "cube"])
    err = capsys.readouterr().err
    assert rc == 2 and "--env cube: the data set" in err and "'tworoom'" in err
