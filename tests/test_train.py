"""Training: the loss falls, collapse without SIGReg, exact resume, NaN stop, SIGKILL safety, compile."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import lewm
from lewm.collapse import run_collapse
from lewm.data.synthetic import write_synthetic
from lewm.train import Trainer, find_latest, lr_at


def quiet(*a):
    pass


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn")
    return write_synthetic(d / "syn.h5", episodes=24, length=40, image_size=32, seed=0)


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_schedule_warmup_then_cosine_to_zero():
    total, lr = 1000, 1e-3
    assert lr_at(0, total, lr, 0.01) == 0.0
    assert lr_at(5, total, lr, 0.01) == pytest.approx(5e-4)
    assert lr_at(10, total, lr, 0.01) == pytest.approx(lr)
    assert lr_at(505, total, lr, 0.01) == pytest.approx(lr / 2, rel=1e-3)
    assert lr_at(1000, total, lr, 0.01) == pytest.approx(0.0, abs=1e-12)


def test_training_lowers_prediction_loss_and_writes_artifacts(syn, tmp_path):
    cfg = lewm.preset("tiny", train={"steps": 300, "log_every": 10, "ckpt_every": 150, "keep": 1})
    Trainer(cfg, syn, tmp_path / "run", progress=False, log=quiet).run()
    m = [r for r in metrics(tmp_path / "run") if "loss" in r]
    first = np.mean([r["pred_loss"] for r in m[:2]])
    last = np.mean([r["pred_loss"] for r in m[-2:]])
    assert last < 0.5 * first, (first, last)
    for key in ("loss", "pred_loss", "sigreg", "samples_per_s", "emb_std_mean", "eff_rank", "lr"):
        assert key in m[-1]
    assert any("val_pred_loss" in r for r in metrics(tmp_path / "run"))
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_00000300"]  # keep=1 removed the older one
    model = lewm.LeWM.load(ckpts[-1])  # a training checkpoint is a loadable model folder
    assert not torch.equal(model.action_std, torch.ones(2))  # carries the data set's action stats


def test_collapse_without_sigreg(syn, tmp_path):
    """Thresholds measured on this data: lambda=0 ends with emb std ~0.002 and rank 0 (every
    direction below the 1e-2 floor); lambda=0.09 keeps std ~0.6 and rank ~4 of 32."""
    cfg = lewm.preset("tiny", train={"steps": 300, "log_every": 100, "ckpt_every": 300})
    res = run_collapse(cfg, syn, tmp_path, progress=False)
    off, on = res["0"], res["0.09"]
    assert off["emb_std_mean"] < 0.05 and off["eff_rank"] < 1.0, off
    assert on["emb_std_mean"] > 0.3 and on["eff_rank"] > 2.5, on
    assert (tmp_path / "collapse.json").exists()


def test_resume_reproduces_uninterrupted_run(syn, tmp_path):
    cfg = lewm.preset("tiny", train={"steps": 20, "log_every": 5, "ckpt_every": 10})
    Trainer(cfg, syn, tmp_path / "a", progress=False, log=quiet).run()
    Trainer(cfg, syn, tmp_path / "b", progress=False, log=quiet).run(until=10)
    assert find_latest(tmp_path / "b").name == "step_00000010"
    Trainer(cfg, syn, tmp_path / "b", resume=True, progress=False, log=quiet).run()
    a = {r["step"]: r for r in metrics(tmp_path / "a") if "loss" in r}
    b = {r["step"]: r for r in metrics(tmp_path / "b") if "loss" in r}
    for step in (15, 20):
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5, abs=1e-7), step
        assert a[step]["sigreg"] == pytest.approx(b[step]["sigreg"], rel=1e-5)
    wa = lewm.LeWM.load(tmp_path / "a" / "checkpoints" / "step_00000020").state_dict()
    wb = lewm.LeWM.load(tmp_path / "b" / "checkpoints" / "step_00000020").state_dict()
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), rtol=1e-5, atol=1e-6), k


def test_existing_run_needs_resume(syn, tmp_path):
    cfg = lewm.preset("tiny", train={"steps": 5, "ckpt_every": 5})
    Trainer(cfg, syn, tmp_path / "r", progress=False, log=quiet).run()
    with pytest.raises(Exception, match="--resume"):
        Trainer(cfg, syn, tmp_path / "r", progress=False, log=quiet)


def test_nan_loss_stops_with_last_good_checkpoint(syn, tmp_path, monkeypatch):
    cfg = lewm.preset("tiny", train={"steps": 40, "log_every": 5, "ckpt_every": 10})
    tr = Trainer(cfg, syn, tmp_path / "n", progress=False, log=quiet)
    orig = tr.model.loss

    def poisoned(*a, **k):
        out = orig(*a, **k)
        if tr.step >= 13:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(tr.model, "loss", poisoned)
    tr.forward = tr.model.loss
    with pytest.raises(Exception, match=r"NaN or inf by step 1[45].*step_00000010"):
        tr.run()
    assert find_latest(tmp_path / "n").name == "step_00000010"
    lewm.LeWM.load(tmp_path / "n" / "checkpoints" / "step_00000010")


@pytest.mark.slow
def test_sigkill_leaves_previous_checkpoint_loadable(tmp_path):
    data = write_synthetic(tmp_path / "syn.h5", episodes=16, length=40, image_size=32)
    cmd = [sys.executable, "-m", "lewm.cli", "train", "--data", str(data), "--out", str(tmp_path / "k"),
           "--preset", "tiny", "--steps", "100000", "--ckpt-every", "3", "--keep", "2", "--no-progress"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        root = tmp_path / "k" / "checkpoints"
        while time.time() < deadline and len(list(root.glob("step_*"))) < 2:
            time.sleep(0.05)
        time.sleep(0.37)  # land somewhere in the middle of steps and checkpoint writes
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    latest = find_latest(tmp_path / "k")
    assert latest is not None
    lewm.LeWM.load(latest)
    r = subprocess.run(cmd[:-5] + ["--steps", str(int(latest.name[5:]) + 2), "--resume", "--no-progress",
                                   "--ckpt-every", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.slow
def test_compile_matches_eager_on_cpu(syn, tmp_path):
    cfg = lewm.preset("tiny", model={"pred_dropout": 0.0}, train={"steps": 3, "log_every": 1, "ckpt_every": 3})
    Trainer(cfg, syn, tmp_path / "e", progress=False, log=quiet).run()
    Trainer(cfg, syn, tmp_path / "c", compile=True, progress=False, log=quiet).run()
    e = [r["loss"] for r in metrics(tmp_path / "e") if "loss" in r]
    c = [r["loss"] for r in metrics(tmp_path / "c") if "loss" in r]
    assert np.allclose(e, c, rtol=1e-3, atol=1e-5), (e, c)


def test_collapse_command_with_planning(tworoom_data, tmp_path, capsys):
    from lewm.cli import main as cli
    code = cli(["collapse", "--data", str(tworoom_data), "--out", str(tmp_path), "--preset", "tiny",
                "--steps", "10", "--eval", "tworoom", "--episodes", "4", "--device", "cpu", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "success (95% CI)" in out and out.count("%") >= 4
    res = json.loads((tmp_path / "collapse.json").read_text())
    assert set(res) == {"0", "0.09"} and all(r["episodes"] == 4 for r in res.values())
