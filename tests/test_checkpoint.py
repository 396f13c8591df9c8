"""lewm/checkpoint.py: the one home of checkpoints. A checkpoint written by format lewm/1 is kept in
tests/data (the tiny preset, random weights) and must keep loading and computing what it computed, so
a change that breaks old checkpoints fails here; an unknown format version is refused by name."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import lewm
from lewm import checkpoint
from lewm.errors import CheckpointError, UserError

KEPT = Path(__file__).parent / "data" / "checkpoint_lewm1_tiny"


def test_kept_lewm1_checkpoint_loads_and_computes_what_it_did():
    m = lewm.LeWM.load(KEPT)
    assert m.cfg.name == "tiny" and not m.training
    exp = json.loads((KEPT / "expected.json").read_text())
    rng = np.random.default_rng(1)
    px = torch.from_numpy(rng.integers(0, 256, (1, 3, 32, 32, 3), dtype=np.uint8))
    a = torch.from_numpy(rng.standard_normal((1, 3, m.mcfg.frameskip * m.mcfg.action_dim)).astype(np.float32))
    with torch.no_grad():
        z = m.encode(px)
        zp = m.predict(z, a)
    torch.testing.assert_close(z[0], torch.tensor(exp["z"]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(zp[0, -1], torch.tensor(exp["z_pred_last"]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.action_std, torch.tensor([0.5, 2.0]))


def test_resolve_takes_folder_file_and_run_folder(tmp_path):
    assert checkpoint.resolve(KEPT) == KEPT
    assert checkpoint.resolve(KEPT / "config.json") == KEPT
    run = tmp_path / "run" / checkpoint.CKPT_DIR
    for step in (5, 10):  # a run folder: its latest complete checkpoint
        d = run / f"step_{step:08d}"
        shutil.copytree(KEPT, d)
        for f in checkpoint.TRAINING_FILES:
            (d / f).touch(exist_ok=True)
    (run / "latest").write_text("step_00000005")
    assert checkpoint.resolve(tmp_path / "run") == run / "step_00000005"
    (run / "latest").unlink()
    assert checkpoint.resolve(tmp_path / "run") == run / "step_00000010"
    assert lewm.LeWM.load(tmp_path / "run").cfg.name == "tiny"
    with pytest.raises(UserError, match=r"--checkpoint .*nope: not found"):
        checkpoint.resolve(tmp_path / "nope")
    (tmp_path / "empty" / checkpoint.CKPT_DIR).mkdir(parents=True)
    with pytest.raises(UserError, match="no complete checkpoint"):
        checkpoint.resolve(tmp_path / "empty")


@pytest.mark.parametrize("fmt, why", [("lewm/2", "format 'lewm/2'"), (None, 'no "format" field')])
def test_unknown_format_is_refused_naming_the_file(tmp_path, fmt, why):
    ck = tmp_path / "ck"
    shutil.copytree(KEPT, ck)
    meta = json.loads((ck / "config.json").read_text())
    if fmt is None:
        del meta["format"]
    else:
        meta["format"] = fmt
    (ck / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=why) as e:
        lewm.LeWM.load(ck)
    assert str(ck / "config.json") in str(e.value) and checkpoint.FORMAT in str(e.value)


def test_save_writes_the_current_format_and_replaces_atomically(tmp_path):
    m = lewm.LeWM.load(KEPT)
    out = m.save(tmp_path / "ck", extra={"note": "x"})
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == checkpoint.FORMAT and meta["note"] == "x"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary folder left behind
