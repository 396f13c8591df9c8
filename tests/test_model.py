"""The model: parameter counts pinned to the reference, shapes, the AdaLN-zero start, checkpoints."""
import json

import pytest
import torch

import lewm
from lewm.model.predictor import ConditionalBlock

# shared/spec/reference.md section 1: counts computed from the reference code
REFERENCE = {"encoder": 5_501_376, "projector": 792_768, "predictor": 10_791_360, "pred_proj": 792_768,
             "action_encoder": 156_206, "total": 18_034_478}


@pytest.fixture(scope="module")
def full():
    return lewm.LeWM(lewm.preset("pusht"))


def test_default_parameter_counts_match_reference(full):
    counts = full.param_counts()
    for part, ref in REFERENCE.items():
        assert counts[part] == ref, (part, counts[part], ref)  # exact: the same layers as the reference
    # the paper's "~15M" is encoder + predictor without the projectors
    assert 14.5e6 < counts["encoder"] + counts["predictor"] < 16.5e6


def test_default_architecture_fields(full):
    m = full.cfg.model
    assert (m.image_size, m.patch_size, m.enc_width, m.enc_depth, m.enc_heads) == (224, 14, 192, 12, 3)
    assert (m.pred_depth, m.pred_heads, m.pred_dim_head, m.pred_mlp, m.history) == (6, 16, 64, 2048, 3)
    assert m.action_input_dim == 10
    assert full.encoder.vit.patch_embed.num_patches == 256
    assert full.predictor.pos_embedding.shape == (1, 3, 192)
    assert full.cfg.sigreg.weight == 0.09 and full.cfg.sigreg.num_proj == 1024 and full.cfg.sigreg.knots == 17


def test_cube_preset_has_wider_actions():
    m = lewm.LeWM(lewm.preset("cube"))
    assert m.action_encoder.patch_embed.in_channels == 25


def test_adaln_zero_blocks_start_as_identity():
    blk = ConditionalBlock(32, 2, 16, 64, 0.0)
    x, c = torch.randn(4, 3, 32), torch.randn(4, 3, 32)
    assert torch.equal(blk(x, c), x)


def test_shapes_and_causality():
    torch.manual_seed(0)
    model = lewm.LeWM(lewm.preset("tiny")).eval()
    for blk in model.predictor.blocks:  # leave AdaLN-zero so the test sees the attention at work
        torch.nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.1)
    px = torch.randint(0, 256, (2, 3, 40, 40, 3), dtype=torch.uint8)  # any input size: resized on device
    z = model.encode(px)
    assert z.shape == (2, 3, 32)
    a = torch.randn(2, 3, 10)
    out = model.predict(z, a)
    assert out.shape == (2, 3, 32)
    z2, a2 = z.clone(), a.clone()
    z2[:, 2] += 1.0
    a2[:, 2] += 1.0
    out2 = model.predict(z2, a2)
    assert torch.allclose(out[:, :2], out2[:, :2], atol=1e-6)  # future frames do not leak backwards
    assert not torch.allclose(out[:, 2], out2[:, 2])


def test_rollout_equals_stepwise_predict():
    torch.manual_seed(0)
    model = lewm.LeWM(lewm.preset("tiny")).eval()
    for blk in model.predictor.blocks:
        torch.nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.1)
    z0 = torch.randn(5, 1, 32)
    acts = torch.randn(5, 5, 10)
    roll = model.rollout(z0, acts)
    assert roll.shape == (5, 5, 32)
    z = z0
    with torch.no_grad():
        for i in range(5):
            lo = max(0, i + 1 - 3)
            nxt = model.predict(z[:, lo:i + 1], acts[:, lo:i + 1])[:, -1]
            z = torch.cat([z, nxt[:, None]], 1)
    assert torch.allclose(roll, z[:, 1:], atol=1e-5)


def test_loss_has_two_terms_and_gradients_reach_everything():
    torch.manual_seed(0)
    model = lewm.LeWM(lewm.preset("tiny"))
    px = torch.randint(0, 256, (6, 4, 32, 32, 3), dtype=torch.uint8)
    a = torch.randn(6, 4, 10)
    a[:, -1] = float("nan")  # NaN actions become 0
    out = model.loss(px, a)
    assert torch.isfinite(out["loss"])
    assert torch.allclose(out["loss"], out["pred_loss"] + 0.09 * out["sigreg"])
    out["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, no_grad  # no stop-gradient anywhere: the targets train the encoder too


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = lewm.LeWM(lewm.preset("tiny"))
    model.set_action_stats([1.0, -2.0], [0.5, 3.0])
    model.save(tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert meta["config"]["name"] == "tiny"
    back = lewm.LeWM.load(tmp_path / "ck")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert torch.equal(back.action_std, torch.tensor([0.5, 3.0]))
    model.save(tmp_path / "ck")  # overwriting an existing checkpoint folder works and stays loadable
    lewm.LeWM.load(tmp_path / "ck")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        lewm.LeWM.load(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        lewm.LeWM.load(tmp_path / "bad")
    lewm.LeWM(lewm.preset("tiny")).save(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable"):
        lewm.LeWM.load(tmp_path / "ck")


def test_presets_and_config_errors():
    assert "pusht" in lewm.preset_names() and "tiny" in lewm.preset_names()
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        lewm.preset("nope")
    with pytest.raises(ValueError, match="unknown config field 'config.model.widht'"):
        lewm.preset("tiny", model={"widht": 3})
    cfg = lewm.preset("tiny", train={"steps": 7})
    assert cfg.train.steps == 7
    assert lewm.Config.from_dict(cfg.to_dict()) == cfg


def test_bad_model_inputs():
    model = lewm.LeWM(lewm.preset("tiny"))
    with pytest.raises(ValueError, match=r"\(B, T, H, W, 3\)"):
        model.encode(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="frameskip\\*action_dim"):
        model.predict(torch.zeros(2, 3, 32), torch.zeros(2, 3, 7))
    with pytest.raises(ValueError, match="model.history"):
        model.predictor(torch.zeros(2, 4, 32), torch.zeros(2, 4, 32))


def test_encoder_initialised_as_hf_vit():
    """HF's ViT init (the reference's encoder): trunc-normal std 0.02 for the CLS token, the position
    embeddings, the patch-embedding conv and every Linear, zero biases, unit LayerNorms (timm alone
    gives the CLS token std 1e-6 and the conv PyTorch's default init)."""
    torch.manual_seed(0)
    vit = lewm.LeWM(lewm.preset("pusht")).encoder.vit
    for t in (vit.cls_token, vit.pos_embed, vit.patch_embed.proj.weight, vit.blocks[3].attn.qkv.weight,
              vit.blocks[11].mlp.fc2.weight):
        assert 0.017 < t.std().item() < 0.023 and t.abs().max() <= 2.0
    assert vit.patch_embed.proj.bias.abs().max() == 0 and vit.blocks[0].attn.qkv.bias.abs().max() == 0
    assert (vit.blocks[5].norm1.weight == 1).all() and (vit.norm.bias == 0).all()
    # model.init "timm" keeps timm's own init (the tworoom-cpu preset's: what learns at 8 px patches)
    torch.manual_seed(0)
    vt = lewm.LeWM(lewm.preset("pusht", model={"init": "timm"})).encoder.vit
    assert vt.cls_token.std().item() < 1e-4 and vt.patch_embed.proj.bias.abs().max() > 0
    assert lewm.preset("tworoom-cpu").model.init == "timm"
