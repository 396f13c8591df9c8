"""`lewm convert`: the reference's checkpoints to ours, and ours back to the reference's layout.

    lewm convert hf_pusht/ --out ckpt/pusht --data pusht_expert_train.h5   # weights.pt + config.json -> ours
    lewm convert ckpt/pusht --out ref/pusht                               # ours -> weights.pt + config.json
    model = lewm.from_reference("hf_pusht/", data="pusht_expert_train.h5")

A reference checkpoint is a folder holding `weights.pt` (a state dict: the reference's
`save_pretrained`, its Hugging Face mirror) and `config.json` (the model's Hydra config), or the .pt
file itself with the config.json beside it. The .pt is read with `torch.load(weights_only=True)`:
nothing is unpickled that could run code, so the pickled `*_object.ckpt` files are refused.

config.json layouts read (shared/spec/reference.md section 9):

* le-wm's Hydra config, resolved: `_target_: jepa.JEPA`, the encoder
  `stable_pretraining.backbone.utils.vit_hf(size, patch_size, image_size, ...)`, `module.ARPredictor`,
  `module.Embedder`, `module.MLP` with `norm_fn: torch.nn.BatchNorm1d`;
* stable-worldmodel's: `stable_worldmodel.wm.lewm.LeWM` with `...lewm.module.Predictor` etc.;
* the mirror's plain kwargs (the same sections without `_target_`; projectors use BatchNorm);
* any of these nested under a top-level `model` key (a whole training config).

Every tensor is mapped (the ViT from Hugging Face names, both the transformers 4.x layout
`encoder.layer.N.attention.attention.query` and the 5.x layout `layers.N.attention.q_proj`, to timm's
with q, k and v fused into one `qkv`; the projectors' `net.0/1/3` to `fc1/bn/fc2`; the predictor's
`transformer.layers.N` to `blocks.N`). Anything that does not fit stops the conversion with one message
naming it: a missing or extra tensor, a shape, a config value with no counterpart, an unknown
`_target_`.

The action normaliser: the reference fits it on the data set's action column at planning time and
stores it nowhere in weights.pt or config.json, so it comes from `--data FILE` (the mean and std of
the file's action column over the non-NaN rows, as the reference's StandardScaler), or from
`action_normalizer.json` beside the weights where an export of ours wrote one. Without either the
conversion stops and says so (`--no-action-stats` keeps mean 0 and std 1 on purpose).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from .errors import ConvertError, UserError
from .config import Config, ConfigError, ModelConfig, preset, preset_names

NORMALIZER = "action_normalizer.json"

# vit_hf's size table (stable_pretraining.backbone.utils): hidden, layers, heads; intermediate 4x hidden
VIT_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
             "huge": (1280, 32, 16)}
MODEL_CLASSES = ("JEPA", "LeWM")
ENCODER_FACTORIES = ("vit_hf",)
PREDICTOR_CLASSES = ("ARPredictor", "Predictor")
EMBEDDER_CLASSES = ("Embedder",)
MLP_CLASSES = ("MLP",)
# the classes an export names (stable-worldmodel's, which loads them with its own load_pretrained)
EXPORT_TARGETS = {
    "model": "stable_worldmodel.wm.lewm.LeWM",
    "encoder": "stable_pretraining.backbone.utils.vit_hf",
    "predictor": "stable_worldmodel.wm.lewm.module.Predictor",
    "action_encoder": "stable_worldmodel.wm.lewm.module.Embedder",
    "mlp": "stable_worldmodel.wm.lewm.module.MLP",
    "norm": "torch.nn.BatchNorm1d",
}


# -- reading ------------------------------------------------------------------------------------------
def find_reference(path) -> tuple[Path, Path]:
    """(weights .pt, config.json) from a folder or a .pt file."""
    p = Path(path)
    if not p.exists():
        raise ConvertError(f"{p}: not found")
    if p.is_dir():
        pts = sorted(x for x in p.iterdir() if x.suffix == ".pt")
        if not pts:
            objs = sorted(x.name for x in p.iterdir() if x.name.endswith(".ckpt"))
            hint = (f" ({', '.join(objs)}: pickled objects, which cannot be read without executing code; use "
                    "the weights.pt + config.json that save_pretrained or the Hugging Face mirror ship)") if objs else ""
            raise ConvertError(f"{p}: no .pt weights file in the folder{hint}")
        if len(pts) > 1:
            names = [x.name for x in pts]
            if "weights.pt" in names:
                pts = [p / "weights.pt"]
            else:
                raise ConvertError(f"{p}: several .pt files ({', '.join(names)}); give the one to convert")
        weights = pts[0]
    else:
        weights = p
        if p.name.endswith("_object.ckpt"):
            raise ConvertError(f"{p}: a pickled object checkpoint, which cannot be read without executing code; "
                               "use the weights.pt + config.json that save_pretrained or the Hugging Face mirror ship")
    cfg = weights.parent / "config.json"
    if not cfg.exists():
        raise ConvertError(f"{weights}: no config.json beside it (the reference writes one with the weights)")
    return weights, cfg


def load_state(weights: Path) -> dict[str, torch.Tensor]:
    """The state dict, read without unpickling code (weights_only=True)."""
    try:
        obj = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, RuntimeError (not a zip/pickle), EOFError...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"{weights}: cannot be read as a weights-only state dict ({first[:200]}); "
                           "only tensors are loaded, never pickled code") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # a Lightning-style checkpoint: the model's tensors are under state_dict
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise ConvertError(f"{weights}: not a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    state = {k: v for k, v in obj.items() if torch.is_tensor(v)}
    other = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if other:
        raise ConvertError(f"{weights}: entries that are not tensors: {', '.join(other[:5])}")
    if state and all(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items()}  # spt.Module wraps the world model as .model
    return state


def _cls(section: dict) -> str | None:
    t = section.get("_target_")
    return None if t is None else str(t).rsplit(".", 1)[-1]


def _plain(section: dict) -> dict:
    return {k: v for k, v in section.items() if not k.startswith("_")}


def _section(cfg: dict, name: str, where: str) -> dict:
    s = cfg.get(name)
    if not isinstance(s, dict):
        raise ConvertError(f"{where}: no '{name}' section (known layouts: le-wm's Hydra config, "
                           "stable-worldmodel's, the Hugging Face mirror's)")
    return s


def _num(sec: dict, key: str, default, where: str, kind=int):
    if key not in sec and default is None:
        raise ConvertError(f"{where}.{key}: missing (the reference's class needs it)")
    v = sec.get(key, default)
    if v is None or isinstance(v, str):
        raise ConvertError(f"{where}.{key}: {v!r} is not a number (an unresolved Hydra value?)")
    if kind is int and (not isinstance(v, (int, float)) or isinstance(v, bool) or float(v) != int(v)):
        raise ConvertError(f"{where}.{key}: expects an integer, got {v!r}")
    return kind(v)


def _check_target(sec: dict, allowed: tuple, where: str, what: str) -> None:
    c = _cls(sec)
    if c is not None and c not in allowed:
        raise ConvertError(f"{where}._target_: unknown architecture '{sec['_target_']}' for the {what} "
                           f"(known: {', '.join(allowed)})")


def _check_keys(sec: dict, known: set, where: str) -> None:
    extra = sorted(k for k in _plain(sec) if k not in known)
    if extra:
        raise ConvertError(f"{where}: config value{'s' if len(extra) > 1 else ''} with no counterpart here: "
                           f"{', '.join(extra)}")


def model_config_from_reference(raw: dict, where: str = "config.json", action_dim: int | None = None,
                                frameskip: int | None = None) -> tuple[ModelConfig, dict]:
    """ModelConfig from a reference config.json (any layout above). Returns (config, facts) where facts
    records what was read (encoder size, use_mask_token, ...)."""
    if not isinstance(raw, dict):
        raise ConvertError(f"{where}: not a JSON object")
    cfg = raw
    if "encoder" not in cfg and isinstance(cfg.get("model"), dict):
        cfg, where = cfg["model"], f"{where}: model"
    _check_target(cfg, MODEL_CLASSES, where, "world model")
    enc = _section(cfg, "encoder", where)
    pred = _section(cfg, "predictor", where)
    act = _section(cfg, "action_encoder", where)
    proj = _section(cfg, "projector", where)
    pproj = _section(cfg, "pred_proj", where)
    facts: dict = {"layout": "hydra" if "_target_" in cfg or "_target_" in enc else "plain"}

    # encoder: vit_hf(size, patch_size=16, image_size=224, pretrained, use_mask_token=True, **ViTConfig)
    w = f"{where}: encoder"
    _check_target(enc, ENCODER_FACTORIES, w, "encoder")
    _check_keys(enc, {"size", "patch_size", "image_size", "pretrained", "use_mask_token", "hidden_size",
                      "num_hidden_layers", "num_attention_heads", "intermediate_size", "layer_norm_eps",
                      "hidden_act", "qkv_bias", "num_channels", "hidden_dropout_prob",
                      "attention_probs_dropout_prob"}, w)
    size = enc.get("size", "tiny")
    if size not in VIT_SIZES:
        raise ConvertError(f"{w}.size: unknown ViT size {size!r} (known: {', '.join(VIT_SIZES)})")
    hidden, layers, heads = VIT_SIZES[size]
    hidden = _num(enc, "hidden_size", hidden, w)
    layers = _num(enc, "num_hidden_layers", layers, w)
    heads = _num(enc, "num_attention_heads", heads, w)
    inter = _num(enc, "intermediate_size", 4 * hidden, w)
    if enc.get("hidden_act", "gelu") != "gelu":
        raise ConvertError(f"{w}.hidden_act: {enc['hidden_act']!r} (only HF's exact 'gelu' is built here)")
    if enc.get("qkv_bias", True) is not True:
        raise ConvertError(f"{w}.qkv_bias: false (the encoder here has q, k and v biases)")
    if _num(enc, "num_channels", 3, w) != 3:
        raise ConvertError(f"{w}.num_channels: {enc['num_channels']} (RGB frames only)")
    facts.update(encoder_size=size, use_mask_token=bool(enc.get("use_mask_token", True)))

    # projectors: MLP(input_dim, hidden_dim, output_dim, norm_fn) = Linear -> norm -> GELU -> Linear
    dims = {}
    for name, sec in (("projector", proj), ("pred_proj", pproj)):
        w2 = f"{where}: {name}"
        _check_target(sec, MLP_CLASSES, w2, name)
        _check_keys(sec, {"input_dim", "hidden_dim", "output_dim", "norm_fn", "act_fn"}, w2)
        norm = sec.get("norm_fn")
        if norm is None and "_target_" in sec:
            raise ConvertError(f"{w2}.norm_fn: not given, so the reference's MLP uses LayerNorm; only the "
                               "BatchNorm1d projector of LeWM is built here")
        if isinstance(norm, dict) and _cls(norm) != "BatchNorm1d" or isinstance(norm, str) and \
                not norm.endswith("BatchNorm1d"):
            raise ConvertError(f"{w2}.norm_fn: unknown architecture {norm!r} (LeWM's projectors use "
                               "torch.nn.BatchNorm1d)")
        act_fn = sec.get("act_fn")
        if act_fn is not None and not (isinstance(act_fn, dict) and _cls(act_fn) == "GELU"):
            raise ConvertError(f"{w2}.act_fn: unknown architecture {act_fn!r} (LeWM's projectors use GELU)")
        i = _num(sec, "input_dim", None, w2)
        dims[name] = (i, _num(sec, "hidden_dim", None, w2), _num(sec, "output_dim", i, w2))
    pi, ph, po = dims["projector"]
    qi, qh, qo = dims["pred_proj"]
    if pi != hidden:
        raise ConvertError(f"{where}: projector.input_dim {pi} differs from the encoder's width {hidden}")
    if ph != qh:
        raise ConvertError(f"{where}: projector.hidden_dim {ph} and pred_proj.hidden_dim {qh} differ (one "
                           "model.proj_hidden here)")

    # predictor: ARPredictor(num_frames, depth, heads, mlp_dim, input_dim, hidden_dim, output_dim, dim_head,
    # dropout, emb_dropout)
    w = f"{where}: predictor"
    _check_target(pred, PREDICTOR_CLASSES, w, "predictor")
    _check_keys(pred, {"num_frames", "depth", "heads", "mlp_dim", "input_dim", "hidden_dim", "output_dim",
                       "dim_head", "dropout", "emb_dropout"}, w)
    D = _num(pred, "input_dim", po, w)
    for k in ("hidden_dim", "output_dim"):
        if _num(pred, k, D, w) != D:
            raise ConvertError(f"{w}.{k}: {pred[k]} differs from input_dim {D}: a predictor with input/output "
                               "projections is not built here (unknown architecture)")
    if po != D or qi != D or qo != D:
        raise ConvertError(f"{where}: the latent widths differ (projector.output_dim {po}, predictor.input_dim "
                           f"{D}, pred_proj {qi} -> {qo}); LeWM keeps one width")
    p_heads, dim_head = _num(pred, "heads", None, w), _num(pred, "dim_head", 64, w)
    if p_heads == 1 and dim_head == D:
        raise ConvertError(f"{w}: heads 1 with dim_head == input_dim has no output projection in the reference "
                           "(unknown architecture here)")

    # action encoder: Embedder(input_dim, smoothed_dim=10, emb_dim, mlp_scale=4)
    w = f"{where}: action_encoder"
    _check_target(act, EMBEDDER_CLASSES, w, "action encoder")
    _check_keys(act, {"input_dim", "smoothed_dim", "emb_dim", "mlp_scale"}, w)
    in_dim = _num(act, "input_dim", None, w)
    if _num(act, "emb_dim", 10, w) != D:
        raise ConvertError(f"{w}.emb_dim: {act.get('emb_dim', 10)} differs from the latent width {D}")
    if action_dim is None:
        fs = 5 if frameskip is None else frameskip
        if in_dim % fs:
            raise ConvertError(f"{w}.input_dim: {in_dim} is not a multiple of the frameskip {fs}; give "
                               "--frameskip or --data (its action column's width)")
        action_dim = in_dim // fs
    else:
        if in_dim % action_dim:
            raise ConvertError(f"{w}.input_dim: {in_dim} is not a multiple of the data's action width {action_dim}")
        fs = in_dim // action_dim
        if frameskip is not None and frameskip != fs:
            raise ConvertError(f"{w}.input_dim: {in_dim} = {fs} x {action_dim}-D actions, not --frameskip {frameskip}")
    try:
        m = ModelConfig(
            image_size=_num(enc, "image_size", 224, f"{where}: encoder"),
            patch_size=_num(enc, "patch_size", 16, f"{where}: encoder"),
            enc_width=hidden, enc_depth=layers, enc_heads=heads, enc_mlp_ratio=inter / hidden,
            enc_ln_eps=float(enc.get("layer_norm_eps", 1e-12)), embed_dim=D, proj_hidden=ph,
            action_dim=action_dim, frameskip=fs, smoothed_dim=_num(act, "smoothed_dim", 10, w),
            action_hidden=_num(act, "mlp_scale", 4, w) * D, history=_num(pred, "num_frames", None, f"{where}: predictor"),
            pred_depth=_num(pred, "depth", None, f"{where}: predictor"), pred_heads=p_heads, pred_dim_head=dim_head,
            pred_mlp=_num(pred, "mlp_dim", None, f"{where}: predictor"),
            pred_dropout=float(pred.get("dropout", 0.0)))
        Config(model=m).validate()
    except ConfigError as e:
        raise ConvertError(f"{where}: {e}") from None
    if int(m.enc_width * m.enc_mlp_ratio) != inter:
        raise ConvertError(f"{where}: encoder.intermediate_size {inter} is not representable as a width ratio of "
                           f"{hidden}")
    return m, facts


# -- the tensor map -----------------------------------------------------------------------------------
# Hugging Face ViT block tensors, by transformers generation: name inside `encoder.` -> timm's (or "q"/"k"/"v")
_HF_BLOCK = {
    "4.x": {"layernorm_before": "norm1", "attention.attention.query": "q", "attention.attention.key": "k",
            "attention.attention.value": "v", "attention.output.dense": "attn.proj", "layernorm_after": "norm2",
            "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"},
    "5.x": {"layernorm_before": "norm1", "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v",
            "attention.o_proj": "attn.proj", "layernorm_after": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"},
}
_HF_BLOCK_PREFIX = {"4.x": "encoder.encoder.layer.", "5.x": "encoder.layers."}
_HF_EMBED = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
             "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
             "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
             "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
_MLP = {"net.0": "fc1", "net.1": "bn", "net.3": "fc2"}
_PRED_BLOCK = ("attn.norm", "attn.to_qkv", "attn.to_out.0", "mlp.net.0", "mlp.net.1", "mlp.net.4",
               "adaLN_modulation.1")


def hf_generation(state: dict) -> str:
    """'4.x' or '5.x': which transformers generation named the encoder's tensors."""
    v4 = any(k.startswith(_HF_BLOCK_PREFIX["4.x"]) for k in state)
    v5 = any(k.startswith(_HF_BLOCK_PREFIX["5.x"]) for k in state)
    if v4 and v5:
        raise ConvertError("the encoder's tensors mix the transformers 4.x (encoder.encoder.layer.N) and 5.x "
                           "(encoder.layers.N) names")
    return "5.x" if v5 else "4.x"


def reference_to_ours(state: dict, use_mask_token: bool = False) -> tuple[dict, list, str]:
    """Map a reference state dict to our key names. Returns (our state, unconsumed reference keys,
    transformers generation). Shapes are not checked here (see `fit_state`)."""
    gen = hf_generation(state)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(src, dst):
        if src in state:
            out[dst] = state[src]
            used.add(src)

    for src, dst in _HF_EMBED.items():
        take(f"encoder.{src}", f"encoder.vit.{dst}")
    if use_mask_token and "encoder.embeddings.mask_token" in state:
        used.add("encoder.embeddings.mask_token")  # vit_hf's mask token: unused by encode (no masking)
    pre = _HF_BLOCK_PREFIX[gen]
    blocks = sorted({int(m.group(1)) for k in state for m in [re.match(re.escape(pre) + r"(\d+)\.", k)] if m})
    for i in blocks:
        qkv: dict[str, dict[str, torch.Tensor]] = {}
        for src, dst in _HF_BLOCK[gen].items():
            for p in ("weight", "bias"):
                key = f"{pre}{i}.{src}.{p}"
                if key not in state:
                    continue
                used.add(key)
                if dst in ("q", "k", "v"):
                    qkv.setdefault(p, {})[dst] = state[key]
                else:
                    out[f"encoder.vit.blocks.{i}.{dst}.{p}"] = state[key]
        for p, parts in qkv.items():
            if set(parts) == {"q", "k", "v"}:  # timm's fused qkv: rows [q; k; v]
                out[f"encoder.vit.blocks.{i}.attn.qkv.{p}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
            else:  # reported as missing qkv by fit_state; the partial parts stay unconsumed
                for s in parts:
                    src = next(n for n, d in _HF_BLOCK[gen].items() if d == s)
                    used.discard(f"{pre}{i}.{src}.{p}")
    for ref, ours in (("projector", "encoder.projector"), ("pred_proj", "pred_proj")):
        for src, dst in _MLP.items():
            for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                take(f"{ref}.{src}.{p}", f"{ours}.{dst}.{p}")
    take("predictor.pos_embedding", "predictor.pos_embedding")
    for k in state:
        m = re.match(r"predictor\.transformer\.layers\.(\d+)\.(.+)\.(weight|bias)$", k)
        if m and m.group(2) in _PRED_BLOCK:
            take(k, f"predictor.blocks.{m.group(1)}.{m.group(2)}.{m.group(3)}")
    for p in ("weight", "bias"):
        take(f"predictor.transformer.norm.{p}", f"predictor.norm.{p}")
        for mod in ("patch_embed", "embed.0", "embed.2"):
            take(f"action_encoder.{mod}.{p}", f"action_encoder.{mod}.{p}")
    return out, sorted(k for k in state if k not in used), gen


def ours_to_reference(state: dict, generation: str = "4.x") -> dict:
    """Our state dict -> the reference's names (the inverse of `reference_to_ours`; qkv split in three)."""
    if generation not in _HF_BLOCK:
        raise ConvertError(f"unknown transformers generation {generation!r} (known: {', '.join(_HF_BLOCK)})")
    inv_embed = {v: k for k, v in _HF_EMBED.items()}
    inv_block = {v: k for k, v in _HF_BLOCK[generation].items()}
    inv_mlp = {v: k for k, v in _MLP.items()}
    pre = _HF_BLOCK_PREFIX[generation]
    out = {}
    for k, v in state.items():
        if k in ("action_mean", "action_std") or k.startswith("sigreg."):
            continue
        if k.startswith("encoder.vit."):
            name = k[len("encoder.vit."):]
            if name in inv_embed:
                out[f"encoder.{inv_embed[name]}"] = v
                continue
            m = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", name)
            if m is None:
                raise ConvertError(f"our tensor {k} has no counterpart in the reference")
            i, mod, p = m.groups()
            if mod == "attn.qkv":
                for part, chunk in zip("qkv", v.chunk(3, 0)):
                    out[f"{pre}{i}.{inv_block[part]}.{p}"] = chunk.clone()
            elif mod in inv_block:
                out[f"{pre}{i}.{inv_block[mod]}.{p}"] = v
            else:
                raise ConvertError(f"our tensor {k} has no counterpart in the reference")
        elif k.startswith("encoder.projector.") or k.startswith("pred_proj."):
            ref = "projector" if k.startswith("encoder.") else "pred_proj"
            mod, p = k.split(".")[-2:]
            out[f"{ref}.{inv_mlp[mod]}.{p}"] = v
        elif k.startswith("predictor.blocks."):
            out["predictor.transformer.layers." + k[len("predictor.blocks."):]] = v
        elif k.startswith("predictor.norm."):
            out["predictor.transformer." + k[len("predictor."):]] = v
        else:  # predictor.pos_embedding, action_encoder.*
            out[k] = v
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def fit_state(model, mapped: dict, unconsumed: list, where: str) -> dict:
    """Check the mapped tensors against `model`'s: every key present, none extra, every shape equal.
    Raises one ConvertError naming what does not fit; returns the state to load."""
    want = {k: v for k, v in model.state_dict().items() if k not in ("action_mean", "action_std")}
    missing = [k for k in want if k not in mapped]
    if missing:
        raise ConvertError(f"{where}: {len(missing)} tensor{'s' if len(missing) > 1 else ''} missing for "
                           f"{', '.join(_ref_name(k) for k in missing[:4])}{' ...' if len(missing) > 4 else ''}")
    extra = list(unconsumed) + [_ref_name(k) for k in mapped if k not in want]
    if extra:
        raise ConvertError(f"{where}: {len(extra)} tensor{'s' if len(extra) > 1 else ''} with no place in the "
                           f"model its config.json describes: {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}")
    for k, v in want.items():
        if tuple(mapped[k].shape) != tuple(v.shape):
            raise ConvertError(f"{where}: tensor {_ref_name(k)} has shape {tuple(mapped[k].shape)}, the model its "
                               f"config.json describes needs {tuple(v.shape)}")
    return {k: mapped[k].to(v.dtype) for k, v in want.items()}


def _ref_name(ours: str) -> str:
    """A readable reference name for one of our keys (for messages)."""
    try:
        names = list(ours_to_reference({ours: torch.zeros(3)}).keys())
        return "/".join(names) if len(names) > 1 else names[0]
    except (ConvertError, KeyError):
        return ours


# -- the action normaliser ------------------------------------------------------------------------------
def stats_from_data(data) -> tuple[np.ndarray, np.ndarray, dict]:
    """(mean, std, info) of a data file's action column over its non-NaN rows (population std, as the
    reference's StandardScaler at planning time)."""
    from .data.dataset import action_stats
    from .data.format import inspect, open_h5
    info = inspect(data)
    with open_h5(data) as f:
        a = np.asarray(f["action"][()], dtype=np.float32)
    if a.ndim != 2:
        raise ConvertError(f"--data {data}: column 'action' must be (N, A), got {a.shape}")
    mean, std = action_stats(a)
    return mean, std, {"data": str(data), "data_env": info.attrs.get("env"), "action_dim": int(a.shape[1])}


def _read_normalizer(folder: Path, action_dim: int):
    f = folder / NORMALIZER
    if not f.exists():
        return None
    try:
        d = json.loads(f.read_text())
        mean = np.asarray(d["mean"], np.float32).reshape(-1)
        std = np.asarray(d["std"], np.float32).reshape(-1)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ConvertError(f"{f}: unreadable ({e})") from None
    if mean.size != action_dim or std.size != action_dim:
        raise ConvertError(f"{f}: {mean.size}-D mean / {std.size}-D std, the model has {action_dim}-D actions")
    return mean, std


# -- the two directions -------------------------------------------------------------------------------
def from_reference(path, data=None, *, env: str | None = None, frameskip: int | None = None,
                   action_stats: str = "required"):
    """A LeWM from a reference checkpoint (folder or .pt with config.json beside it).

    data: the HDF5 file the checkpoint was trained on (its action column gives the normaliser and the
    action width). action_stats: "required" (stop when neither data nor a stored normaliser exists) or
    "identity" (mean 0, std 1). env: the environment name (presets' plan settings); default: the
    data file's `env` attribute, else "pusht"."""
    from .model import LeWM

    weights, cfg_file = find_reference(path)
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{cfg_file}: not valid JSON ({e})") from None
    mean = std = None
    src_stats, data_env, action_dim = None, None, None
    if data is not None:
        mean, std, dinfo = stats_from_data(data)
        src_stats, data_env, action_dim = f"data {data}", dinfo["data_env"], dinfo["action_dim"]
    m, facts = model_config_from_reference(raw, str(cfg_file), action_dim=action_dim, frameskip=frameskip)
    env = env or _env_name(data_env) or "pusht"
    base = preset(env) if env in preset_names() else Config(env=env)
    cfg = base.replace(model=m.__dict__, name=f"reference-{env}", env=env)
    model = LeWM(cfg)
    state = load_state(weights)
    mapped, unconsumed, gen = reference_to_ours(state, facts["use_mask_token"])
    model.load_state_dict(fit_state(model, mapped, unconsumed, str(weights)), strict=False)
    if mean is None:
        stored = _read_normalizer(weights.parent, m.action_dim)
        if stored is not None:
            mean, std = stored
            src_stats = str(weights.parent / NORMALIZER)
    if mean is None:
        if action_stats != "identity":
            raise ConvertError(f"{weights}: the reference does not store the action normaliser with its weights (it "
                               "fits one on the data set when it plans); give the data file the checkpoint was "
                               "trained on: --data FILE (or --no-action-stats for mean 0, std 1)")
        src_stats = "identity (mean 0, std 1)"
    else:
        model.set_action_stats(mean, std)
    model.reference_source = {"format": "reference", "weights": str(weights), "config": str(cfg_file),
                              "transformers_layout": gen, "config_layout": facts["layout"],
                              "action_stats": src_stats, "tensors": len(state)}
    return model.eval()


def _env_name(data_env) -> str | None:
    if not data_env:
        return None
    s = "".join(c for c in str(data_env).lower() if c.isalnum())
    for name in ("tworoom", "pusht", "cube", "reacher"):
        if name in s:
            return name
    return None


def reference_config(m: ModelConfig, use_mask_token: bool = False) -> dict:
    """Our ModelConfig as the reference's Hydra model config (stable-worldmodel's classes)."""
    t = EXPORT_TARGETS
    enc = {"_target_": t["encoder"], "size": "tiny", "patch_size": m.patch_size, "image_size": m.image_size,
           "pretrained": False, "use_mask_token": use_mask_token}
    if m.enc_width * m.enc_mlp_ratio != int(m.enc_width * m.enc_mlp_ratio):
        raise ConvertError(f"model.enc_mlp_ratio {m.enc_mlp_ratio} gives a fractional intermediate size")
    if (m.enc_width, m.enc_depth, m.enc_heads) != VIT_SIZES["tiny"] or m.enc_mlp_ratio != 4:
        enc.update(hidden_size=m.enc_width, num_hidden_layers=m.enc_depth, num_attention_heads=m.enc_heads,
                   intermediate_size=int(m.enc_width * m.enc_mlp_ratio))
    if m.enc_ln_eps != 1e-12:
        enc["layer_norm_eps"] = m.enc_ln_eps
    if m.action_hidden % m.embed_dim:
        raise ConvertError(f"model.action_hidden {m.action_hidden} is not a multiple of model.embed_dim "
                           f"{m.embed_dim} (the reference's Embedder: mlp_scale x emb_dim)")
    mlp = {"_target_": t["mlp"], "input_dim": m.embed_dim, "output_dim": m.embed_dim, "hidden_dim": m.proj_hidden,
           "norm_fn": {"_target_": t["norm"], "_partial_": True}}
    return {
        "_target_": t["model"], "encoder": enc,
        "predictor": {"_target_": t["predictor"], "num_frames": m.history, "input_dim": m.embed_dim,
                      "hidden_dim": m.embed_dim, "output_dim": m.embed_dim, "depth": m.pred_depth,
                      "heads": m.pred_heads, "mlp_dim": m.pred_mlp, "dim_head": m.pred_dim_head,
                      "dropout": m.pred_dropout, "emb_dropout": 0.0},
        "action_encoder": {"_target_": t["action_encoder"], "input_dim": m.action_input_dim,
                           "smoothed_dim": m.smoothed_dim, "emb_dim": m.embed_dim,
                           "mlp_scale": m.action_hidden // m.embed_dim},
        "projector": dict(mlp, input_dim=m.enc_width), "pred_proj": dict(mlp),
    }


def to_reference(model, out, generation: str = "4.x") -> Path:
    """Write `out/weights.pt` (a plain state dict, readable with weights_only=True), `out/config.json`
    (stable-worldmodel's Hydra model config) and `out/action_normalizer.json`, atomically."""
    from .atomic import atomic_dir
    cfg = reference_config(model.cfg.model)
    state = ours_to_reference(model.state_dict(), generation)
    norm = {"mean": model.action_mean.detach().cpu().tolist(), "std": model.action_std.detach().cpu().tolist(),
            "note": "z-scored actions: the mean and std of the training data's action column (lewm export)"}
    out = Path(out)
    with atomic_dir(out) as tmp:
        torch.save(state, tmp / "weights.pt")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / NORMALIZER).write_text(json.dumps(norm, indent=2))
    return out


# -- the command ----------------------------------------------------------------------------------------
def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert a reference checkpoint (weights.pt + config.json) to ours, or ours back",
        description="SRC is a reference checkpoint (a folder with weights.pt + config.json, or the .pt file) "
                    "-> our checkpoint (model.safetensors + config.json) in --out; or SRC is our checkpoint "
                    "-> weights.pt + config.json (+ action_normalizer.json) in the reference's layout.")
    p.add_argument("src", help="reference checkpoint folder / .pt file, or our checkpoint folder")
    p.add_argument("--out", required=True, help="output folder (replaced atomically)")
    p.add_argument("--data", help="the HDF5 file the reference checkpoint was trained on: its action column gives "
                                  "the action normaliser (the reference does not store it)")
    p.add_argument("--no-action-stats", action="store_true",
                   help="convert without an action normaliser (mean 0, std 1)")
    p.add_argument("--env", help="environment name for the plan defaults (default: the data's, else pusht)")
    p.add_argument("--frameskip", type=int, help="raw actions per macro action (default 5, or from --data)")
    p.add_argument("--transformers", default="4.x", choices=sorted(_HF_BLOCK),
                   help="export only: the ViT names of this transformers generation (4.x: the official "
                        "checkpoints' names)")
    p.set_defaults(func=main)


def main(args) -> int:
    from .model import LeWM
    src = Path(args.src)
    if args.frameskip is not None and args.frameskip <= 0:
        raise UserError(f"--frameskip must be positive, got {args.frameskip}")
    if (src / "model.safetensors").exists() or src.name == "model.safetensors":
        for flag in ("data", "env", "frameskip"):
            if getattr(args, flag) is not None:
                raise UserError(f"--{flag} applies to reference checkpoints only; {src} is ours (export)")
        try:
            model = LeWM.load(src)
        except ValueError as e:
            raise UserError(f"{src}: {e}") from None
        out = to_reference(model, args.out, args.transformers)
        n = len(torch.load(out / "weights.pt", weights_only=True))
        print(f"lewm convert: {src} -> {out}/weights.pt ({n} tensors, transformers {args.transformers} ViT names), "
              f"config.json, {NORMALIZER}")
        return 0
    model = from_reference(src, args.data, env=args.env, frameskip=args.frameskip,
                           action_stats="identity" if args.no_action_stats else "required")
    s = model.reference_source
    out = model.save(args.out, extra={"source": s})
    c = model.param_counts()
    print(f"lewm convert: {s['weights']} ({s['tensors']} tensors, transformers {s['transformers_layout']} ViT "
          f"names, {s['config_layout']} config) -> {out} ({c['total'] / 1e6:.2f}M parameters); action "
          f"normaliser: {s['action_stats']}")
    return 0
