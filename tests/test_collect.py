"""`lewm collect` and `lewm show`: file layout, determinism across worker counts, bad inputs."""
import os

import h5py
import numpy as np
import pytest

from lewm.cli import main
from lewm.errors import UserError
from lewm.data.collect import WorkerError, collect, episodes
from lewm.data.format import DataError, inspect
from lewm.envs.base import Env
from lewm.envs.tworoom import TwoRoomEnv


class CrashingEnv(TwoRoomEnv):
    """TwoRoom that fails in episode 1 (seed 1): raises, or kills its process with HARD=1."""
    name = "crashing"
    HARD = False

    def step(self, action, render=True):
        if self._seed == 1 and self.t == 3:
            if self.HARD:
                os._exit(3)
            raise RuntimeError("simulator exploded at step 3")
        self.t += 1
        return super().step(action, render)

    def reset(self, seed=None, render=True):
        self._seed, self.t = seed, 0
        return super().reset(seed, render)


class HardCrashingEnv(CrashingEnv):
    HARD = True


def read_all(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f.keys()}, dict(f.attrs)


def no_stray_files(d):
    return [p.name for p in d.iterdir()]


def test_collect_tworoom_layout(tmp_path):
    out = collect("tworoom", 5, tmp_path / "tr.h5", image_size=32, seed=3, progress=False)
    info = inspect(out)
    assert info.num_episodes == 5 and info.image_shape == (32, 32, 3)
    assert set(info.columns) == {"pixels", "action", "ep_len", "ep_offset", "step_idx", "ep_idx", "proprio",
                                 "state"}
    cols, attrs = read_all(out)
    assert cols["proprio"].shape[1] == 2 and cols["state"].shape[1] == 4 and cols["state"].dtype == np.float64
    for e, (off, n) in enumerate(zip(info.ep_offset, info.ep_len)):
        act = cols["action"][off:off + n]
        assert np.isnan(act[-1]).all() and np.isfinite(act[:-1]).all()
        assert (np.abs(act[:-1]) <= 1).all()
        np.testing.assert_array_equal(cols["step_idx"][off:off + n], np.arange(n))
        assert (cols["ep_idx"][off:off + n] == e).all()
        assert n <= 101
        # the agent moved by the recorded actions: row t+1's position from row t's (reference dynamics)
        from lewm.envs.tworoom import move
        for t in range(min(n - 1, 5)):
            np.testing.assert_allclose(move(cols["proprio"][off + t], act[t]), cols["proprio"][off + t + 1])
    for k in ("env", "policy", "noise", "seed", "image_size", "max_steps", "versions", "lewm_version", "created"):
        assert k in attrs, k
    assert attrs["env"] == "tworoom" and attrs["policy"] == "expert" and attrs["noise"] == 2.0
    assert attrs["seed"] == 3 and attrs["image_size"] == 32 and attrs["max_steps"] == 100
    assert "numpy" in info.attrs["versions"]
    assert no_stray_files(tmp_path) == ["tr.h5"]
    # the in-memory generator yields the same episodes
    ep = next(episodes("tworoom", 1, seed=3, image_size=32, start=1))
    off, n = info.ep_offset[1], info.ep_len[1]
    for k, v in ep.items():
        np.testing.assert_array_equal(v, cols[k][off:off + n], err_msg=k)


@pytest.mark.slow
def test_workers_give_the_same_file(tmp_path):
    a = collect("tworoom", 6, tmp_path / "a.h5", image_size=24, seed=10, workers=1, progress=False)
    b = collect("tworoom", 6, tmp_path / "b.h5", image_size=24, seed=10, workers=2, progress=False)
    ca, aa = read_all(a)
    cb, ab = read_all(b)
    assert sorted(ca) == sorted(cb)
    for k in ca:
        np.testing.assert_array_equal(ca[k], cb[k], err_msg=k)
    aa.pop("created"), ab.pop("created")
    assert aa == ab


def test_collect_pusht_rows_restore_their_frames(tmp_path):
    from lewm.envs import make
    out = collect("pusht", 2, tmp_path / "p.h5", image_size=32, max_steps=15, progress=False)
    cols, attrs = read_all(out)
    assert cols["state"].shape == (32, 5) and cols["proprio"].shape == (32, 4)
    assert cols["block_vel"].shape == (32, 3)
    assert attrs["policy"] == "expert" and attrs["max_steps"] == 15
    env = make("pusht", image_size=32)
    env.reset(seed=123)
    for r in (0, 7, 20, 31):
        env.set_state_from_row({k: cols[k][r] for k in ("state", "proprio", "block_vel")})
        np.testing.assert_array_equal(env.render(), cols["pixels"][r])


@pytest.mark.slow
def test_collect_reacher_and_cube(tmp_path):
    r = collect("reacher", 1, tmp_path / "r.h5", image_size=24, max_steps=5, progress=False)
    cols, _ = read_all(r)
    attrs = inspect(r).attrs
    assert attrs["policy"] == "random" and set(attrs["versions"]) >= {"mujoco", "dm_control"}
    assert cols["qpos"].shape == (6, 2) and cols["target_qpos"].shape == (6, 2)
    c = collect("cube", 1, tmp_path / "c.h5", image_size=24, max_steps=2, progress=False)
    info = inspect(c)
    assert info.action_dim == 5 and info.num_rows == 3
    assert {"qpos", "qvel", "cube_pos", "cube_quat", "target_pos", "target_quat", "proprio"} <= set(info.columns)
    assert info.attrs["policy"] == "oracle" and "ogbench" in info.attrs["versions"]


# -- bad inputs ----------------------------------------------------------------------------------------
def test_unknown_environment(tmp_path):
    with pytest.raises(UserError, match="unknown environment 'nope' .*tworoom"):
        collect("nope", 1, tmp_path / "x.h5")


@pytest.mark.parametrize("n", [0, -2])
def test_non_positive_episodes(tmp_path, n):
    with pytest.raises(UserError, match="--episodes must be a positive integer"):
        collect("tworoom", n, tmp_path / "x.h5")


def test_output_directory_missing(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        collect("tworoom", 1, tmp_path / "no" / "x.h5")


def test_output_exists_without_overwrite(tmp_path):
    out = tmp_path / "x.h5"
    out.write_bytes(b"old")
    with pytest.raises(UserError, match="file exists.*--overwrite"):
        collect("tworoom", 1, out, image_size=16)
    assert out.read_bytes() == b"old"
    collect("tworoom", 1, out, image_size=16, overwrite=True, progress=False)
    assert inspect(out).num_episodes == 1


def test_bad_policy_and_noise(tmp_path):
    with pytest.raises(UserError, match="unknown policy 'nope'"):
        collect("tworoom", 1, tmp_path / "x.h5", policy="nope")
    with pytest.raises(UserError, match="--noise"):
        collect("tworoom", 1, tmp_path / "x.h5", noise=-1)
    assert no_stray_files(tmp_path) == []


@pytest.mark.parametrize("env,workers,text", [
    ("test_collect:CrashingEnv", 1, "simulator exploded at step 3"),
    ("test_collect:CrashingEnv", 2, "simulator exploded at step 3"),
    ("test_collect:HardCrashingEnv", 2, "died abruptly"),
])
@pytest.mark.slow
def test_worker_crash_leaves_nothing(tmp_path, env, workers, text):
    out = tmp_path / "x.h5"
    with pytest.raises(WorkerError, match=text) as e:
        collect(env, 4, out, image_size=16, workers=workers, progress=False)
    if "exploded" in text:
        assert "episode 1 (seed 1)" in str(e.value)
    assert no_stray_files(tmp_path) == []


def test_cli_collect_and_show(tmp_path, capsys):
    out = tmp_path / "d.h5"
    assert main(["collect", "tworoom", "--episodes", "2", "--out", str(out), "--image-size", "16",
                 "--no-progress", "--env-arg", "target_other_room=true", "--max-steps", "10"]) == 0
    info = inspect(out)
    assert info.attrs["env_kwargs"] == {"target_other_room": True} and info.attrs["max_steps"] == 10
    assert main(["collect", "tworoom", "--episodes", "0", "--out", str(tmp_path / "e.h5")]) == 2
    assert "--episodes must be a positive integer" in capsys.readouterr().err
    assert main(["collect", "tworoom", "--episodes", "1", "--out", str(out)]) == 2
    assert "file exists" in capsys.readouterr().err

    import imageio
    gif = tmp_path / "ep1.gif"
    assert main(["show", str(out), "--episode", "1", "--out", str(gif)]) == 0
    frames = imageio.v3.imread(gif)
    assert frames.shape[0] == info.ep_len[1] and frames.shape[1] >= 256
    mp4 = tmp_path / "ep0.mp4"
    assert main(["show", str(out), "--episode", "0", "--out", str(mp4), "--fps", "5"]) == 0
    assert mp4.stat().st_size > 0
    assert main(["show", str(out), "--episode", "2"]) == 2
    assert "--episode 2 is out of range" in capsys.readouterr().err
    assert main(["show", str(tmp_path / "missing.h5")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_show_errors_in_python(tmp_path):
    from lewm.data.show import draw_number, show
    with pytest.raises(DataError, match="file not found"):
        show(tmp_path / "missing.h5")
    img = draw_number(np.full((20, 20, 3), 128, np.uint8), 7, 1)
    assert (img[1:6, 1:4] != 128).all()


def test_env_base_interface_is_complete():
    from lewm.envs import make
    for name in ("tworoom", "pusht", "reacher"):
        env = make(name, image_size=16)
        assert isinstance(env, Env) and env.probe_targets
        obs = env.reset(seed=0)
        assert obs["pixels"].shape == (16, 16, 3)
        assert set(env.state_columns) == set(env.row())
        for col, sl, *_ in env.probe_targets.values():
            assert col in env.state_columns and env.row()[col][sl].size > 0
        assert env.render(20).shape == (20, 20, 3)
