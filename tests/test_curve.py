"""`lewm curve` (lewm/evals/curve.py): the protocol on every checkpoint a run kept, and its plot."""
import csv
import json

import pytest

import lewm
from lewm.cli import main as cli_main
from lewm.evals.curve import run_checkpoints, success_curve
from lewm.train import Trainer
from conftest import one_torch_thread

FAST = {"samples": 16, "elites": 4, "iterations": 2}


@pytest.fixture(scope="module")
def short_run(tworoom_data, tmp_path_factory):
    """The tiny preset trained 6 steps with a checkpoint every 2, all kept."""
    out = tmp_path_factory.mktemp("curve") / "run"
    cfg = lewm.preset("tiny", train={"steps": 6, "ckpt_every": 2, "keep": 0, "log_every": 2})
    with one_torch_thread():
        Trainer(cfg, tworoom_data, out, device="cpu", progress=False, log=lambda *a: None).run()
    return out


def test_run_checkpoints_every(short_run):
    assert [s for s, _ in run_checkpoints(short_run)] == [2, 4, 6]
    assert [s for s, _ in run_checkpoints(short_run, every=2)] == [2, 6]  # the newest always kept
    assert [s for s, _ in run_checkpoints(short_run, every=5)] == [6]


def test_curve_evaluates_every_checkpoint_on_the_same_episodes(short_run, tworoom_data, tmp_path):
    logs = []
    with one_torch_thread():
        recs = success_curve("tworoom", short_run, tworoom_data, planner="cem", episodes=4, seeds=2,
                             out=tmp_path, progress=False, log=logs.append, planner_kw=FAST)
    assert [r["step"] for r in recs] == [2, 4, 6] and len(logs) == 3
    for r in recs:
        assert len(r["per_seed"]) == 2 and r["mean"] == pytest.approx(sum(r["per_seed"]) / 2)
        assert 0 <= r["pooled_ci95"][0] <= r["mean"] <= r["pooled_ci95"][1] <= 1
        assert r["random"] == recs[0]["random"]  # the random policy ran once, on the same episodes
    saved = json.loads((tmp_path / "curve.json").read_text())
    assert [r["step"] for r in saved["records"]] == [2, 4, 6] and saved["planner"] == "cem"
    rows = list(csv.DictReader((tmp_path / "curve.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert float(rows[1]["success_mean"]) == pytest.approx(recs[1]["mean"], abs=1e-4)
    png = (tmp_path / "success_vs_step.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_run_folder(tmp_path, capsys):
    assert cli_main(["curve", "tworoom", "--run", str(tmp_path / "nope"), "--data", "x.h5",
                     "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--run" in err and "nope" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert cli_main(["curve", "tworoom", "--run", str(tmp_path / "empty"), "--data", "x.h5",
                     "--out", str(tmp_path / "o")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
