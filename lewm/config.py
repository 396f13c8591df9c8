"""Configs are dataclasses; presets are data, not code paths.

`Config` groups four parts: `model` (architecture), `sigreg` (the regulariser), `train` (optimiser and
data) and `plan` (CEM and the evaluation protocol). Every default equals the reference system's value
(shared/spec/reference.md); the named presets only change fields.

    cfg = lewm.preset("pusht")                 # the reference's full size
    cfg = lewm.preset("tiny", train={"steps": 200})
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any


from .errors import ConfigError, UserError


def _check(errors: list, field: str, ok: bool, message: str) -> None:
    if not ok:
        errors.append(ConfigError(field, message))


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # not NaN


@dataclass
class ModelConfig:
    # encoder: timm ViT; CLS token after the final LayerNorm, then the BatchNorm projector
    image_size: int = 224
    patch_size: int = 14
    enc_width: int = 192
    enc_depth: int = 12
    enc_heads: int = 3
    enc_mlp_ratio: float = 4.0
    enc_ln_eps: float = 1e-12  # HF ViT's LayerNorm eps (the reference's backbone)
    embed_dim: int = 192  # latent z
    proj_hidden: int = 2048  # projector and pred_proj: D -> proj_hidden (BN, GELU) -> D
    # action encoder: Conv1d(frameskip*action_dim -> smoothed_dim, k=1) -> Linear(., action_hidden) -> SiLU -> Linear(., D)
    action_dim: int = 2
    frameskip: int = 5
    smoothed_dim: int = 10
    action_hidden: int = 768
    # predictor: AdaLN-zero causal transformer over frames
    history: int = 3  # frames in the predictor's window (num_frames of the positional embedding)
    pred_depth: int = 6
    pred_heads: int = 16
    pred_dim_head: int = 64
    pred_mlp: int = 2048
    pred_dropout: float = 0.1
    # the encoder's initialisation: "hf" as the reference's HF ViTModel (trunc-normal 0.02 everywhere,
    # CLS token included), or "timm" (timm's own: CLS token std 1e-6, the patch embedding PyTorch's
    # default Conv2d init); see lewm.model.encoder.hf_vit_init and the README (small patches differ most)
    init: str = "hf"

    @property
    def action_input_dim(self) -> int:
        """Width of one macro action: `frameskip` raw actions concatenated."""
        return self.frameskip * self.action_dim

    def _errors(self, p: str) -> list:
        e: list = []
        for f in ("image_size", "patch_size", "enc_width", "enc_depth", "enc_heads", "embed_dim", "proj_hidden",
                  "action_dim", "frameskip", "smoothed_dim", "action_hidden", "history", "pred_depth",
                  "pred_heads", "pred_dim_head", "pred_mlp"):
            v = getattr(self, f)
            _check(e, f"{p}.{f}", isinstance(v, int) and not isinstance(v, bool) and v > 0,
                   f"must be a positive integer, got {v!r}")
        if e:
            return e
        _check(e, f"{p}.image_size", self.image_size % self.patch_size == 0,
               f"{self.image_size} px is not divisible by model.patch_size {self.patch_size} (the ViT "
               f"needs whole patches): use a multiple of {self.patch_size}, e.g. "
               f"{max(1, round(self.image_size / self.patch_size)) * self.patch_size}, or another preset")
        _check(e, f"{p}.enc_width", self.enc_width % self.enc_heads == 0,
               f"{self.enc_width} is not divisible by model.enc_heads {self.enc_heads}")
        _check(e, f"{p}.enc_mlp_ratio", _num(self.enc_mlp_ratio) and self.enc_mlp_ratio > 0,
               f"must be positive, got {self.enc_mlp_ratio!r}")
        _check(e, f"{p}.enc_ln_eps", _num(self.enc_ln_eps) and self.enc_ln_eps > 0,
               f"must be positive, got {self.enc_ln_eps!r}")
        _check(e, f"{p}.pred_dropout", _num(self.pred_dropout) and 0 <= self.pred_dropout < 1,
               f"must be in [0, 1), got {self.pred_dropout!r}")
        _check(e, f"{p}.init", self.init in ("hf", "timm"), f"must be 'hf' or 'timm', got {self.init!r}")
        return e


@dataclass
class SIGRegConfig:
    weight: float = 0.09  # lambda; the paper says 0.1, the code uses 0.09
    num_proj: int = 1024  # M random unit directions, drawn fresh every step
    knots: int = 17  # K quadrature knots on [0, t_max]
    t_max: float = 3.0
    impl: str = "auto"  # "eager" (reference), "triton" (fused kernel), "auto": triton on CUDA else eager

    def _errors(self, p: str) -> list:
        e: list = []
        _check(e, f"{p}.weight", _num(self.weight) and self.weight >= 0,
               f"lambda must be >= 0 (0 turns SIGReg off), got {self.weight!r}")
        _check(e, f"{p}.num_proj", isinstance(self.num_proj, int) and self.num_proj > 0,
               f"must be a positive integer, got {self.num_proj!r}")
        _check(e, f"{p}.knots", isinstance(self.knots, int) and self.knots >= 2,
               f"must be an integer >= 2, got {self.knots!r}")
        _check(e, f"{p}.t_max", _num(self.t_max) and self.t_max > 0, f"must be positive, got {self.t_max!r}")
        _check(e, f"{p}.impl", self.impl in ("eager", "triton", "auto"),
               f"must be eager, triton or auto, got {self.impl!r}")
        return e


@dataclass
class TrainConfig:
    num_frames: int = 4  # clip length: history + 1 target frame
    batch_size: int = 128
    lr: float = 5e-5
    weight_decay: float = 1e-3
    warmup_frac: float = 0.01
    grad_clip: float = 1.0
    epochs: int = 10
    steps: int = 0  # > 0 overrides epochs
    seed: int = 3072
    val_frac: float = 0.1
    workers: int = 2
    log_every: int = 10
    ckpt_every: int = 1000
    val_every: int = 0  # held-out loss every N steps (0: 20 times per run, at most every log_every) and at every checkpoint
    bn_batches: int = 8  # training batches that re-estimate BatchNorm's statistics before eval/save
    keep: int = 3
    amp: bool = True  # bf16 autocast on CUDA (ignored on the CPU)
    cache: str = "auto"  # "ram": decode all pixels once; "none": read from HDF5 per batch; "auto": ram if it fits

    def _errors(self, p: str) -> list:
        e: list = []

        def integer(f, lo, what):
            v = getattr(self, f)
            _check(e, f"{p}.{f}", isinstance(v, int) and not isinstance(v, bool) and v >= lo, f"{what}, got {v!r}")

        integer("num_frames", 2, "must be an integer >= 2 (context frames + the target)")
        integer("batch_size", 2, "must be an integer >= 2 (BatchNorm and SIGReg need a batch)")
        integer("epochs", 1, "must be a positive integer")
        integer("steps", 0, "must be a positive integer (or 0: use epochs)")
        integer("workers", 0, "must be an integer >= 0")
        integer("log_every", 1, "must be a positive integer")
        integer("ckpt_every", 1, "must be a positive integer")
        integer("val_every", 0, "must be an integer >= 0 (0: 20 held-out points per run)")
        integer("bn_batches", 1, "must be a positive integer")
        integer("keep", 0, "must be an integer >= 0 (0 keeps every checkpoint)")
        _check(e, f"{p}.lr", _num(self.lr) and self.lr > 0, f"must be positive, got {self.lr!r}")
        _check(e, f"{p}.weight_decay", _num(self.weight_decay) and self.weight_decay >= 0,
               f"must be >= 0, got {self.weight_decay!r}")
        _check(e, f"{p}.warmup_frac", _num(self.warmup_frac) and 0 <= self.warmup_frac < 1,
               f"must be in [0, 1), got {self.warmup_frac!r}")
        _check(e, f"{p}.grad_clip", _num(self.grad_clip) and self.grad_clip > 0,
               f"must be positive, got {self.grad_clip!r}")
        _check(e, f"{p}.val_frac", _num(self.val_frac) and 0 <= self.val_frac < 1,
               f"the held-out fraction of episodes must be in [0, 1) (0: no held-out episodes), got "
               f"{self.val_frac!r}")
        _check(e, f"{p}.cache", self.cache in ("ram", "none", "auto"),
               f"must be ram, none or auto, got {self.cache!r}")
        return e


@dataclass
class PlanConfig:
    samples: int = 300
    elites: int = 30
    iterations: int = 30
    horizon: int = 5  # macro steps
    receding_horizon: int = 5
    var_scale: float = 1.0
    seed: int = 42
    # evaluation protocol
    episodes: int = 50
    goal_offset: int = 25
    budget: int = 50

    def _errors(self, p: str) -> list:
        e: list = []
        for f in ("samples", "elites", "iterations", "horizon", "receding_horizon", "episodes", "goal_offset",
                  "budget"):
            v = getattr(self, f)
            _check(e, f"{p}.{f}", isinstance(v, int) and not isinstance(v, bool) and v > 0,
                   f"must be a positive integer, got {v!r}")
        if e:
            return e
        _check(e, f"{p}.elites", self.elites <= self.samples,
               f"{self.elites} elites is more than plan.samples {self.samples}")
        _check(e, f"{p}.receding_horizon", self.receding_horizon <= self.horizon,
               f"{self.receding_horizon} is more than plan.horizon {self.horizon}")
        _check(e, f"{p}.var_scale", _num(self.var_scale) and self.var_scale > 0,
               f"must be positive, got {self.var_scale!r}")
        return e


@dataclass
class DataConfig:
    """The size of the preset's data set: `lewm collect ENV --episodes E --max-steps S --image-size I`
    with the env's default collection policy (docs/environments.md, docs/recipes.md)."""
    episodes: int = 10000
    max_steps: int = 200
    image_size: int = 224
    env_kwargs: dict = field(default_factory=dict)  # the env's options (`--env-arg K=V`), e.g. TwoRoom's render

    def _errors(self, p: str) -> list:
        e: list = []
        for f in ("episodes", "max_steps", "image_size"):
            v = getattr(self, f)
            _check(e, f"{p}.{f}", isinstance(v, int) and not isinstance(v, bool) and v > 0,
                   f"must be a positive integer, got {v!r}")
        _check(e, f"{p}.env_kwargs", isinstance(self.env_kwargs, dict) and all(isinstance(k, str) for k in self.env_kwargs),
               f"must be a mapping of option names to values, got {self.env_kwargs!r}")
        return e


@dataclass
class Config:
    name: str = "pusht"
    env: str = "pusht"
    model: ModelConfig = field(default_factory=ModelConfig)
    sigreg: SIGRegConfig = field(default_factory=SIGRegConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    data: DataConfig = field(default_factory=DataConfig)

    # -- checks ------------------------------------------------------------------------------------
    def errors(self) -> list:
        """Every out-of-range field, as ConfigError objects (empty when the config is valid)."""
        e: list = []
        for f in ("model", "sigreg", "train", "plan", "data"):
            e += getattr(self, f)._errors(f)
        return e

    def validate(self) -> "Config":
        """Raise ConfigError for the first out-of-range field (the others are named after it). Called by
        preset(), replace(), from_dict(), LeWM() and Trainer(), so every entry point checks alike."""
        e = self.errors()
        if e:
            more = f" (and {len(e) - 1} more: {', '.join(x.field for x in e[1:])})" if len(e) > 1 else ""
            raise ConfigError(e[0].field, e[0].message + more)
        return self

    # -- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        return _merge(cls(), d, path="config").validate()

    def replace(self, **overrides: Any) -> "Config":
        """A copy with nested overrides: cfg.replace(model={"image_size": 64}, name="x")."""
        return _merge(copy.deepcopy(self), overrides, path="config").validate()




def parse_key_value(s: str, flag: str) -> tuple[str, Any]:
    """A command line's 'KEY=VALUE' -> (KEY, VALUE read as JSON: numbers, true/false, lists; else the
    string as written). UserError naming `flag` when it has no '=' or no key."""
    key, sep, val = str(s).partition("=")
    if not sep or not key.strip():
        raise UserError(f"{flag} must look like KEY=VALUE, got {s!r}")
    try:
        return key.strip(), json.loads(val)
    except json.JSONDecodeError:
        return key.strip(), val


def _merge(obj, d: dict, path: str):
    names = {f.name: f for f in fields(obj)}
    for k, v in d.items():
        if k not in names:
            raise ConfigError(f"{path}.{k}", f"unknown config field '{path}.{k}' (known: {', '.join(sorted(names))})")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if dataclasses.is_dataclass(v):
                v = asdict(v)
            if not isinstance(v, dict):
                raise ConfigError(f"{path}.{k}", f"expects a mapping, got {type(v).__name__}")
            _merge(cur, v, f"{path}.{k}")
        else:
            if isinstance(cur, bool) and not isinstance(v, bool):
                raise ConfigError(f"{path}.{k}", f"expects a bool, got {v!r}")
            if isinstance(cur, (int, float)) and not isinstance(cur, bool):
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    raise ConfigError(f"{path}.{k}", f"expects a number, got {v!r}")
                if isinstance(cur, int) and isinstance(v, float):
                    if not v.is_integer():
                        raise ConfigError(f"{path}.{k}", f"expects an integer, got {v!r}")
                    v = int(v)
                elif isinstance(cur, float):
                    v = float(v)
            setattr(obj, k, v)
    return obj


# -- presets -------------------------------------------------------------------------------------
# Each preset is a dict of overrides on the reference defaults. Full-size presets keep the
# reference architecture; they differ in env, action_dim and CEM iterations.
_PRESETS: dict[str, dict] = {
    # The reference's full size: ViT-tiny/14 at 224 px, 6-layer predictor, CEM 300 x 30 x 30.
    # Data sizes follow the reference's data sets (reference.md section 6): PushT ~18.7k expert
    # episodes of ~125 rows, TwoRoom 10k expert episodes of <= 100 steps, Cube and Reacher 10k x 200.
    # History is 3 frames for every env (the reference code; the paper reportedly used 1 for TwoRoom).
    "pusht": {"env": "pusht", "model": {"action_dim": 2}, "plan": {"iterations": 30},
              "data": {"episodes": 18685, "max_steps": 150}},
    # The paper used 10 CEM iterations outside PushT (reference.md section 7, issue #41).
    "tworoom": {"env": "tworoom", "model": {"action_dim": 2}, "plan": {"iterations": 10},
                "data": {"episodes": 10000, "max_steps": 100}},
    "cube": {"env": "cube", "model": {"action_dim": 5}, "plan": {"iterations": 10},
             "data": {"episodes": 10000, "max_steps": 200}},
    "reacher": {"env": "reacher", "model": {"action_dim": 2}, "plan": {"iterations": 10},
                "data": {"episodes": 10000, "max_steps": 200}},
    # Small presets for the CPU: same code, smaller numbers.
    "tiny": {
        "env": "tworoom",
        "model": {
            "image_size": 32, "patch_size": 8, "enc_width": 32, "enc_depth": 2, "enc_heads": 2,
            "embed_dim": 32, "proj_hidden": 64, "action_hidden": 64,
            "pred_depth": 2, "pred_heads": 2, "pred_dim_head": 16, "pred_mlp": 64,
        },
        "sigreg": {"num_proj": 64},
        "train": {"batch_size": 16, "lr": 2e-3, "workers": 0, "log_every": 5, "ckpt_every": 50},
        "plan": {"samples": 64, "elites": 8, "iterations": 5},
        "data": {"episodes": 300, "max_steps": 100, "image_size": 32},
    },
    # The CPU quickstart: TwoRoom at 32 px with the tiny architecture and the reference's TwoRoom CEM
    # (300 x 30 x 10); why this size (a wider model learned less in twice the time) and what it
    # reaches: README, Quickstart.
    "tworoom-cpu": {
        "env": "tworoom",
        "model": {
            "image_size": 32, "patch_size": 8, "enc_width": 32, "enc_depth": 2, "enc_heads": 2,
            "embed_dim": 32, "proj_hidden": 64, "action_hidden": 64,
            "pred_depth": 2, "pred_heads": 2, "pred_dim_head": 16, "pred_mlp": 64,
            # at this scale (8 px patches, width 32, 3000 steps) timm's init and direct 32 px drawing are
            # what learns; HF's init and the reference's 224-then-resize frames do not (README, Quickstart)
            "init": "timm",
        },
        "sigreg": {"num_proj": 64},
        "train": {"steps": 3000, "batch_size": 32, "lr": 2e-3, "workers": 0, "log_every": 50,
                  "ckpt_every": 1000},
        "plan": {"samples": 300, "elites": 30, "iterations": 10},
        "data": {"episodes": 1000, "max_steps": 100, "image_size": 32, "env_kwargs": {"render": "direct"}},
    },
    # PushT at CPU scale, 64 px, on the planning expert's data (200-step episodes: it reaches most goals
    # in 100-150 steps): a CPU data point, not the paper's setting (preset "pusht" on a GPU); every
    # checkpoint kept for the success-vs-step plot. Its recipe, times and success: README, Results.
    "pusht-cpu": {
        "env": "pusht",
        "model": {
            "image_size": 64, "patch_size": 8, "enc_width": 96, "enc_depth": 4, "enc_heads": 3,
            "embed_dim": 64, "proj_hidden": 256, "action_hidden": 128,
            "pred_depth": 3, "pred_heads": 4, "pred_dim_head": 32, "pred_mlp": 256, "init": "timm",
        },
        "sigreg": {"num_proj": 256},
        "train": {"steps": 6000, "batch_size": 32, "lr": 1e-3, "workers": 0, "log_every": 50,
                  "ckpt_every": 1000, "keep": 0},
        "plan": {"samples": 300, "elites": 30, "iterations": 30},
        "data": {"episodes": 1000, "max_steps": 200, "image_size": 64},
    },
    # Reacher at CPU scale, 64 px, the reference's random uniform data: pusht-cpu's model with the
    # reference's Reacher CEM (300 x 30 x 10); every checkpoint kept for the success-vs-step plot.
    # Its recipe, times and success: README, Results.
    "reacher-cpu": {
        "env": "reacher",
        "model": {
            "image_size": 64, "patch_size": 8, "enc_width": 96, "enc_depth": 4, "enc_heads": 3,
            "embed_dim": 64, "proj_hidden": 256, "action_hidden": 128,
            "pred_depth": 3, "pred_heads": 4, "pred_dim_head": 32, "pred_mlp": 256, "init": "timm",
        },
        "sigreg": {"num_proj": 256},
        "train": {"steps": 6000, "batch_size": 32, "lr": 1e-3, "workers": 0, "log_every": 50,
                  "ckpt_every": 1000, "keep": 0},
        "plan": {"samples": 300, "elites": 30, "iterations": 10},
        "data": {"episodes": 1000, "max_steps": 200, "image_size": 64},
    },
}


# Cube at CPU scale, 64 px, OGBench's oracle data (as the reference collects it): reacher-cpu's model,
# training and CEM (300 x 30 x 10, the reference's for Cube) with a 5-D action. Its recipe, times and
# success: README, Results.
_PRESETS["cube-cpu"] = copy.deepcopy(_PRESETS["reacher-cpu"])
_PRESETS["cube-cpu"]["env"] = "cube"
_PRESETS["cube-cpu"]["model"]["action_dim"] = 5

# The width ablation of PushT at CPU scale (README, Results: "what limits them"): pusht-cpu with a
# wider encoder (128) and latent (128-d instead of 64), the predictor's MLP and the projector widened too;
# tests whether the 64-d latent is what keeps the block's angle and the agent's position out.
_PRESETS["pusht-cpu-wide"] = copy.deepcopy(_PRESETS["pusht-cpu"])
_PRESETS["pusht-cpu-wide"]["model"].update(enc_width=128, enc_heads=4, embed_dim=128, proj_hidden=512,
                                           pred_mlp=512)

# The image-size ablation of the CPU presets (README, Results: "what limits them"): the same model at
# 96 px with 12 px patches, so the encoder sees the same 8 x 8 tokens (same cost) with 2.25x the pixels
# in each; tests whether the 64 px frame is what keeps the block's angle / the arm's joints out of the latent.
for _name in ("pusht-cpu", "reacher-cpu"):
    _p = copy.deepcopy(_PRESETS[_name])
    _p["model"].update(image_size=96, patch_size=12)
    _p["data"]["image_size"] = 96
    _PRESETS[_name + "96"] = _p
del _name, _p


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def preset(name: str = "pusht", **overrides: Any) -> Config:
    """A named config. `preset("pusht")` is the reference's full size.

    Keyword overrides are merged into the sections: preset("tiny", train={"steps": 10}).
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown preset '{name}' (known: {', '.join(preset_names())})")
    cfg = Config(name=name)
    cfg = _merge(cfg, copy.deepcopy(_PRESETS[name]), path=f"preset[{name}]")
    if overrides:
        cfg = _merge(cfg, overrides, path="config")
    return cfg.validate()


def resolve_device(device: str | None) -> str:
    """'auto' (or None): CUDA when there is a GPU, else the CPU. A CUDA device asked for on a machine
    without one is refused, naming the flag."""
    import torch
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    return str(device)
