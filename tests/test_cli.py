"""The `lewm` command itself: --version, --help, and every out-of-range value as one line with exit 2,
from the config dataclasses (so the CLI, the Python API and the presets check alike)."""
import subprocess
import sys

import pytest

import lewm
from lewm.cli import COMMANDS, main as cli
from lewm.config import ConfigError


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["--version"])
    assert e.value.code == 0
    from importlib.metadata import version
    assert capsys.readouterr().out.strip() == f"lewm {version('lewm')}"


def test_help_lists_every_subcommand_on_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["--help"])
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    for name, (_, help_) in COMMANDS.items():
        line = [x for x in lines if x.split()[:1] == [name]]
        assert len(line) == 1 and line[0].split(None, 1)[1].strip() == help_, (name, lines)
    assert cli([]) == 0  # no command: the same help, success


@pytest.mark.parametrize("flags,needle", [
    (["--val-frac", "-0.1"], "--val-frac: train.val_frac: the held-out fraction of episodes must be in [0, 1)"),
    (["--val-frac", "1"], "--val-frac: train.val_frac"),
    (["--lambda", "-0.5"], "--lambda: sigreg.weight: lambda must be >= 0"),
    (["--weight-decay=-1e-3"], "--weight-decay: train.weight_decay: must be >= 0"),
    (["--lr", "0"], "--lr: train.lr: must be positive"),
    (["--lr", "nan"], "--lr: train.lr: must be positive"),
    (["--steps", "-3"], "--steps: train.steps: must be a positive integer"),
    (["--epochs", "0"], "--epochs: train.epochs"),
    (["--grad-clip", "0"], "--grad-clip: train.grad_clip"),
    (["--num-proj", "0"], "--num-proj: sigreg.num_proj"),
    (["--keep", "-1"], "--keep: train.keep"),
    (["--preset", "pusht", "--image-size", "64"],
     "--image-size: model.image_size: 64 px is not divisible by model.patch_size 14"),
    (["--image-size", "36"], "--image-size: model.image_size: 36 px is not divisible by model.patch_size 8"),
    (["--set", "model.pred_depth=0"], "--set model.pred_depth=0: model.pred_depth: must be a positive integer"),
    (["--set", "model.pred_dropout=1.5"], "--set model.pred_dropout=1.5: model.pred_dropout: must be in [0, 1)"),
    (["--set", "model.nope=1"], "--set model.nope=1: unknown config field"),
    (["--set", "pred_depth=6"], "--set pred_depth=6: the key must be SECTION.FIELD"),
    (["--set", "model.pred_depth"], "--set must look like KEY=VALUE"),
    (["--lr", "1e-3", "--set", "train.lr=2e-3"], "--set train.lr: that field is also given by its own flag"),
])
def test_out_of_range_flag_is_one_line_exit_2(tmp_path, capsys, flags, needle):
    # the data file is never opened: the config is checked first
    argv = ["train", "--data", str(tmp_path / "none.h5"), "--out", str(tmp_path / "run"), "--preset", "tiny",
            "--no-progress", *flags]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert err.count("\n") == 1 and err.startswith("lewm train: error: "), err
    assert not (tmp_path / "run").exists()


def test_set_reaches_any_config_field():
    """`lewm train --set SECTION.FIELD=VALUE` (repeatable) sets any config field: JSON values (numbers,
    true/false), other text as a string; beside the named flags."""
    import argparse
    from lewm.train import add_parser, config_from_args
    ap = argparse.ArgumentParser()
    add_parser(ap.add_subparsers())
    args = ap.parse_args(["train", "--data", "d.h5", "--out", "r", "--preset", "pusht-cpu", "--lr", "3e-4",
                          "--set", "model.pred_depth=6", "--set", "model.pred_dropout=0", "--set", "train.amp=false",
                          "--set", "model.init=hf", "--set", "sigreg.num_proj=512"])
    cfg = config_from_args(args)
    assert (cfg.model.pred_depth, cfg.model.pred_dropout, cfg.train.amp, cfg.model.init, cfg.sigreg.num_proj,
            cfg.train.lr) == (6, 0.0, False, "hf", 512, 3e-4)
    assert lewm.preset("pusht-cpu").model.pred_depth == 3  # the preset itself is untouched


def test_range_checks_live_in_the_config():
    """The Python API and the presets get the same checks as the command line."""
    with pytest.raises(ConfigError, match=r"train\.val_frac") as e:
        lewm.preset("tiny", train={"val_frac": -0.1})
    assert e.value.field == "train.val_frac" and isinstance(e.value, ValueError)
    with pytest.raises(ConfigError, match=r"model\.image_size: 64 px is not divisible"):
        lewm.preset("pusht", model={"image_size": 64})
    with pytest.raises(ConfigError, match=r"sigreg\.weight"):
        lewm.preset("tiny").replace(sigreg={"weight": -1.0})
    with pytest.raises(ConfigError, match=r"plan\.elites: 40 elites is more than plan\.samples 30"):
        lewm.preset("tiny", plan={"samples": 30, "elites": 40})
    with pytest.raises(ConfigError, match=r"train\.lr: must be positive.*and 1 more: train\.weight_decay"):
        lewm.preset("tiny", train={"lr": -1.0, "weight_decay": -1.0})
    # a config edited in place is checked where it is used
    cfg = lewm.preset("tiny")
    cfg.train.weight_decay = -0.1
    with pytest.raises(ConfigError, match=r"train\.weight_decay"):
        lewm.LeWM(cfg)
    from lewm.train import Trainer
    with pytest.raises(ConfigError, match=r"train\.weight_decay"):
        Trainer(cfg, "nowhere.h5", "nowhere")
    # every preset is valid, and lambda 0 (the collapse ablation) is allowed
    for name in lewm.config.preset_names():
        lewm.preset(name)
    lewm.preset("tiny", sigreg={"weight": 0.0})


def test_missing_optional_package_names_the_extra(monkeypatch, tmp_path):
    """Optional features fail with one message naming the extra that installs their package."""
    import numpy as np
    from lewm.errors import UserError
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # `import imageio_ffmpeg` now fails
    monkeypatch.setitem(sys.modules, "gym_pusht", None)
    from lewm.evals.planning import save_results
    frames = [np.zeros((16, 16, 3), np.uint8)] * 3
    with pytest.raises(UserError, match=r"needs the package 'imageio-ffmpeg'.*pip install 'lewm\[video\]'"):
        save_results({"_videos": {0: frames}}, tmp_path, video_format="mp4")
    import lewm.envs
    with pytest.raises(UserError, match=r"environment 'pusht' needs the package 'gym_pusht'.*lewm\[envs\]"):
        lewm.envs.make("pusht", image_size=32)


def test_extras_are_declared():
    """Every optional package the code asks for is in an extra of pyproject.toml, and [test] installs
    them all (so CI's fresh environment exercises them)."""
    import tomllib
    from pathlib import Path
    pp = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    extras = pp["project"]["optional-dependencies"]
    names = {k: " ".join(v) for k, v in extras.items()}
    assert "imageio-ffmpeg" in names["video"]
    for pkg in ("gymnasium", "gym-pusht", "ogbench", "dm_control", "mujoco"):
        assert pkg in names["envs"], pkg
    assert "pytest-benchmark" in names["bench"]
    test = names["test"]
    for extra in ("envs", "bench", "video"):
        assert extra in test.split("[", 1)[1], extra
    assert "matplotlib" in " ".join(pp["project"]["dependencies"])  # plots: a core dependency
