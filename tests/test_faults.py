"""Faults, tried: a full disk while writing a checkpoint, a data set or an eval result; truncated and
edited checkpoints; SIGINT during training; SIGKILL at fixed points of a checkpoint write; two
`lewm collect` runs into one path. Each leaves the previous files intact and says what happened in
one line.

The full-disk tests mount a small tmpfs (root only); where mounting is not permitted they skip."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import lewm
import lewm.checkpoint as C
from lewm.errors import UserError
from lewm.cli import main as cli
from lewm.checkpoint import find_latest
from lewm.train import Interrupted, Trainer

from conftest import quiet, synthetic_h5  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return synthetic_h5(tmp_path_factory, episodes=16)


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(kib) -> a folder on a fresh tmpfs of that size (unmounted afterwards)."""
    mounts = []

    def make(kib: int) -> Path:
        d = tmp_path / f"disk{len(mounts)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(kib)}k", "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (root needed): {r.stderr.strip()}")
        mounts.append(d)
        return d

    yield make
    for d in mounts:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def folder_kib(d: Path) -> int:
    return sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file()) // 1024 + 1


def fill(d: Path) -> None:
    """Fill the file system of `d` up to the last byte."""
    with open(d / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        except OSError:
            pass
    with open(d / "filler2", "wb", buffering=0) as f:  # the last partial page
        try:
            while True:
                f.write(b"\0")
                f.flush()
        except OSError:
            pass


def weights(ckpt):
    return lewm.LeWM.load(ckpt).state_dict()


def same_weights(a, b):
    wa, wb = weights(a), weights(b)
    return all(torch.equal(wa[k], wb[k]) for k in wa)


# -- full disk --------------------------------------------------------------------------------------
def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(syn, tmp_path, small_disk, capsys):
    base = ["train", "--data", str(syn), "--preset", "tiny", "--no-progress", "--steps", "10",
            "--ckpt-every", "5", "--keep", "3"]
    assert cli(base + ["--out", str(tmp_path / "probe")]) == 0  # the same run on a large disk
    probe = tmp_path / "probe"
    one = folder_kib(probe / "checkpoints" / "step_00000005")
    disk = small_disk(int(one * 1.5) + folder_kib(probe) - 2 * one)  # room for one checkpoint, not two
    capsys.readouterr()
    assert cli(base + ["--out", str(disk / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "could not write checkpoint" in err and "step_00000010" in err and "disk is full" in err, err
    assert "the last complete checkpoint is" in err and "step_00000005" in err, err
    ck = disk / "run" / "checkpoints"
    assert find_latest(disk / "run") == ck / "step_00000005"
    assert (ck / "latest").read_text() == "step_00000005"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_00000005"]  # no temporary folder left
    lewm.LeWM.load(ck / "step_00000005")
    assert same_weights(ck / "step_00000005", tmp_path / "probe" / "checkpoints" / "step_00000005")


def test_full_disk_while_collecting_keeps_the_previous_file(tmp_path, small_disk, capsys):
    disk = small_disk(512)
    out = disk / "tr.h5"
    argv = ["collect", "tworoom", "--out", str(out), "--image-size", "16", "--max-steps", "20", "--no-progress"]
    assert cli(argv + ["--episodes", "3"]) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert cli(argv + ["--episodes", "400", "--image-size", "64", "--overwrite"]) == 2  # far more than 512 KiB
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tr.h5: writing failed (the disk is full)" in err, err
    assert "the existing file was not changed" in err
    assert out.read_bytes() == before
    assert sorted(p.name for p in disk.iterdir()) == ["tr.h5"]  # no temporary or lock file left


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # imageio's writer, freed later
def test_full_disk_while_writing_eval_results_keeps_the_previous_ones(tmp_path, small_disk):
    from lewm.evals.planning import save_results
    disk = small_disk(64)
    save_results({"success_rate": 0.5, "episodes": 2}, disk)
    before = (disk / "results.json").read_text()
    fill(disk)
    frames = [np.zeros((8, 8, 3), np.uint8)]
    with pytest.raises(UserError, match=r"results\.json: No space left on device \(the disk is full\); the "
                                         r"previous one is intact"):
        save_results({"success_rate": 0.75, "episodes": 2, "per_episode": list(range(5000))}, disk)
    assert (disk / "results.json").read_text() == before
    with pytest.raises(UserError, match=r"could not write video .*episode_000\.gif.*results\.json was not changed"):
        save_results({"success_rate": 0.75, "_videos": {0: frames * 200}}, disk)
    assert (disk / "results.json").read_text() == before
    assert not [p for p in disk.rglob(".*tmp*")]


# -- truncated or edited checkpoints -------------------------------------------------------------------
@pytest.fixture(scope="module")
def run10(syn, tmp_path_factory):
    out = tmp_path_factory.mktemp("run10") / "run"
    cfg = lewm.preset("tiny", train={"steps": 10, "log_every": 5, "ckpt_every": 5})
    Trainer(cfg, syn, out, progress=False, log=quiet).run()
    return out


@pytest.mark.parametrize("name,damage,needle", [
    ("model.safetensors", "truncate", "is unreadable"),
    ("optim.safetensors", "truncate", "is unreadable"),
    ("rng.safetensors", "garbage", "is unreadable"),
    ("state.json", "truncate", "is unreadable"),
    ("state.json", "edit", "has no 'optim'"),
    ("config.json", "truncate", "is unreadable"),
    ("config.json", "edit", "has no \"config\" mapping"),
])
def test_damaged_checkpoint_gets_one_message_naming_the_file(syn, run10, tmp_path, capsys, name, damage, needle):
    run = tmp_path / "run"
    shutil.copytree(run10, run)
    f = run / "checkpoints" / "step_00000010" / name
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        f.write_bytes(b"\x07" * 64)
    elif name == "state.json":
        d = json.loads(data)
        del d["optim"]
        f.write_text(json.dumps(d))
    else:
        f.write_text(json.dumps({"format": "lewm/1"}))
    code = cli(["train", "--data", str(syn), "--out", str(run), "--preset", "tiny", "--no-progress", "--steps", "10",
                "--log-every", "5", "--ckpt-every", "5", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert str(f) in err and needle in err, err
    if name in ("model.safetensors", "config.json"):  # what eval, probe and surprise load
        with pytest.raises((ValueError, FileNotFoundError), match=name.replace(".", r"\.")):
            lewm.LeWM.load(f.parent)


# -- SIGINT ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(syn, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    Trainer(lewm.preset("tiny", train={"steps": 12, "log_every": 4, "ckpt_every": 4}), syn, out,
            progress=False, log=quiet).run()
    return out


@pytest.fixture
def sigint_default():
    """SIGINT as in a terminal (a background job, as CI may run, starts with it ignored)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals: main thread")
@pytest.mark.usefixtures("sigint_default")
def test_sigint_mid_step_saves_and_resume_continues_exactly(syn, uninterrupted, tmp_path, monkeypatch):
    cfg = lewm.preset("tiny", train={"steps": 12, "log_every": 4, "ckpt_every": 4})
    monkeypatch.setattr(C, "_FAULT_HITS", {})
    monkeypatch.setenv("LEWM_FAULT", "step_mid@6:INT")  # Ctrl-C after the backward of step 6
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted, match=r"at step 6 of 12: checkpoint .*step_00000006 written; continue with "
                                          r"--resume"):
        Trainer(cfg, syn, tmp_path / "r", progress=False, log=quiet).run()
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored
    assert find_latest(tmp_path / "r").name == "step_00000006"
    monkeypatch.delenv("LEWM_FAULT")
    Trainer(cfg, syn, tmp_path / "r", resume=True, progress=False, log=quiet).run()
    assert same_weights(tmp_path / "r" / "checkpoints" / "step_00000012",
                        uninterrupted / "checkpoints" / "step_00000012")


@pytest.mark.usefixtures("sigint_default")
def test_second_sigint_stops_at_once_and_says_nothing_was_saved(syn, tmp_path, monkeypatch):
    cfg = lewm.preset("tiny", train={"steps": 12, "log_every": 4, "ckpt_every": 4})
    monkeypatch.setattr(C, "_FAULT_HITS", {})
    monkeypatch.setenv("LEWM_FAULT", "step_mid@6:INT")
    tr = Trainer(cfg, syn, tmp_path / "r", progress=False, log=quiet)
    real = tr.recalibrate_bn

    def second_ctrl_c():  # the second Ctrl-C arrives while the interrupt's checkpoint is prepared
        if tr.step == 6:
            os.kill(os.getpid(), signal.SIGINT)
        real()

    tr.recalibrate_bn = second_ctrl_c
    with pytest.raises(Interrupted, match=r"stopped at once at step 6: no checkpoint written for it; the last "
                                          r"complete checkpoint is .*step_00000004"):
        tr.run()
    assert find_latest(tmp_path / "r").name == "step_00000004"
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == ["latest", "step_00000004"]


def test_ignored_sigint_stays_ignored(syn, tmp_path, monkeypatch):
    """Under nohup or as a background job SIGINT is ignored: training does not take it over."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        monkeypatch.setattr(C, "_FAULT_HITS", {})
        monkeypatch.setenv("LEWM_FAULT", "step_mid@3:INT")
        cfg = lewm.preset("tiny", train={"steps": 6, "log_every": 3, "ckpt_every": 6})
        Trainer(cfg, syn, tmp_path / "r", progress=False, log=quiet).run()  # runs to the end
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert find_latest(tmp_path / "r").name == "step_00000006"
    finally:
        signal.signal(signal.SIGINT, old)


@pytest.mark.slow
def test_sigint_from_the_command_line_exits_130_with_the_checkpoint(syn, tmp_path):
    env = dict(os.environ, LEWM_FAULT="step_mid@5:INT", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "lewm.cli", "train", "--data", str(syn), "--out", str(tmp_path / "r"),
                        "--preset", "tiny", "--steps", "20", "--ckpt-every", "100", "--no-progress"],
                       capture_output=True, text=True, timeout=600, env=env,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not ignored (CI)
    assert r.returncode == 130, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("lewm train: interrupted: at step 5 of 20: checkpoint ") and "--resume" in last, r.stderr
    assert find_latest(tmp_path / "r").name == "step_00000005"


# -- SIGKILL at fixed points -------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("point,latest", [
    ("step_mid@7", "step_00000004"),            # mid-step: the last checkpoint stands
    ("ckpt_mid_write@2", "step_00000004"),      # a half-written temporary folder
    ("ckpt_before_rename@2", "step_00000004"),  # complete but not renamed into place
    ("ckpt_before_latest@2", "step_00000004"),  # renamed, `latest` (the commit point) not updated yet
    ("ckpt_before_prune@2", "step_00000008"),   # `keep` not applied yet
])
def test_sigkill_at_fixed_points_then_resume_continues_exactly(syn, uninterrupted, tmp_path, point, latest):
    env = dict(os.environ, LEWM_FAULT=point, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lewm.cli", "train", "--data", str(syn), "--out", str(tmp_path / "r"),
           "--preset", "tiny", "--steps", "12", "--log-every", "4", "--ckpt-every", "4", "--keep", "1",
           "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    got = find_latest(tmp_path / "r")
    assert got is not None and got.name == latest
    lewm.LeWM.load(got)
    cfg = lewm.preset("tiny", train={"steps": 12, "log_every": 4, "ckpt_every": 4, "keep": 1})
    Trainer(cfg, syn, tmp_path / "r", resume=True, progress=False, log=quiet).run()
    ck = tmp_path / "r" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir() if not p.name.startswith(".")) == ["latest", "step_00000012"]
    assert same_weights(ck / "step_00000012", uninterrupted / "checkpoints" / "step_00000012")


# -- two collects into one path ---------------------------------------------------------------------------
def test_two_collects_into_one_path_cannot_corrupt_each_other(tmp_path):
    from lewm.data.format import DataError, H5Writer, inspect
    out = tmp_path / "d.h5"
    ep = {"pixels": np.zeros((5, 8, 8, 3), np.uint8), "action": np.zeros((5, 2), np.float32)}
    a = H5Writer(out)
    a.add_episode(ep)
    with pytest.raises(DataError, match=r"d\.h5: another process \(pid \d+\) is writing this file"):
        H5Writer(out)  # a second writer, while the first one writes
    with pytest.raises(DataError, match="another process"):
        H5Writer(out, overwrite=True)
    a.close()
    assert inspect(out).num_episodes == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.h5"]
    # a file that appears under the name while a writer (without --overwrite) writes is never replaced
    out2 = tmp_path / "e.h5"
    b = H5Writer(out2)
    b.add_episode(ep)
    shutil.copy(out, out2)
    with pytest.raises(DataError, match="file appeared while this run was writing"):
        with b:
            pass
    assert inspect(out2).num_episodes == 1


@pytest.mark.slow
def test_two_collect_processes_at_once(tmp_path):
    out = tmp_path / "c.h5"
    cmd = [sys.executable, "-m", "lewm.cli", "collect", "tworoom", "--episodes", "300", "--image-size", "32",
           "--out", str(out), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    res = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in res)
    assert codes == [0, 2], res  # one wrote the file; the other was refused with one line
    err = [e for c, e in res if c == 2][0]
    assert "another process" in err or "file exists" in err or "file appeared" in err, err
    from lewm.data.format import inspect
    assert inspect(out).num_episodes == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5"]
