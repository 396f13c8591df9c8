"""Success against training step: the evaluation protocol run on every checkpoint a training run kept.

    lewm curve reacher --run runs/reacher-cpu --data reacher64.h5 --planner fast --out runs/reacher-cpu/curve

For each complete checkpoint in RUN/checkpoints (oldest first; `--every K` keeps every K-th) the
protocol of `lewm eval` (lewm/evals/planning.py, docs/evaluation.md) runs on the same held-out episodes
with the same planner seeds, and the random policy runs once on those episodes (it does not depend on the
model). Writes OUT/curve.json (one record per checkpoint: step, success per seed, mean, pooled 95%
interval, time), OUT/curve.csv and OUT/success_vs_step.png (success with its interval against the step,
the random floor as a line), so a reader sees whether more training would help. Each file is written
atomically after every checkpoint, so a cut run leaves the checkpoints done so far.
"""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path

from ..atomic import write_json, write_text
from ..checkpoint import CKPT_DIR, TRAINING_FILES
from ..errors import CheckpointNotFound, UserError


def run_checkpoints(run, every: int = 1) -> list[tuple[int, Path]]:
    """(step, folder) of every complete training checkpoint of run folder `run`, oldest first; with
    every=K, every K-th counted from the newest (the newest is always kept)."""
    root = Path(run) / CKPT_DIR
    if not root.is_dir():
        raise CheckpointNotFound(f"--run {run}: no {CKPT_DIR}/ folder (a run folder written by lewm train)")
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step_") and all((p / f).exists() for f in TRAINING_FILES):
            try:
                found.append((int(p.name[len("step_"):]), p))
            except ValueError:
                continue
    if not found:
        raise CheckpointNotFound(f"--run {run}: no complete checkpoint in {root}")
    if not isinstance(every, int) or every <= 0:
        raise UserError(f"--every must be a positive integer, got {every!r}")
    found.sort()
    return found[::-1][::every][::-1]


def _csv(records: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["step", "success_mean", "ci95_lo", "ci95_hi", "per_seed", "random", "episodes", "seeds",
                "eval_s", "checkpoint"])
    for r in records:
        w.writerow([r["step"], f"{r['mean']:.4f}", f"{r['pooled_ci95'][0]:.4f}", f"{r['pooled_ci95'][1]:.4f}",
                    " ".join(f"{x:.4f}" for x in r["per_seed"]), f"{r['random']:.4f}", r["episodes"], r["seeds"],
                    f"{r['eval_s']:.1f}", r["checkpoint"]])
    return buf.getvalue()


def plot_curve(records: list[dict], png, title: str) -> Path:
    from ..plots import pyplot, save_figure
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r["step"] for r in records]
    ax.fill_between(steps, [100 * r["pooled_ci95"][0] for r in records], [100 * r["pooled_ci95"][1] for r in records],
                    alpha=0.25, label="95% interval (pooled over seeds)")
    ax.plot(steps, [100 * r["mean"] for r in records], "o-", label="trained model")
    ax.axhline(100 * records[0]["random"], color="grey", ls="--", label="random policy, same episodes")
    ax.set_xlabel("training step")
    ax.set_ylabel("success (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return save_figure(fig, png)


def success_curve(env: str, run, data, *, planner: str = "fast", every: int = 1, episodes: int | None = None,
                  seeds: int = 1, seed: int | None = None, device: str = "auto", out=None, progress: bool = True,
                  log=print, **eval_kw) -> list[dict]:
    """Evaluate every kept checkpoint of `run` (see the module docstring); returns the records and, with
    `out`, writes curve.json, curve.csv and success_vs_step.png there after each checkpoint."""
    from .planning import evaluate
    ckpts = run_checkpoints(run, every)
    out = Path(out) if out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    records, random_rate = [], None
    for i, (step, ck) in enumerate(ckpts):
        t0 = time.perf_counter()
        res = evaluate(str(ck), env, data, planner=planner, episodes=episodes, seeds=seeds, seed=seed,
                       device=device, random_baseline=random_rate is None, progress=progress, **eval_kw)
        s = res["seeds"]
        if random_rate is None:
            random_rate = s["random"]["mean"]
        rec = {"step": step, "checkpoint": str(ck), "per_seed": [p["success_rate"] for p in s["per_seed"]],
               "mean": s["mean"], "pooled_ci95": s["pooled_ci95"], "random": random_rate,
               "episodes": res["episodes"], "seeds": seeds, "planner_seeds": s["planner_seeds"],
               "already_solved": res["already_solved"]["count"], "eval_s": time.perf_counter() - t0}
        records.append(rec)
        if log:
            lo, hi = rec["pooled_ci95"]
            log(f"step {step}: {100 * rec['mean']:.1f}% (95% CI {100 * lo:.1f}-{100 * hi:.1f}), "
                f"random {100 * random_rate:.1f}%  [{i + 1}/{len(ckpts)}, {rec['eval_s']:.0f} s]")
        if out:
            write_json({"env": env, "run": str(run), "data": str(data), "planner": planner,
                        "config": res["config"], "records": records}, out / "curve.json")
            write_text(_csv(records), out / "curve.csv")
            plot_curve(records, out / "success_vs_step.png", f"{env}: success vs training step ({planner})")
    return records


def add_parser(sub) -> None:
    p = sub.add_parser("curve", help="success against training step, from a run's checkpoints",
                       description="Run the evaluation protocol on every checkpoint a training run kept "
                                   "(lewm train --keep 0 keeps them all) and plot success against the step "
                                   "beside the random policy on the same episodes.")
    p.add_argument("env", help="environment name (tworoom, pusht, cube, reacher)")
    p.add_argument("--run", required=True, help="training run folder (with checkpoints/)")
    p.add_argument("--data", required=True, help="the run's HDF5 episodes (start and goal rows)")
    p.add_argument("--planner", default="fast", help="planner (fast: the default here; any of lewm eval's)")
    p.add_argument("--every", type=int, default=1, help="every K-th checkpoint, counted from the newest (1)")
    p.add_argument("--episodes", type=int, help="episodes (50)")
    p.add_argument("--seeds", type=int, default=1, help="planner seeds per checkpoint (1)")
    p.add_argument("--seed", type=int, help="start-row draw and first planner seed (42)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--out", required=True, help="folder for curve.json, curve.csv, success_vs_step.png")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)


def main(args) -> int:
    for flag in ("episodes", "seeds"):
        v = getattr(args, flag)
        if v is not None and v <= 0:
            raise UserError(f"--{flag} must be positive, got {v}")
    success_curve(args.env, args.run, args.data, planner=args.planner, every=args.every, episodes=args.episodes,
                  seeds=args.seeds, seed=args.seed, device=args.device, out=args.out,
                  progress=not args.no_progress)
    print(f"wrote {Path(args.out) / 'curve.json'}, curve.csv, success_vs_step.png")
    return 0
