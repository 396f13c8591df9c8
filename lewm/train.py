"""Training: `lewm train` in one process or under `torchrun` (DDP).

One step: clips (B, 4 frames) -> encode all frames -> predict frames 1..3 from frames 0..2 and their
actions -> loss = MSE(pred, next embeddings) + lambda * SIGReg(all frames' embeddings). AdamW,
1% linear warm-up then cosine to 0, gradient clipping at 1.0, bf16 autocast on CUDA.

Speed paths (the eager step stays the reference):
  --compile      torch.compile of the loss (forward + backward through AOTAutograd); CPU or CUDA
  --cuda-graphs  the whole static-shape step (forward, backward, clipping, AdamW) captured once in a
                 CUDA graph and replayed; combined with --compile the compiled code is captured

Everything needed to continue exactly is in each checkpoint: weights, AdamW state, step and RNG
states. The data order and the SIGReg directions are pure functions of (seed, step), so a resumed
run sees the same batches and directions as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from . import cuda_graph
from .checkpoint import CKPT_DIR, fault_point, find_latest, load_training, save_training, training_config
from .distributed import init_distributed, shutdown
from .errors import UserError
from .config import Config, ConfigError, parse_key_value, preset, preset_names
from .data.dataset import BatchSampler, ClipDataset, make_loader, split_episodes, steps_per_epoch
from .model import LeWM
from .nvtx import nvtx_range
from .plots import plot_curves
from .sigreg import effective_rank

# Config fields a resumed run may change without changing the run: how often it logs and saves, how many
# checkpoints it keeps, how it reads the data. Anything else (steps, lr, the model, ...) changes the
# run, and --resume refuses it unless --allow-config-change is given.
RESUME_FREE = {"train.log_every", "train.ckpt_every", "train.keep", "train.workers", "train.cache",
               "train.val_every"}
RESUME_IGNORED_SECTIONS = ("plan", "data")  # not read by training


class Interrupted(KeyboardInterrupt):
    """SIGINT during training: raised after the step in progress, with what was saved."""


# -- the schedule ------------------------------------------------------------------------------------
def lr_at(step: int, total: int, base_lr: float, warmup_frac: float) -> float:
    """Linear warm-up from 0 over int(warmup_frac * total) steps (at least 1; the reference's
    LinearWarmupCosineAnnealingLR default), then cosine to 0 at `total`."""
    warm = max(1, int(warmup_frac * total))
    if step < warm:
        return base_lr * step / warm
    p = min(1.0, (step - warm) / max(1, total - warm))
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * p))


def config_changes(saved: dict, cfg: Config) -> list[str]:
    """'train.lr: 0.002 -> 0.001' for every field that differs and changes the run (RESUME_FREE and the
    plan/data sections aside)."""
    now = cfg.to_dict()
    out = []
    for sec, fields_ in now.items():
        if sec in RESUME_IGNORED_SECTIONS or not isinstance(fields_, dict):
            continue
        old = saved.get(sec, {}) if isinstance(saved.get(sec), dict) else {}
        for k, v in fields_.items():
            name = f"{sec}.{k}"
            if name in RESUME_FREE:
                continue
            if k not in old or old[k] != v:
                out.append(f"{name}: {old.get(k, '(absent)')!r} -> {v!r}")
    return out


# -- the step ----------------------------------------------------------------------------------------
class Trainer:
    """Owns the model, optimiser, data and the step function for one run."""

    def __init__(self, cfg: Config, data: str | os.PathLike, out: str | os.PathLike, device: str = "auto",
                 compile: bool = False, cuda_graphs: bool = False, resume: bool | str = False,
                 progress: bool = True, log=print, allow_config_change: bool = False):
        cfg.validate()  # ConfigError naming the first out-of-range field
        self.cfg, self.out, self.log = cfg, Path(out), log
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if cuda_graphs and not (device.startswith("cuda") and torch.cuda.is_available()):
            raise UserError("--cuda-graphs needs a CUDA device (none is available here); "
                            "drop the flag, or use --compile on the CPU")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available on this machine")
        self.dist = init_distributed(device)
        if cuda_graphs and self.dist.world > 1:
            raise UserError("--cuda-graphs is single-process for now: capturing a DDP step needs DDP built "
                            "on the capture stream and 11+ eager iterations first (not verified on a GPU); "
                            "under torchrun use --compile")
        if device.startswith("cuda") and self.dist.world > 1:
            device = f"cuda:{self.dist.local_rank}"
        if device.startswith("cuda"):
            # the Triton kernels (fused SIGReg) launch on the current device, whatever the tensors'
            torch.cuda.set_device(torch.device(device))
        self.device = torch.device(device)
        self.compile, self.cuda_graphs, self.progress = compile, cuda_graphs, progress and self.dist.main
        tc, mc = cfg.train, cfg.model

        # data: episodes split once, with the training seed, into train and held-out
        from .data.format import inspect
        info = inspect(data)
        train_eps, val_eps = split_episodes(info.num_episodes, tc.val_frac, tc.seed)
        self.data_path = Path(data)
        self.train_ds = ClipDataset(data, tc.num_frames, mc.frameskip, train_eps, cache=tc.cache,
                                    image_size=mc.image_size, action_dim=mc.action_dim, progress=self.progress)
        self.val_ds = None
        if len(val_eps):
            from .data.format import DataError
            try:
                self.val_ds = ClipDataset(data, tc.num_frames, mc.frameskip, val_eps, cache=tc.cache,
                                          image_size=mc.image_size, action_dim=mc.action_dim)
            except DataError as e:
                if "shorter than a clip" not in str(e):
                    raise
                self.val_ds = None  # held-out episodes too short for a clip: no validation loss
                self.log(f"note: no held-out loss: {e}")
        if tc.num_frames - 1 > mc.history:
            raise UserError(f"train.num_frames - 1 ({tc.num_frames - 1}) context frames exceed "
                            f"model.history ({mc.history})")
        spe = steps_per_epoch(len(self.train_ds), tc.batch_size, self.dist.world)
        if spe == 0:
            raise UserError(f"{data}: {len(self.train_ds)} training clips is fewer than one batch of "
                            f"{tc.batch_size * self.dist.world}; lower --batch-size or collect more episodes")
        self.total_steps = tc.steps if tc.steps > 0 else tc.epochs * spe
        self.steps_per_epoch = spe

        torch.manual_seed(tc.seed)
        np.random.seed(tc.seed % 2**32)
        random.seed(tc.seed)
        self.model = LeWM(cfg)
        self.model.set_action_stats(self.train_ds.action_mean, self.train_ds.action_std)
        self.model.to(self.device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay,
                                     **({"capturable": True} if cuda_graphs else {}))
        self.step = 0
        latest = find_latest(self.out)
        if resume:
            ck = Path(resume) if isinstance(resume, str) else latest
            if ck is None:
                raise UserError(f"--resume: no checkpoint under {self.out / CKPT_DIR}")
            changed = config_changes(training_config(ck), cfg)
            if changed and not allow_config_change:
                raise UserError(f"--resume: the config differs from checkpoint {ck}'s ({'; '.join(changed)}); "
                                "a resumed run would not continue the same run. Use the same flags, or pass "
                                "--allow-config-change to continue with the new values")
            if changed:
                self.log(f"resuming with a changed config: {'; '.join(changed)}")
            self.step = load_training(ck, self.model, self.opt, self.device)
            self.log(f"resumed from {ck} at step {self.step}")
        elif latest is not None:
            raise UserError(f"--out {self.out} already holds checkpoints ({latest.name}); pass --resume to "
                            "continue that run or choose another --out")
        self.amp = tc.amp and self.device.type == "cuda"
        self.ddp = None
        fwd = self.model
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.ddp = fwd = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.forward = torch.compile(fwd) if compile else fwd
        self.graph = None
        self._bad = torch.zeros((), dtype=torch.bool, device=self.device)

    # one optimisation step on a batch; returns the loss dict (device tensors, no host sync)
    def _step_eager(self, pixels, actions, directions, lr):
        for g in self.opt.param_groups:
            if torch.is_tensor(g["lr"]):
                g["lr"].fill_(lr)
            else:
                g["lr"] = lr
        with nvtx_range("forward"), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.forward(pixels=pixels, actions=actions, directions=directions)
        with nvtx_range("backward"):
            out["loss"].backward()
        fault_point("step_mid")
        with nvtx_range("optimizer"):
            gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=not self.cuda_graphs)
        return {"loss": out["loss"].detach(), "pred_loss": out["pred_loss"].detach(),
                "sigreg": out["sigreg"].detach(), "grad_norm": gn.detach(), "emb": out["emb"].detach()}

    def _graph_body(self, st: dict) -> dict:
        """The step as the CUDA graph captures it (lewm/cuda_graph.py): inputs from static buffers, the
        learning rate from a device tensor, gradients zeroed in place."""
        for g in self.opt.param_groups:
            g["lr"].copy_(st["lr"])
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            out = self.forward(pixels=st["pixels"], actions=st["actions"], directions=st["directions"])
        out["loss"].backward()
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)
        return {"loss": out["loss"].detach(), "pred_loss": out["pred_loss"].detach(),
                "sigreg": out["sigreg"].detach(), "grad_norm": gn.detach(), "emb": out["emb"].detach()}

    def snapshot(self) -> dict:
        """What the warm-up steps before a CUDA-graph capture change (cuda_graph.snapshot)."""
        return cuda_graph.snapshot(self.model, self.opt, self.device)

    def restore(self, snap: dict) -> None:
        cuda_graph.restore(self.model, self.opt, snap, self.device)

    def train_step(self, pixels, actions) -> dict:
        tc = self.cfg.train
        with nvtx_range("data_to_device"):
            pixels = pixels.to(self.device, non_blocking=True)
            actions = actions.to(self.device, non_blocking=True)
        directions = self.model.sigreg.directions(self.step, self.device)
        lr = lr_at(self.step, self.total_steps, tc.lr, tc.warmup_frac)
        if self.cuda_graphs:
            if self.graph is None:
                self.graph = cuda_graph.GraphedStep(self._graph_body, self.model, self.opt, self.device)
            with nvtx_range("graph_replay"):
                out = self.graph(pixels=pixels, actions=actions, directions=directions, lr=lr)
        else:
            out = self._step_eager(pixels, actions, directions, lr)
        self._bad |= ~torch.isfinite(out["loss"])
        self.step += 1
        return out

    def check_finite(self, where: str) -> None:
        if bool(self._bad):  # host sync: only at log and checkpoint times
            last = find_latest(self.out)
            raise UserError(f"loss became NaN or inf by step {self.step} ({where}); stopped. Last good "
                            f"checkpoint: {last if last else 'none written yet'}. Lower --lr or check the data.")

    @torch.no_grad()
    def recalibrate_bn(self) -> None:
        """Re-estimate every BatchNorm's running mean and variance for the current weights, from
        `train.bn_batches` training batches (a plain average, not the training EMA).

        Training normalises with each batch's own statistics; eval mode (validation, planning, probes)
        uses the running statistics, an EMA with momentum 0.1 that lags behind the weights while the
        learning rate is high (on the quickstart, an eval-mode loss orders of magnitude above the
        batch-statistics loss, on training and held-out clips alike: README). So the statistics are
        re-estimated before every validation and checkpoint. Deterministic (batches drawn from
        (seed, step)), no global RNG used (dropout off), weights untouched: a resumed run matches."""
        bns = [m for m in self.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if not bns:
            return
        tc = self.cfg.train
        was_training = self.model.training
        self.model.eval()
        saved = []
        for m in bns:
            saved.append(m.momentum)
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
            m.train()
        try:
            rng = np.random.default_rng([tc.seed, self.step, 0xB4])
            bs = min(tc.batch_size, len(self.train_ds))
            for _ in range(tc.bn_batches):
                px, act = self.train_ds.batch(np.sort(rng.choice(len(self.train_ds), size=bs, replace=False)))
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    z = self.model.encode(px.to(self.device))
                    a = self.model.action_encoder(torch.nan_to_num(act.to(self.device), nan=0.0))
                    self.model.pred_proj(self.model.predictor(z[:, :-1], a[:, :-1]))
        finally:
            for m, mom in zip(bns, saved):
                m.momentum = mom
            self.model.train(was_training)

    @torch.no_grad()
    def validate(self, max_batches: int = 8) -> float | None:
        """Held-out prediction loss in eval mode (what planning sees), after recalibrate_bn(), on the same
        fixed held-out clips every time (so the points of the curve are comparable)."""
        if self.val_ds is None or len(self.val_ds) < 2:
            return None
        self.recalibrate_bn()
        self.model.eval()
        bs = min(self.cfg.train.batch_size, len(self.val_ds))
        rng = np.random.default_rng(0)
        losses = []
        try:
            for _ in range(max_batches):
                idx = rng.choice(len(self.val_ds), size=bs, replace=False)
                px, act = self.val_ds.batch(idx)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    out = self.model.loss(pixels=px.to(self.device), actions=act.to(self.device), step=0)
                losses.append(float(out["pred_loss"]))
        finally:
            self.model.train()
        return float(np.mean(losses))

    def val_every(self) -> int:
        """train.val_every, or by default 20 points per run but no more often than the training log."""
        tc = self.cfg.train
        return tc.val_every if tc.val_every > 0 else max(1, tc.log_every, self.total_steps // 20)

    def save(self) -> Path | None:
        if not self.dist.main:
            return None
        self.check_finite("before checkpoint")
        return save_training(self.out, self.model, self.opt, self.step, self.cfg.train.keep,
                               extra={"data": str(self.data_path), "step": self.step,
                                      "total_steps": self.total_steps}, device=self.device)

    # -- SIGINT: finish the step in progress, save, stop ----------------------------------------------
    _sigints = 0

    def _install_sigint(self):
        """Ctrl-C (SIGINT) during run(): the step in progress completes, a checkpoint is written and
        Interrupted is raised saying where it is; a second Ctrl-C stops at once, saying that nothing was
        saved for the current step. Single process, main thread only (under torchrun the default
        behaviour stays: the last periodic checkpoint is what --resume finds)."""
        if self.dist.world > 1 or threading.current_thread() is not threading.main_thread():
            return None
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # nohup, a background job: SIGINT stays ignored
            return None
        self._sigints = 0

        def on_sigint(signum, frame):
            self._sigints += 1
            if self._sigints > 1:
                last = find_latest(self.out)
                raise Interrupted(f"stopped at once at step {self.step}: no checkpoint written for it; the last "
                                  f"complete checkpoint is {last if last else 'none'}")
            print(f"lewm train: interrupt: finishing step {self.step + 1} and saving a checkpoint "
                  "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

        return signal.signal(signal.SIGINT, on_sigint)

    def _save_on_interrupt(self, saved: bool, bar=None) -> None:
        if bar:
            bar.close()
        if saved:
            path = find_latest(self.out)
        else:
            try:
                self.recalibrate_bn()
                path = self.save()
            except UserError as e:
                raise Interrupted(f"at step {self.step}: no checkpoint written ({e})") from None
        raise Interrupted(f"at step {self.step} of {self.total_steps}: checkpoint {path} written; continue with "
                          "--resume")

    def run(self, until: int | None = None) -> dict:
        """Train to the planned total (or stop early at step `until`, with a checkpoint there)."""
        tc = self.cfg.train
        stop = self.total_steps if until is None else min(until, self.total_steps)
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(self.cfg.to_json())
        sampler = BatchSampler(len(self.train_ds), tc.batch_size, tc.seed, self.step, stop,
                               self.dist.rank, self.dist.world)
        log = _RunLog(self, self.out / "metrics.jsonl" if self.dist.main else None)
        prev_handler = self._install_sigint()
        try:
            for pixels, actions in make_loader(self.train_ds, sampler, tc.workers):
                o = self.train_step(pixels, actions)
                log.samples += pixels.shape[0] * self.dist.world
                if self.step % tc.log_every == 0 or self.step == stop:
                    self.check_finite("training")
                    log.train(o)
                log.tick()
                at_ckpt = self.step % tc.ckpt_every == 0 or self.step == stop
                if at_ckpt or self.step % self.val_every() == 0:
                    val = self.validate()  # re-estimates BatchNorm's statistics first
                    if val is not None:
                        log.held_out(val)
                    elif at_ckpt:
                        self.recalibrate_bn()  # checkpoints carry statistics that match their weights
                if at_ckpt:
                    self.save()
                if self._sigints:
                    self._save_on_interrupt(saved=at_ckpt, bar=log.bar)
        finally:
            if prev_handler is not None:
                signal.signal(signal.SIGINT, prev_handler)
            log.close()
        if self.dist.main:
            plot_curves(self.out / "metrics.jsonl", self.out / "curves.png")
        return log.last


class _RunLog:
    """A run's metrics: metrics.jsonl (rank 0), the progress bar, the last record."""

    def __init__(self, tr: Trainer, metrics: Path | None):
        self.tr, self.last, self.samples = tr, {}, 0
        self.f = open(metrics, "a") if metrics is not None else None
        self.bar = None
        if tr.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=tr.total_steps, initial=tr.step, desc="train", unit="step", dynamic_ncols=True)
        self.t_last = time.perf_counter()

    def _write(self, rec: dict) -> None:
        if self.f:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()

    def train(self, o: dict) -> None:
        """A training record from step outputs `o` (device tensors; read here, at log time only)."""
        tr, tc = self.tr, self.tr.cfg.train
        now = time.perf_counter()
        emb = o["emb"].float().reshape(-1, o["emb"].shape[-1])
        rec = {"step": tr.step, "epoch": tr.step / tr.steps_per_epoch,
               "loss": float(o["loss"]), "pred_loss": float(o["pred_loss"]),
               "sigreg": float(o["sigreg"]), "grad_norm": float(o["grad_norm"]),
               "lr": lr_at(tr.step - 1, tr.total_steps, tc.lr, tc.warmup_frac),
               "samples_per_s": self.samples / max(now - self.t_last, 1e-9),
               "emb_std_mean": float(emb.std(0).mean()), "emb_std_min": float(emb.std(0).min()),
               "eff_rank": effective_rank(emb), "time": time.time()}
        self.t_last, self.samples, self.last = now, 0, rec
        self._write(rec)
        if self.bar:
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", pred=f"{rec['pred_loss']:.4f}",
                                 sigreg=f"{rec['sigreg']:.3f}", rank=f"{rec['eff_rank']:.1f}",
                                 sps=f"{rec['samples_per_s']:.0f}")

    def held_out(self, val: float) -> None:
        self._write({"step": self.tr.step, "val_pred_loss": val})
        self.last["val_pred_loss"] = val
        if self.bar:
            self.bar.set_postfix_str(f"{self.bar.postfix}, held-out={val:.4f}" if self.bar.postfix else
                                     f"held-out={val:.4f}")

    def tick(self) -> None:
        if self.bar:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.f:
            try:
                self.f.close()
            except OSError:  # a full disk: the error that stopped the run is the one to report
                pass


# -- the command ------------------------------------------------------------------------------------
def config_from_args(args) -> Config:
    """Preset + the flags given (each flag maps to one config field). An out-of-range value is a
    UserError naming the flag and the config field."""
    cfg = preset(args.preset)
    o: dict = {"model": {}, "train": {}, "sigreg": {}}
    for flag, (sec, fld) in FLAG_FIELDS.items():
        v = getattr(args, flag, None)
        if v is not None:
            o[sec][fld] = v
    if getattr(args, "no_amp", False):
        o["train"]["amp"] = False
    sets = {}  # --set SECTION.FIELD=VALUE: any config field (an ablation without code)
    for item in getattr(args, "set", None) or []:
        key, val = parse_key_value(item, "--set")
        sec, dot, fld = key.partition(".")
        sections = [f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]
        if not dot or not fld or "." in fld or sec not in sections:
            raise UserError(f"--set {item}: the key must be SECTION.FIELD with a section of {', '.join(sections)} "
                            "(e.g. model.pred_depth=6)")
        if fld in o.get(sec, {}):
            raise UserError(f"--set {key}: that field is also given by its own flag in this command; give it once")
        o.setdefault(sec, {})[fld] = val
        sets[key] = item
    try:
        return cfg.replace(**{k: v for k, v in o.items() if v})
    except ConfigError as e:
        if e.field.removeprefix("config.") in sets:
            raise UserError(f"--set {sets[e.field.removeprefix('config.')]}: {e}") from None
        raise UserError(flag_error(e, preset_name=args.preset)) from None


def flag_error(e: ConfigError, preset_name: str | None = None) -> str:
    """ConfigError -> one line naming the command-line flag that sets the field (when one does)."""
    by_field = {f"{sec}.{fld}": flag for flag, (sec, fld) in FLAG_FIELDS.items()}
    flag = by_field.get(e.field)
    where = f" (preset {preset_name})" if preset_name and flag is None else ""
    if flag is None:
        return f"config{where}: {e}"
    return f"--{FLAG_NAMES.get(flag, flag.replace('_', '-'))}: {e}"


FLAG_FIELDS = {
    "steps": ("train", "steps"), "epochs": ("train", "epochs"), "batch_size": ("train", "batch_size"),
    "lr": ("train", "lr"), "weight_decay": ("train", "weight_decay"), "seed": ("train", "seed"),
    "workers": ("train", "workers"), "cache": ("train", "cache"), "log_every": ("train", "log_every"),
    "ckpt_every": ("train", "ckpt_every"), "keep": ("train", "keep"), "val_frac": ("train", "val_frac"),
    "grad_clip": ("train", "grad_clip"),
    "sigreg_weight": ("sigreg", "weight"), "num_proj": ("sigreg", "num_proj"), "sigreg_impl": ("sigreg", "impl"),
    "image_size": ("model", "image_size"), "history": ("model", "history"),
}
FLAG_NAMES = {"sigreg_weight": "lambda"}  # dest -> flag, where they differ


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a world model on HDF5 episodes",
                       description="Train LeWM on HDF5 episodes (reference layout). "
                                   "Multi-GPU: torchrun --nproc_per_node N -m lewm.cli train ...")
    p.add_argument("--data", required=True, help="HDF5 file of episodes (lewm collect writes one)")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, metrics.jsonl, curves.png")
    p.add_argument("--preset", default="pusht", choices=preset_names(), help="model/training preset")
    p.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--lambda", dest="sigreg_weight", type=float, help="SIGReg weight (0.09)")
    p.add_argument("--num-proj", type=int, help="SIGReg directions M (1024)")
    p.add_argument("--sigreg-impl", choices=["eager", "triton", "auto"])
    p.add_argument("--image-size", type=int)
    p.add_argument("--history", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, help="DataLoader processes when pixels are not cached in RAM")
    p.add_argument("--cache", choices=["ram", "none", "auto"])
    p.add_argument("--val-frac", type=float)
    p.add_argument("--log-every", type=int)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--keep", type=int, help="checkpoints kept")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")
    p.add_argument("--cuda-graphs", action="store_true", help="capture the whole step in a CUDA graph (CUDA only)")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="continue from the latest checkpoint in --out (or from the given checkpoint folder); "
                        "refused when the flags change the run (steps, lr, model, ...)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: continue with the changed config (no longer the same run)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="any config field (lewm/config.py), e.g. --set model.pred_depth=6 --set model.pred_dropout=0 "
                        "(repeatable; range-checked like the preset's values)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)


def main(args) -> int:
    cfg = config_from_args(args)  # range checks live in the config (lewm/config.py)
    if args.allow_config_change and not args.resume:
        raise UserError("--allow-config-change only applies with --resume")
    tr = Trainer(cfg, args.data, args.out, device=args.device, compile=args.compile,
                 cuda_graphs=args.cuda_graphs, resume=args.resume, progress=not args.no_progress,
                 allow_config_change=args.allow_config_change)
    if tr.dist.main:
        pc = tr.model.param_counts()
        print(f"lewm train: {cfg.name} preset, {pc['total'] / 1e6:.2f}M params, {len(tr.train_ds)} clips, "
              f"{tr.total_steps} steps of batch {cfg.train.batch_size * tr.dist.world} on {tr.device}"
              f"{' x' + str(tr.dist.world) if tr.dist.world > 1 else ''}"
              f"{' +compile' if args.compile else ''}{' +cuda-graphs' if args.cuda_graphs else ''}", flush=True)
    last = tr.run()
    if tr.dist.main:
        print(json.dumps({k: v for k, v in last.items() if k != "time"}), flush=True)
        print(f"lewm train: checkpoint {find_latest(Path(args.out))}", flush=True)
    shutdown(tr.dist)
    return 0
