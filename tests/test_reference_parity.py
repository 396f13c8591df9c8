"""Parity with the reference's own classes: a checkpoint written by the reference's code converts to a
model that computes what the reference computes (encode, predict, rollout, planning cost) to 1e-5.

The reference side is stable-worldmodel's LeWM, Predictor, Embedder and MLP, with Hugging Face's
ViTModel built as stable-pretraining's `vit_hf` builds it (ViTConfig(hidden, layers, heads, 4x
intermediate, image_size, patch_size), no pooling layer, no mask token), all from the registry:
`pip install -e ".[parity]"` (stable-worldmodel 0.1.1, transformers 5.x). With transformers 4.x
instead (`pip install "transformers>=4.50,<5"`) the same tests cover the 4.x tensor names; each run
reports which generation it used. Without these packages every test here is skipped, naming them.

The weights are random (every parameter and BatchNorm statistic drawn, so no zero-initialised AdaLN
or identity BatchNorm hides a wrong mapping); the reference saves them with torch.save as its
`save_pretrained` does, next to a config.json in one of the layouts the reference has used.
"""
import json

import pytest
import torch

pytest.importorskip("transformers", reason="parity tests need transformers: pip install -e '.[parity]'")
swm_lewm = pytest.importorskip("stable_worldmodel.wm.lewm",
                               reason="parity tests need stable-worldmodel: pip install -e '.[parity]'")

import transformers  # noqa: E402

import lewm  # noqa: E402
from lewm.convert import ConvertError, from_reference, to_reference  # noqa: E402
from lewm.model.encoder import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from lewm.plan.cem import terminal_cost  # noqa: E402

GENERATION = "5.x" if int(transformers.__version__.split(".")[0]) >= 5 else "4.x"
TOL = dict(rtol=1e-5, atol=1e-5)

# (encoder size kwargs, image, patch, action input, history, depth, heads, dim_head, mlp, D, proj hidden)
FULL = dict(vit=dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768),
            image=224, patch=14, act_in=10, history=3, depth=6, heads=16, dim_head=64, mlp=2048, D=192, proj=2048)
SMALL = dict(vit=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=192),
             image=56, patch=14, act_in=25, history=3, depth=2, heads=4, dim_head=16, mlp=96, D=40, proj=80)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build_reference(a: dict, seed: int = 0):
    """The reference's model from its own classes, every weight random."""
    from stable_worldmodel.wm.lewm.module import MLP, Embedder, Predictor
    torch.manual_seed(seed)
    vit = transformers.ViTModel(transformers.ViTConfig(**a["vit"], image_size=a["image"], patch_size=a["patch"]),
                                add_pooling_layer=False, use_mask_token=False)
    vit.config.interpolate_pos_encoding = True
    D = a["D"]
    ref = swm_lewm.LeWM(
        encoder=vit,
        predictor=Predictor(num_frames=a["history"], depth=a["depth"], heads=a["heads"], mlp_dim=a["mlp"],
                            input_dim=D, hidden_dim=D, output_dim=D, dim_head=a["dim_head"], dropout=0.1,
                            emb_dropout=0.0),
        action_encoder=Embedder(input_dim=a["act_in"], emb_dim=D),
        projector=MLP(input_dim=a["vit"]["hidden_size"], output_dim=D, hidden_dim=a["proj"],
                      norm_fn=torch.nn.BatchNorm1d),
        pred_proj=MLP(input_dim=D, output_dim=D, hidden_dim=a["proj"], norm_fn=torch.nn.BatchNorm1d))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            r = torch.randn(p.shape, generator=g)
            is_scale = p.dim() == 1 and name.endswith("weight") and ("norm" in name or ".net.1." in name)
            p.copy_(1 + 0.2 * r if is_scale else 0.05 * r)
        for name, b in ref.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return ref.eval()


def hydra_config(a: dict, layout: str) -> dict:
    """config.json as the reference writes it: le-wm's Hydra targets, stable-worldmodel's, or the
    Hugging Face mirror's plain kwargs."""
    D = a["D"]
    enc = {"size": "tiny", "patch_size": a["patch"], "image_size": a["image"], "pretrained": False,
           "use_mask_token": False}
    if a["vit"]["hidden_size"] != 192 or a["vit"]["num_hidden_layers"] != 12:
        enc.update(a["vit"])
    pred = {"num_frames": a["history"], "input_dim": D, "hidden_dim": D, "output_dim": D, "depth": a["depth"],
            "heads": a["heads"], "mlp_dim": a["mlp"], "dim_head": a["dim_head"], "dropout": 0.1, "emb_dropout": 0.0}
    act = {"input_dim": a["act_in"], "emb_dim": D}
    proj = {"input_dim": a["vit"]["hidden_size"], "output_dim": D, "hidden_dim": a["proj"]}
    pproj = {"input_dim": D, "output_dim": D, "hidden_dim": a["proj"]}
    if layout == "mirror":
        return {"encoder": enc, "predictor": pred, "action_encoder": act, "projector": proj, "pred_proj": pproj}
    mod = {"le-wm": "module", "swm": "stable_worldmodel.wm.lewm.module"}[layout]
    norm = {"_target_": "torch.nn.BatchNorm1d", "_partial_": True}
    return {
        "_target_": {"le-wm": "jepa.JEPA", "swm": "stable_worldmodel.wm.lewm.LeWM"}[layout],
        "encoder": {"_target_": "stable_pretraining.backbone.utils.vit_hf", **enc},
        "predictor": {"_target_": f"{mod}.{'ARPredictor' if layout == 'le-wm' else 'Predictor'}", **pred},
        "action_encoder": {"_target_": f"{mod}.Embedder", **act},
        "projector": {"_target_": f"{mod}.MLP", **proj, "norm_fn": norm},
        "pred_proj": {"_target_": f"{mod}.MLP", **pproj, "norm_fn": norm},
    }


def save_reference(ref, cfg: dict, folder):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(ref.state_dict(), folder / "weights.pt")  # what save_pretrained writes
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def frames(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def normalised(px: torch.Tensor) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W): the reference's ToImage (ImageNet mean/std)."""
    x = px.float().div(255.0).movedim(-1, -3)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def check_parity(ref, ours, a: dict, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    S, H, A = 6, 5, a["act_in"]
    with torch.no_grad():
        # encode: (B, T) frames at the model's size
        px = frames(2 * 2, a["image"], seed).reshape(2, 2, a["image"], a["image"], 3)
        z_ref = ref.encode({"pixels": normalised(px)})["emb"]
        z = ours.encode(px)
        torch.testing.assert_close(z, z_ref, **TOL)
        assert z.std(dim=(0, 1)).mean() > 1e-2  # random weights: latents differ between frames
        # predict: history-length windows, z-scored macro actions
        T = a["history"]
        emb = torch.randn(3, T, a["D"], generator=g)
        act = torch.randn(3, T, A, generator=g)
        p_ref = ref.predict(emb, ref.action_encoder(act))
        torch.testing.assert_close(ours.predict(emb, act), p_ref, **TOL)
        # rollout over H macro steps from one context frame (the planner's), S candidates per env
        start, goal = frames(2, a["image"], seed + 1), frames(2, a["image"], seed + 2)
        cand = torch.randn(2, S, H, A, generator=g)
        info = {"pixels": normalised(start)[:, None, None].expand(2, S, 1, 3, a["image"], a["image"])}
        r_ref = ref.rollout(info, cand.clone())["predicted_emb"][:, :, 1:]  # (B, S, H, D) after the context
        z0 = ours.encode(start)
        r = ours.rollout(z0[:, None, None].expand(2, S, 1, -1).reshape(2 * S, 1, -1), cand.reshape(2 * S, H, A))
        torch.testing.assert_close(r.reshape(2, S, H, -1), r_ref, **TOL)
        # the planning cost, one env at a time as the reference plans (its batch_size 1)
        for e in range(2):
            info = {"pixels": normalised(start[e:e + 1])[:, None, None].expand(1, S, 1, 3, a["image"], a["image"]),
                    "goal": normalised(goal[e:e + 1])[:, None, None].expand(1, S, 1, 3, a["image"], a["image"]),
                    "action": torch.zeros(1, S, 1, A)}
            c_ref = ref.get_cost(info, cand[e:e + 1].clone())  # (1, S)
            c = terminal_cost(ours, ours.encode(start[e:e + 1]), ours.encode(goal[e:e + 1]), cand[e:e + 1])
            torch.testing.assert_close(c, c_ref, **TOL)
            assert c_ref.std() > 0  # candidates are told apart


def test_full_size_checkpoint_converts_and_matches(tmp_path):
    """The reference's full-size model (303 tensors), le-wm's Hydra config.json."""
    ref = build_reference(FULL)
    assert len(ref.state_dict()) == 303
    src = save_reference(ref, hydra_config(FULL, "le-wm"), tmp_path / "ref")
    ours = from_reference(src, action_stats="identity", env="pusht")
    assert ours.reference_source["transformers_layout"] == GENERATION
    assert ours.param_counts()["total"] == sum(p.numel() for p in ref.parameters())
    check_parity(ref, ours, FULL)


@pytest.mark.parametrize("layout", ["swm", "mirror"])
def test_config_layouts_and_other_shapes(tmp_path, layout):
    """stable-worldmodel's and the mirror's config.json; another width, image size and 5-D actions (Cube)."""
    ref = build_reference(SMALL, seed=3)
    src = save_reference(ref, hydra_config(SMALL, layout), tmp_path / "ref")
    ours = from_reference(src / "weights.pt", action_stats="identity", env="cube")
    assert (ours.mcfg.action_dim, ours.mcfg.frameskip, ours.mcfg.image_size) == (5, 5, 56)
    check_parity(ref, ours, SMALL, seed=3)


def test_saved_conversion_and_export_load_in_the_reference(tmp_path):
    """Our checkpoint written by `lewm convert`, loaded back, still matches; the export loads into the
    reference's classes (strict) and computes the same."""
    ref = build_reference(SMALL, seed=5)
    src = save_reference(ref, hydra_config(SMALL, "le-wm"), tmp_path / "ref")
    ours = from_reference(src, action_stats="identity")
    ckpt = ours.save(tmp_path / "ours")
    ours2 = lewm.LeWM.load(ckpt)
    check_parity(ref, ours2, SMALL, seed=5)
    out = to_reference(ours2, tmp_path / "export", GENERATION)
    back = build_reference(SMALL, seed=99)  # other weights, then the export's
    back.load_state_dict(torch.load(out / "weights.pt", weights_only=True), strict=True)
    check_parity(back.eval(), ours2, SMALL, seed=6)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["_target_"] == "stable_worldmodel.wm.lewm.LeWM"


def test_the_other_generation_is_refused_by_the_reference_but_converted_here(tmp_path):
    """The other transformers generation's names do not load into this transformers' ViTModel, and our
    converter reads both (the official checkpoints carry 4.x names)."""
    other = "4.x" if GENERATION == "5.x" else "5.x"
    ref = build_reference(SMALL, seed=7)
    src = save_reference(ref, hydra_config(SMALL, "le-wm"), tmp_path / "ref")
    ours = from_reference(src, action_stats="identity")
    exported = to_reference(ours, tmp_path / "other", other)
    with pytest.raises(RuntimeError):
        build_reference(SMALL).load_state_dict(torch.load(exported / "weights.pt", weights_only=True), strict=True)
    again = from_reference(exported)  # our export carries its action normaliser
    assert again.reference_source["transformers_layout"] == other
    check_parity(ref, again, SMALL, seed=7)


def test_refuses_a_predictor_with_projections(tmp_path):
    """A reference predictor whose hidden width differs from the latent has input/output projections."""
    a = dict(SMALL)
    ref = build_reference(a)
    cfg = hydra_config(a, "le-wm")
    cfg["predictor"]["hidden_dim"] = 64
    save_reference(ref, cfg, tmp_path / "ref")
    with pytest.raises(ConvertError, match="predictor.hidden_dim.*unknown architecture"):
        from_reference(tmp_path / "ref", action_stats="identity")
