"""Training: the loss falls, collapse without SIGReg, exact resume (and its refusal of a changed config),
NaN stop, BatchNorm statistics for eval, compile. Faults (SIGKILL, SIGINT, full disk, corrupt
checkpoints) are in test_faults.py. One torch thread (the module's `single_thread` fixture)."""
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
from lewm.errors import UserError
from lewm.checkpoint import find_latest, load_training
from lewm.train import Trainer, lr_at

from conftest import quiet, synthetic_h5  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return synthetic_h5(tmp_path_factory, episodes=24)


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_schedule_warmup_then_cosine_to_zero():
    total, lr = 1000, 1e-3
    assert lr_at(0, total, lr, 0.01) == 0.0
    assert lr_at(5, total, lr, 0.01) == pytest.approx(5e-4)
    assert lr_at(10, total, lr, 0.01) == pytest.approx(lr)
    assert lr_at(505, total, lr, 0.01) == pytest.approx(lr / 2, rel=1e-3)
    assert lr_at(1000, total, lr, 0.01) == pytest.approx(0.0, abs=1e-12)
    # the reference's warm-up length is int(0.01 N) (at least 1), not round(): 350 steps warm up for 3
    assert lr_at(3, 350, lr, 0.01) == pytest.approx(lr) and lr_at(2, 350, lr, 0.01) < lr
    assert lr_at(1, 50, lr, 0.01) == pytest.approx(lr)  # int(0.5) = 0 -> 1 step


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_resume_refuses_a_changed_config(syn, tmp_path):
    cfg = lewm.preset("tiny", train={"steps": 10, "log_every": 5, "ckpt_every": 5})
    Trainer(cfg, syn, tmp_path / "r", progress=False, log=quiet).run(until=5)
    changed = cfg.replace(train={"steps": 20, "lr": 1e-3})
    with pytest.raises(UserError, match=r"config differs.*train\.lr: 0\.002 -> 0\.001; train\.steps: 10 -> 20"
                                        r".*--allow-config-change"):
        Trainer(changed, syn, tmp_path / "r", resume=True, progress=False, log=quiet)
    with pytest.raises(UserError, match=r"model\.pred_depth: 2 -> 3"):
        Trainer(cfg.replace(model={"pred_depth": 3}), syn, tmp_path / "r", resume=True, progress=False, log=quiet)
    # how often it logs, saves and validates, and how it reads data, may change
    free = cfg.replace(train={"log_every": 1, "ckpt_every": 7, "keep": 1, "val_every": 3, "cache": "none"})
    assert Trainer(free, syn, tmp_path / "r", resume=True, progress=False, log=quiet).step == 5
    notes = []
    tr = Trainer(changed, syn, tmp_path / "r", resume=True, allow_config_change=True, progress=False,
                 log=notes.append)
    assert tr.step == 5 and tr.total_steps == 20
    assert any("train.steps: 10 -> 20" in n for n in notes)


def test_resume_refusal_from_the_command_line(syn, tmp_path, capsys):
    from lewm.cli import main as cli
    base = ["train", "--data", str(syn), "--out", str(tmp_path / "c"), "--preset", "tiny", "--no-progress",
            "--ckpt-every", "4"]
    assert cli(base + ["--steps", "4"]) == 0
    capsys.readouterr()
    assert cli(base + ["--steps", "8", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.steps: 4 -> 8" in err, err
    assert cli(base + ["--steps", "8", "--resume", "--allow-config-change"]) == 0
    assert find_latest(tmp_path / "c").name == "step_00000008"


def test_only_data_errors_mean_no_held_out_loss(syn, tmp_path, monkeypatch):
    """Held-out episodes too short for a clip: no held-out loss, said once. Anything else propagates."""
    import lewm.train as T
    from lewm.data.format import DataError
    real = T.ClipDataset
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # the held-out set
            raise error
        return real(*a, **k)

    monkeypatch.setattr(T, "ClipDataset", flaky)
    cfg = lewm.preset("tiny", train={"steps": 5})
    error = DataError("syn.h5: every episode is shorter than a clip (20 rows)")
    notes = []
    tr = Trainer(cfg, syn, tmp_path / "a", progress=False, log=notes.append)
    assert tr.val_ds is None and tr.validate() is None and any("no held-out loss" in n for n in notes)
    calls.clear()
    error = RuntimeError("a bug, not a data problem")
    with pytest.raises(RuntimeError, match="a bug"):
        Trainer(cfg, syn, tmp_path / "b", progress=False, log=quiet)
    calls.clear()
    error = DataError("syn.h5: column 'pixels' rows 0-99 cannot be read")
    with pytest.raises(DataError, match="cannot be read"):
        Trainer(cfg, syn, tmp_path / "c", progress=False, log=quiet)


def test_checkpoint_completeness_includes_rng(syn, tmp_path):
    cfg = lewm.preset("tiny", train={"steps": 10, "log_every": 5, "ckpt_every": 5})
    tr = Trainer(cfg, syn, tmp_path / "r", progress=False, log=quiet)
    tr.run()
    ck = tmp_path / "r" / "checkpoints"
    (ck / "step_00000010" / "rng.safetensors").unlink()
    assert find_latest(tmp_path / "r").name == "step_00000005"  # the incomplete one is skipped
    with pytest.raises(UserError, match=r"step_00000010 is incomplete: no rng\.safetensors"):
        load_training(ck / "step_00000010", tr.model, tr.opt, "cpu")


def test_bn_statistics_are_reestimated_for_eval(syn, tmp_path):
    """recalibrate_bn() sets every BatchNorm's running mean/var to the plain average of its inputs' batch
    statistics over `bn_batches` training batches, without touching weights or the global RNG."""
    cfg = lewm.preset("tiny", train={"steps": 30, "log_every": 10, "ckpt_every": 30, "bn_batches": 3})
    tr = Trainer(cfg, syn, tmp_path / "r", progress=False, log=quiet)
    tr.run(until=12)
    bns = {n: m for n, m in tr.model.named_modules() if isinstance(m, torch.nn.BatchNorm1d)}
    assert len(bns) == 2  # the projector's and pred_proj's
    seen = {n: [] for n in bns}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen[n].append(i[0].detach().double()))
             for n, m in bns.items()]
    weights = {k: v.clone() for k, v in tr.model.state_dict().items() if "running" not in k and "num_batches" not in k}
    rng = torch.get_rng_state()
    tr.recalibrate_bn()
    for h in hooks:
        h.remove()
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in tr.model.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k
    for n, m in bns.items():
        assert len(seen[n]) == 3
        mean = torch.stack([x.mean(0) for x in seen[n]]).mean(0)
        var = torch.stack([x.var(0, unbiased=True) for x in seen[n]]).mean(0)
        assert torch.allclose(m.running_mean.double(), mean, rtol=1e-4, atol=1e-5), n
        assert torch.allclose(m.running_var.double(), var, rtol=1e-4, atol=1e-5), n
        assert m.momentum == 0.1 and tr.model.training


def test_held_out_curve_is_logged_often(syn, tmp_path):
    """20 held-out points per run by default (val_every 0; at most one per training log), plus one at every
    checkpoint; each in eval mode after the BatchNorm statistics were re-estimated, so it is comparable
    with the training loss."""
    cfg = lewm.preset("tiny", train={"steps": 40, "log_every": 1, "ckpt_every": 25, "bn_batches": 2})
    Trainer(cfg, syn, tmp_path / "r", progress=False, log=quiet).run()
    val = [r for r in metrics(tmp_path / "r") if "val_pred_loss" in r]
    assert [r["step"] for r in val] == sorted({2 * i for i in range(1, 21)} | {25})
    train = [r["pred_loss"] for r in metrics(tmp_path / "r") if "pred_loss" in r]
    # the last held-out point is on the training loss's scale (eval-mode BatchNorm with stale running
    # statistics read 10-100x the training loss on the quickstart)
    assert val[-1]["val_pred_loss"] < 5 * max(train[-2:]), (val[-1], train[-2:])
    cfg = cfg.replace(train={"val_every": 15, "log_every": 10})
    Trainer(cfg, syn, tmp_path / "s", progress=False, log=quiet).run()
    assert [r["step"] for r in metrics(tmp_path / "s") if "val_pred_loss" in r] == [15, 25, 30, 40]


def _batches(tr, n):
    from lewm.data.dataset import BatchSampler
    return [tr.train_ds.batch(i) for i in BatchSampler(len(tr.train_ds), tr.cfg.train.batch_size,
                                                       tr.cfg.train.seed, 0, n)]


@pytest.mark.parametrize("before", [0, 2])
def test_snapshot_restore_undoes_warmup_steps(syn, tmp_path, before):
    """What the CUDA-graph capture relies on, on the CPU: steps taken after snapshot() and undone by
    restore() leave no trace (weights, buffers, AdamW state, RNG), also when AdamW had no state yet."""
    cfg = lewm.preset("tiny", train={"steps": 50})
    ref = Trainer(cfg, syn, tmp_path / "ref", progress=False, log=quiet)
    tr = Trainer(cfg, syn, tmp_path / "tr", progress=False, log=quiet)
    bs = _batches(ref, before + 3)
    torch.manual_seed(1)  # the same dropout draws for both
    want = [float(ref.train_step(*b)["loss"]) for b in bs]
    torch.manual_seed(1)
    for b in bs[:before]:
        tr.train_step(*b)
    snap = tr.snapshot()
    for b in bs[before:before + 3]:  # the "warm-up": three real optimizer steps (and dropout draws)
        tr.train_step(*b)
    tr.restore(snap)
    tr.step = before
    got = [float(tr.train_step(*b)["loss"]) for b in bs[before:]]
    assert got == want[before:]
    for (k, a), (_, b) in zip(ref.model.state_dict().items(), tr.model.state_dict().items()):
        assert torch.equal(a, b), k
    for p_ref, p in zip(ref.model.parameters(), tr.model.parameters()):
        for k in ref.opt.state[p_ref]:
            assert torch.equal(ref.opt.state[p_ref][k], tr.opt.state[p][k]), k


@pytest.mark.gpu
def test_cuda_graph_step_matches_eager_over_several_steps(syn, tmp_path):
    """The captured step (forward, backward, clipping, AdamW with a tensor lr) replayed for 6 optimizer
    steps gives the eager run's losses and weights: the warm-up before capture is undone exactly."""
    cfg = lewm.preset("tiny", model={"pred_dropout": 0.0}, train={"steps": 50, "amp": False})
    eager = Trainer(cfg, syn, tmp_path / "e", device="cuda", progress=False, log=quiet)
    graph = Trainer(cfg, syn, tmp_path / "g", device="cuda", cuda_graphs=True, progress=False, log=quiet)
    bs = _batches(eager, 6)
    le = [float(eager.train_step(*b)["loss"]) for b in bs]
    lg = [float(graph.train_step(*b)["loss"]) for b in bs]
    assert graph.graph is not None
    assert np.allclose(lg, le, rtol=1e-4, atol=1e-6), (lg, le)
    assert le[-1] != le[0]  # the optimizer moved
    for (k, a), (_, b) in zip(eager.model.state_dict().items(), graph.model.state_dict().items()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), k
