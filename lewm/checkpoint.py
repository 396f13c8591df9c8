"""Checkpoints: the one module that writes, finds and reads them. Nothing is unpickled: weights are
safetensors, everything else JSON.

A model checkpoint is a folder:

    model.safetensors   the weights (and the action normaliser's buffers)
    config.json         {"format": "lewm/1", "config": {...Config.to_dict()...}, ...extra}

A training checkpoint adds what continues a run exactly, beside the model:

    optim.safetensors   AdamW moments and steps, keyed "<parameter name>::<state key>"
    rng.safetensors     the torch (and CUDA) generator states
    state.json          step, the optimiser's param groups and scalars, numpy and python RNG states

A training run folder keeps them as run/checkpoints/step_XXXXXXXX/ with a `latest` pointer file.
`resolve` accepts any of: a checkpoint folder, a file inside one, a run folder (its latest complete
checkpoint). `load` refuses a format version it does not know, naming the file.

    model = LeWM.load("runs/tworoom")                              # any form resolve() takes
    cfg = checkpoint.read_config("runs/tworoom")                  # without loading the weights
    checkpoint.save_training(run, model, opt, step, keep=3, extra={})

This module sits below the model (it handles state dicts and configs, not LeWM itself):
`LeWM.save` / `LeWM.load` call `write_model` / `read_model`.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_dir, fsync_dir, write_text
from .config import Config
from .errors import CheckpointError, CheckpointNotFound

FORMAT = "lewm/1"  # config.json's "format"; bump when a checkpoint written now could not be read as before
FORMATS_READ = (FORMAT,)
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CKPT_DIR = "checkpoints"
OPTIM = "optim.safetensors"
RNG = "rng.safetensors"
STATE = "state.json"
TRAINING_FILES = (WEIGHTS, CONFIG, OPTIM, RNG, STATE)  # what load_training reads


# -- fault points (the fault tests' deterministic kill points) --------------------------------------------
_FAULT_HITS: dict = {}


def fault_point(name: str) -> None:
    """Deterministic fault points for the fault tests: LEWM_FAULT=NAME@K[:SIG] sends signal SIG (KILL by
    default, or INT) to this process the K-th time (default the 1st) it reaches point NAME. Points:
    step_mid (after the backward, before the optimizer; lewm/train.py), ckpt_mid_write, ckpt_before_rename,
    ckpt_before_latest, ckpt_before_prune. Unset in normal use: one environment lookup."""
    spec = os.environ.get("LEWM_FAULT")
    if not spec:
        return
    where, _, sig = spec.partition(":")
    point, _, k = where.partition("@")
    if point != name:
        return
    _FAULT_HITS[name] = _FAULT_HITS.get(name, 0) + 1
    if _FAULT_HITS[name] == int(k or 1):
        os.kill(os.getpid(), getattr(signal, f"SIG{sig or 'KILL'}"))


# -- reading the files ------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint file {path} is unreadable ({e}); it is truncated or was edited: "
                              "resume from an older checkpoint (--resume DIR) or start a new --out") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"checkpoint file {path} is not a JSON object; it was edited")
    return d


def _read_safetensors(path: Path, device="cpu") -> dict:
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types (SafetensorError, ...)
        raise CheckpointError(f"checkpoint file {path} is unreadable ({type(e).__name__}: {e}); it is truncated "
                              "or was edited: resume from an older checkpoint (--resume DIR) or start a new "
                              "--out") from None


def _check_format(meta: dict, cfg_file: Path) -> None:
    fmt = meta.get("format")
    if fmt not in FORMATS_READ:
        got = f"format {fmt!r}" if fmt is not None else "no \"format\" field (not written by lewm's save)"
        raise CheckpointError(f"checkpoint config {cfg_file} has {got}; this version of lewm reads "
                              f"{', '.join(FORMATS_READ)} (a reference checkpoint: lewm convert)")


# -- finding a checkpoint --------------------------------------------------------------------------------
def find_latest(out: str | os.PathLike) -> Path | None:
    """The newest complete training checkpoint folder of run folder `out` (or None)."""
    root = Path(out) / CKPT_DIR
    if not root.exists():
        return None
    ptr = root / "latest"
    if ptr.exists():
        try:
            cand = root / ptr.read_text().strip()
        except OSError:
            cand = None
        if cand is not None and cand.name.startswith("step_") and all((cand / f).exists() for f in TRAINING_FILES):
            return cand
    ckpts = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
                   and all((p / f).exists() for f in TRAINING_FILES))
    return ckpts[-1] if ckpts else None


def resolve(path, flag: str | None = "--checkpoint") -> Path:
    """The checkpoint folder meant by `path`: a checkpoint folder (model.safetensors + config.json), a file
    inside one, or a training run folder (its latest complete checkpoint). Errors name `flag` (the
    command-line flag the path came from; None for the Python API)."""
    p = Path(path)
    where = f"{flag} {p}" if flag else f"checkpoint {p}"
    if not p.exists():
        raise CheckpointNotFound(f"{flag} {p}: not found" if flag else f"checkpoint not found: {p}")
    if p.is_file():
        p = p.parent
    if not (p / WEIGHTS).exists() and (p / CKPT_DIR).is_dir():
        latest = find_latest(p)
        if latest is None:
            raise CheckpointNotFound(f"{where}: the run folder has no complete checkpoint under {CKPT_DIR}/")
        p = latest
    for f in (CONFIG, WEIGHTS):
        if not (p / f).exists():
            raise CheckpointNotFound(f"{where}: not a checkpoint (no {f})")
    return p


# -- model checkpoints ------------------------------------------------------------------------------
def write_model(path, state_dict: dict, config: dict, extra: dict | None = None) -> Path:
    """Write folder `path` (model.safetensors + config.json) atomically: a temporary folder renamed into
    place; an existing checkpoint there is replaced only once the new one is complete."""
    from safetensors.torch import save_file

    with atomic_dir(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp / WEIGHTS))
        meta = {"config": config, "format": FORMAT}
        if extra:
            meta.update(extra)
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return path


def _meta(ckpt: Path) -> dict:
    """config.json of checkpoint folder `ckpt`, read once and format-checked."""
    meta = _read_json(ckpt / CONFIG)
    _check_format(meta, ckpt / CONFIG)
    return meta


def read_meta(path, flag: str | None = None) -> dict:
    """config.json of the checkpoint `path` resolves to, format-checked."""
    return _meta(resolve(path, flag))


def config_of(meta: dict, ckpt: Path) -> Config:
    """The model's Config in `meta` (config.json of checkpoint folder `ckpt`, as read_meta returns it)."""
    try:
        return Config.from_dict(meta["config"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint config {Path(ckpt) / CONFIG} is unreadable: {e}") from None


def read_config(path, flag: str | None = "--checkpoint") -> Config:
    """The model's Config stored in the checkpoint `path` resolves to."""
    ckpt = resolve(path, flag)
    return config_of(_meta(ckpt), ckpt)


def read_model(path, map_location="cpu", flag: str | None = None) -> tuple[Config, dict, dict, Path]:
    """(config, state dict on `map_location`, config.json's contents, folder) of a model checkpoint."""
    ckpt = resolve(path, flag)
    meta = _meta(ckpt)
    cfg = config_of(meta, ckpt)
    w_file = ckpt / WEIGHTS
    from safetensors.torch import load_file
    try:
        state = load_file(str(w_file), device=str(map_location))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint weights {w_file} are unreadable: {e}") from None
    return cfg, state, meta, ckpt


# -- training checkpoints ----------------------------------------------------------------------------
def _rng_state(device: torch.device) -> dict:
    """Host RNGs, plus the training device's CUDA generator. Under DDP every rank is seeded alike and
    consumes alike, so rank 0's generator state (what the checkpoint holds) is every rank's."""
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _optim_to_flat(opt: torch.optim.Optimizer, model: torch.nn.Module) -> tuple[dict, dict]:
    """AdamW state as flat safetensors (tensors) + JSON (everything else). Keys by parameter name."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors, meta = {}, {"param_groups": []}
    for g in opt.param_groups:
        meta["param_groups"].append({k: (float(v) if torch.is_tensor(v) else v)
                                     for k, v in g.items() if k != "params"})
    for p, st in opt.state.items():
        for k, v in st.items():
            key = f"{names[id(p)]}::{k}"
            if torch.is_tensor(v):
                tensors[key] = v.detach().contiguous().cpu()
            else:
                meta.setdefault("scalars", {})[key] = v
    return tensors, meta


def _capturable(opt) -> bool:
    return any(g.get("capturable", False) for g in opt.param_groups)


def _optim_from_flat(opt: torch.optim.Optimizer, model: torch.nn.Module, tensors: dict, meta: dict) -> None:
    params = dict(model.named_parameters())
    for key, v in tensors.items():
        name, k = key.split("::")
        p = params[name]
        st = opt.state[p]
        if k in st and torch.is_tensor(st[k]):
            st[k].copy_(v.to(st[k].device))
        else:
            # AdamW keeps `step` on the CPU unless capturable (CUDA graphs), the moments beside the param
            st[k] = v.to("cpu") if k == "step" and not _capturable(opt) else v.to(p.device)
    for key, v in meta.get("scalars", {}).items():
        name, k = key.split("::")
        opt.state[params[name]][k] = v


def _is_write_error(e: Exception) -> bool:
    """OSError, or safetensors' own error for a failed write (it wraps the OS error in its message)."""
    return isinstance(e, OSError) or (type(e).__name__ == "SafetensorError" and "I/O error" in str(e))


def save_training(out: Path, model, opt, step: int, keep: int, extra: dict,
                  device: torch.device = torch.device("cpu")) -> Path:
    """out/checkpoints/step_XXXXXXXX/ with the model files, optim.safetensors, rng.safetensors and
    state.json; written to a temporary folder and renamed, then `latest` is updated atomically and all but
    the newest `keep` checkpoints are removed. A failed write (a full disk) removes the temporary folder,
    leaves the previous checkpoints as they were and raises CheckpointError."""
    out = Path(out)
    root = out / CKPT_DIR
    final = root / f"step_{step:08d}"
    try:
        return _save_training(root, final, model, opt, step, keep, extra, device)
    except Exception as e:
        if not _is_write_error(e):
            raise
        prev = find_latest(out)
        full = getattr(e, "errno", None) == 28 or "os error 28" in str(e) or "No space left" in str(e)
        why = "No space left on device (the disk is full)" if full else (getattr(e, "strerror", None) or str(e))
        raise CheckpointError(f"could not write checkpoint {final}: {why}; nothing was changed, the last "
                              f"complete checkpoint is {prev if prev else 'none'}") from None


def _save_training(root, final, model, opt, step, keep, extra, device) -> Path:
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    tmp_parent = Path(tempfile.mkdtemp(prefix=".tmp-ckpt-", dir=root))
    try:
        model.save(tmp_parent / "ckpt", extra=extra)
        tensors, meta = _optim_to_flat(opt, model)
        save_file(tensors, str(tmp_parent / "ckpt" / OPTIM))
        fault_point("ckpt_mid_write")
        rng = _rng_state(device)
        rng_t = {"torch": rng["torch"]}
        if "cuda" in rng:
            rng_t["cuda"] = rng["cuda"]
        save_file(rng_t, str(tmp_parent / "ckpt" / RNG))
        np_state = rng["numpy"]
        state = {"step": step, "optim": meta,
                 "numpy_rng": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                               float(np_state[4])],
                 "python_rng": [rng["python"][0], list(rng["python"][1]), rng["python"][2]]}
        (tmp_parent / "ckpt" / STATE).write_text(json.dumps(state))
        fsync_dir(tmp_parent / "ckpt")
        fault_point("ckpt_before_rename")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp_parent / "ckpt", final)
    finally:
        shutil.rmtree(tmp_parent, ignore_errors=True)
    fault_point("ckpt_before_latest")
    write_text(final.name, root / "latest")
    fault_point("ckpt_before_prune")
    ckpts = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def training_config(path: Path) -> dict:
    """The training config stored in checkpoint folder `path` (config.json's "config"), as a dict."""
    meta = _meta(Path(path))
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"checkpoint file {Path(path) / CONFIG} has no \"config\" mapping; it was edited")
    return meta["config"]


def load_training(path: Path, model, opt, device) -> int:
    """Load weights, AdamW state and RNG states of training checkpoint `path` into `model` and `opt`;
    returns the step to continue from."""
    path = Path(path)
    for f in TRAINING_FILES:
        if not (path / f).exists():
            raise CheckpointError(f"checkpoint {path} is incomplete: no {f}")
    state = _read_json(path / STATE)
    for k in ("step", "optim", "numpy_rng", "python_rng"):
        if k not in state:
            raise CheckpointError(f"checkpoint file {path / STATE} has no '{k}'; it was edited")
    sd = _read_safetensors(path / WEIGHTS, device)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match the model config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    try:
        _optim_from_flat(opt, model, _read_safetensors(path / OPTIM), state["optim"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint file {path / OPTIM} does not match the model ({type(e).__name__}: "
                              f"{e}); it was edited or belongs to another model") from None
    rng = _read_safetensors(path / RNG)
    if "torch" not in rng:
        raise CheckpointError(f"checkpoint file {path / RNG} has no 'torch' generator state; it was edited")
    try:
        torch.set_rng_state(rng["torch"])
        device = torch.device(device)
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
        n = state["numpy_rng"]
        np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
        p = state["python_rng"]
        random.setstate((p[0], tuple(p[1]), p[2]))
        return int(state["step"])
    except (TypeError, ValueError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path}: the RNG state in {RNG} / {STATE} is invalid ({e}); it was "
                              "edited") from None
