"""`lewm convert` / LeWM.from_reference without the reference's packages: the tensor map both ways
(transformers 4.x and 5.x names), the config.json layouts, the action normaliser, and every refusal.
Parity with the reference's own classes is in test_reference_parity.py (the [parity] extra)."""
import json
import pickle

import numpy as np
import pytest
import torch

import lewm
from lewm.cli import main as cli_main
from lewm.convert import ConvertError, from_reference, to_reference
from lewm.data.dataset import action_stats
from lewm.data.synthetic import write_synthetic


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = lewm.LeWM(lewm.preset("tiny")).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))  # no zero AdaLN: every tensor matters
    m.set_action_stats([0.1, -0.2], [0.5, 2.0])
    return m


@pytest.fixture
def exported(tiny, tmp_path):
    """Our tiny model as a reference checkpoint, without the normaliser sidecar (as the reference's)."""
    out = to_reference(tiny, tmp_path / "ref")
    (out / "action_normalizer.json").unlink()
    return out


def _edit_config(folder, fn):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_state(folder, fn):
    sd = torch.load(folder / "weights.pt", weights_only=True)
    fn(sd)
    torch.save(sd, folder / "weights.pt")


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("generation", ["4.x", "5.x"])
def test_round_trip_both_generations(tiny, tmp_path, generation):
    out = to_reference(tiny, tmp_path / "ref", generation)
    sd = torch.load(out / "weights.pt", weights_only=True)
    marker = "encoder.encoder.layer.0.attention.attention.query.weight" if generation == "4.x" else \
        "encoder.layers.0.attention.q_proj.weight"
    assert marker in sd and "encoder.embeddings.cls_token" in sd
    assert "predictor.transformer.layers.1.adaLN_modulation.1.weight" in sd and "projector.net.1.running_var" in sd
    back = from_reference(out, env="tworoom")  # the sidecar carries the normaliser
    _same(tiny, back)
    assert back.reference_source["transformers_layout"] == generation
    assert back.reference_source["action_stats"].endswith("action_normalizer.json")


def test_full_size_has_the_reference_tensor_count(tmp_path):
    m = lewm.LeWM(lewm.preset("pusht"))
    out = to_reference(m, tmp_path / "ref")
    assert len(torch.load(out / "weights.pt", weights_only=True)) == 303  # the released checkpoints' count
    back = from_reference(out)
    assert back.param_counts() == m.param_counts()


def test_layouts_plain_and_nested(exported):
    """The mirror's plain kwargs (no _target_) and a whole training config with the model nested."""
    def plain(c):
        for v in list(c.values()):
            if isinstance(v, dict):
                v.pop("_target_", None)
                v.pop("norm_fn", None)
        c.pop("_target_")
    _edit_config(exported, plain)
    m = from_reference(exported, action_stats="identity")
    assert m.reference_source["config_layout"] == "plain"
    _edit_config(exported, lambda c: c.update(model=dict(c), seed=3072, img_size=32) or
                 [c.pop(k) for k in ("encoder", "predictor", "action_encoder", "projector", "pred_proj")])
    from_reference(exported / "weights.pt", action_stats="identity")


def test_action_normaliser_from_data(exported, tmp_path, tiny):
    data = write_synthetic(tmp_path / "d.h5", episodes=3, length=30, image_size=32)
    m = from_reference(exported, data=data, env="tworoom")
    import h5py
    with h5py.File(data) as f:
        mean, std = action_stats(np.asarray(f["action"][()], np.float32))
    assert np.allclose(m.action_mean.numpy(), mean) and np.allclose(m.action_std.numpy(), std)
    assert m.reference_source["action_stats"] == f"data {data}"
    sa = {k: v for k, v in m.state_dict().items() if not k.startswith("action_")}
    for k, v in sa.items():
        assert torch.equal(v, tiny.state_dict()[k]), k


def test_cli_both_directions(exported, tmp_path, capsys, tiny):
    out = tmp_path / "ours"
    assert cli_main(["convert", str(exported), "--out", str(out), "--no-action-stats", "--env", "tworoom"]) == 0
    msg = capsys.readouterr().out
    assert "91 tensors" in msg and "transformers 4.x" in msg and "identity" in msg
    m = lewm.LeWM.load(out)
    meta = json.loads((out / "config.json").read_text())
    assert meta["source"]["format"] == "reference" and meta["config"]["env"] == "tworoom"
    assert m.cfg.plan.iterations == lewm.preset("tworoom").plan.iterations
    back = tmp_path / "back"
    assert cli_main(["convert", str(out), "--out", str(back), "--transformers", "5.x"]) == 0
    assert "transformers 5.x" in capsys.readouterr().out
    assert sorted(p.name for p in back.iterdir()) == ["action_normalizer.json", "config.json", "weights.pt"]
    assert cli_main(["convert", str(out), "--out", str(back), "--data", "x.h5"]) == 2
    assert "--data applies to reference checkpoints only" in capsys.readouterr().err


class _Code:  # a pickled object: weights_only=True must refuse it
    def __reduce__(self):
        return (print, ("ran code",))


def _refusals():
    """(name, how to break the exported checkpoint, message pattern)."""
    def pickled(f):
        with open(f / "weights.pt", "wb") as fh:
            pickle.dump({"encoder.x": _Code()}, fh, protocol=2)
    return [
        ("no normaliser", lambda f: None, "does not store the action normaliser.*--data FILE"),
        ("pickled code", pickled, "cannot be read as a weights-only state dict"),
        ("not a state dict", lambda f: torch.save([torch.zeros(1)], f / "weights.pt"), "not a state dict"),
        ("non-tensor entry", lambda f: _edit_state(f, lambda s: s.update(epoch=3)), "not tensors: epoch"),
        ("missing tensor", lambda f: _edit_state(f, lambda s: s.pop("predictor.pos_embedding")),
         "1 tensor missing for predictor.pos_embedding"),
        ("half a qkv", lambda f: _edit_state(f, lambda s: s.pop("encoder.encoder.layer.1.attention.attention.key.bias")),
         "missing for encoder.encoder.layer.1.attention.attention.query.bias"),
        ("extra tensor", lambda f: _edit_state(f, lambda s: s.update({"decoder.weight": torch.zeros(2)})),
         "1 tensor with no place.*decoder.weight"),
        ("extra block", lambda f: _edit_state(f, lambda s: s.update(
            {"predictor.transformer.layers.7.attn.norm.weight": torch.zeros(32)})), "layers.7.attn.norm.weight"),
        ("shape", lambda f: _edit_state(f, lambda s: s.update({"predictor.pos_embedding": torch.zeros(1, 4, 32)})),
         r"predictor.pos_embedding has shape \(1, 4, 32\).*needs \(1, 3, 32\)"),
        ("mixed generations", lambda f: _edit_state(f, lambda s: s.update(
            {"encoder.layers.0.mlp.fc1.weight": torch.zeros(1)})), "mix the transformers 4.x"),
        ("unknown model", lambda f: _edit_config(f, lambda c: c.update(_target_="stable_worldmodel.wm.pldm.PLDM")),
         "unknown architecture 'stable_worldmodel.wm.pldm.PLDM' for the world model"),
        ("unknown encoder", lambda f: _edit_config(f, lambda c: c["encoder"].update(_target_="x.resnet18")),
         "encoder._target_: unknown architecture 'x.resnet18'"),
        ("unknown size", lambda f: _edit_config(f, lambda c: c["encoder"].update(size="giant")),
         "unknown ViT size 'giant'"),
        ("unknown key", lambda f: _edit_config(f, lambda c: c["predictor"].update(rope=True)),
         "predictor: config value with no counterpart here: rope"),
        ("unresolved", lambda f: _edit_config(f, lambda c: c["action_encoder"].update(input_dim="???")),
         r"action_encoder.input_dim: '\?\?\?' is not a number"),
        ("missing value", lambda f: _edit_config(f, lambda c: c["predictor"].pop("depth")),
         "predictor.depth: missing"),
        ("layernorm projector", lambda f: _edit_config(f, lambda c: c["projector"].pop("norm_fn")),
         "projector.norm_fn: not given.*LayerNorm"),
        ("predictor projections", lambda f: _edit_config(f, lambda c: c["predictor"].update(hidden_dim=64)),
         "predictor.hidden_dim: 64 differs.*unknown architecture"),
        ("frameskip", lambda f: _edit_config(f, lambda c: c["action_encoder"].update(input_dim=12)),
         "input_dim: 12 is not a multiple of the frameskip 5"),
        ("bad json", lambda f: (f / "config.json").write_text("{"), "not valid JSON"),
        ("no config", lambda f: (f / "config.json").unlink(), "no config.json beside it"),
        ("two .pt", lambda f: torch.save({}, f / "other.pt") or (f / "weights.pt").rename(f / "w2.pt"),
         r"several .pt files \(other.pt, w2.pt\)"),
        ("object ckpt", lambda f: (f / "weights.pt").rename(f / "lewm_object.ckpt"),
         "lewm_object.ckpt: pickled objects"),
    ]


@pytest.mark.parametrize("name,breaks,pattern", _refusals(), ids=[r[0] for r in _refusals()])
def test_refusals(exported, name, breaks, pattern, capsys):
    breaks(exported)
    kw = {} if name == "no normaliser" else {"action_stats": "identity"}
    with pytest.raises(ConvertError, match=pattern):
        from_reference(exported, **kw)
    if name in ("no normaliser", "shape", "unknown model"):  # the command: one line, exit code 2
        args = ["convert", str(exported), "--out", str(exported.parent / "o")]
        assert cli_main(args if name == "no normaliser" else args + ["--no-action-stats"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("lewm convert: error: ") and "\n" not in err


def test_refuses_the_data_file_of_another_action_width(exported, tmp_path):
    data = write_synthetic(tmp_path / "d.h5", episodes=2, length=30, image_size=32)  # 2-D actions
    _edit_config(exported, lambda c: c["action_encoder"].update(input_dim=15))
    _edit_state(exported, lambda s: s.update({"action_encoder.patch_embed.weight": torch.zeros(10, 15, 1)}))
    with pytest.raises(ConvertError, match="input_dim: 15 is not a multiple of the data's action width 2"):
        from_reference(exported, data=data)
    m = from_reference(exported, action_stats="identity", frameskip=5)  # 3-D actions, frameskip 5
    assert (m.mcfg.action_dim, m.mcfg.frameskip) == (3, 5)


def test_missing_source(tmp_path):
    with pytest.raises(ConvertError, match="not found"):
        from_reference(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match="no .pt weights file"):
        from_reference(tmp_path / "empty")
