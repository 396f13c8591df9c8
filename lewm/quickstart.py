"""`lewm quickstart`: the whole loop on a CPU in minutes: collect TwoRoom, train, plan, report.

    lewm quickstart --out runs/quickstart

1. collect TwoRoom episodes with the door-seeking expert (noise N(0, 2^2), as the reference);
2. train the `tworoom-cpu` preset (a small LeWM at 32 px: same code as the full model);
3. evaluate with the reference protocol: 50 held-out start rows, goal 25 steps ahead, budget 50,
   CEM 300 samples x 30 elites x 10 iterations, next to the random policy on the same episodes;
4. time one plan with the eager reference planner (re-encoding as the reference did, and encoding
   once) and with the fast planner, on the same start/goal frames, after checking that they agree;
5. write everything into one folder: data, checkpoints, curves.png, results.json, episode GIFs.

Each stage is skipped when its output already exists, so an interrupted quickstart continues.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .atomic import write_json
from .config import preset


def add_parser(sub) -> None:
    p = sub.add_parser("quickstart", help="collect, train and evaluate TwoRoom on this machine")
    p.add_argument("--out", default="runs/quickstart", help="output folder (default runs/quickstart)")
    p.add_argument("--preset", default="tworoom-cpu")
    p.add_argument("--episodes", type=int, help="TwoRoom episodes to collect (default: the preset's, 1000)")
    p.add_argument("--steps", type=int, help="training steps (default: the preset's)")
    p.add_argument("--eval-episodes", type=int, default=50)
    p.add_argument("--planner", default="fast", choices=["cem", "fast"], help="planner for the evaluation")
    p.add_argument("--seed", type=int, default=0, help="data collection seed")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--videos", type=int, default=3)
    p.set_defaults(func=main)


def _stage(name: str) -> None:
    print(f"\n== {name} " + "=" * max(0, 70 - len(name)), flush=True)


def time_planners(model, data_path, n_plans: int = 5, seed: int = 0) -> dict:
    """Median time of one plan for one environment: the eager reference in the reference's costly
    mode (re-encode start and goal every iteration), the eager reference encoding once, and the fast
    planner; all on the same frames and random draws, checked to agree before timing."""
    import h5py

    from .plan import CEMPlanner
    from .plan.engine import FastPlanner

    with h5py.File(data_path, "r") as f:
        px = f["pixels"]
        start, goal = torch.from_numpy(px[0]), torch.from_numpy(px[min(25, len(px) - 1)])
    ref_costly = CEMPlanner.from_config(model, reencode=True)
    ref = CEMPlanner.from_config(model)
    fast = FastPlanner.from_config(model)
    noise = ref.draw_noise(1)
    a, b = ref.plan(start, goal, noise=noise), fast.plan(start, goal, noise=noise)
    agree = bool(torch.allclose(a.cost, b.cost, rtol=1e-3, atol=1e-4))
    out = {"plans_agree": agree, "max_abs_action_diff": float((a.actions - b.actions).abs().max())}
    for name, planner in (("reference_reencode", ref_costly), ("reference", ref), ("fast", fast)):
        planner.plan(start, goal, noise=noise)  # warm-up (compilation, caches)
        ts = []
        for _ in range(n_plans):
            t = time.perf_counter()
            planner.plan(start, goal, noise=noise)
            ts.append(time.perf_counter() - t)
        out[name] = {"median_ms": 1e3 * float(np.median(ts)), "min_ms": 1e3 * float(np.min(ts)),
                     "max_ms": 1e3 * float(np.max(ts)), "n": n_plans}
    out["speedup_vs_reference_reencode"] = out["reference_reencode"]["median_ms"] / out["fast"]["median_ms"]
    out["speedup_vs_reference"] = out["reference"]["median_ms"] / out["fast"]["median_ms"]
    return out


def main(args) -> int:
    from .errors import UserError
    from .data.collect import collect
    from .evals.planning import evaluate, save_results
    from .checkpoint import find_latest
    from .train import Trainer

    if (args.episodes is not None and args.episodes <= 0) or args.eval_episodes <= 0:
        raise UserError("--episodes and --eval-episodes must be positive")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = preset(args.preset)
    if args.episodes is None:
        args.episodes = cfg.data.episodes
    if args.steps:
        cfg = cfg.replace(train={"steps": args.steps})
    timings = {}

    _stage(f"1/4 collect {args.episodes} TwoRoom episodes at {cfg.model.image_size} px")
    data = out / "tworoom.h5"
    t = time.time()
    if data.exists():
        print(f"reusing {data}")
    else:
        collect("tworoom", args.episodes, data, image_size=cfg.model.image_size, seed=args.seed,
                max_steps=cfg.data.max_steps, progress=True, env_kwargs=cfg.data.env_kwargs or None)
    timings["collect_s"] = time.time() - t

    _stage(f"2/4 train the {cfg.name} preset for {cfg.train.steps} steps")
    run = out / "run"
    t = time.time()
    latest = find_latest(run)
    if latest is not None and int(latest.name.split("_")[1]) >= cfg.train.steps:
        print(f"reusing {latest}")
    else:
        tr = Trainer(cfg, data, run, device=args.device, resume=latest is not None)
        pc = tr.model.param_counts()
        print(f"{pc['total'] / 1e6:.2f}M parameters, {len(tr.train_ds)} training clips, device {tr.device}")
        last = tr.run()
        print(f"final: prediction loss {last['pred_loss']:.4f}, held-out {last.get('val_pred_loss', float('nan')):.4f}, "
              f"SIGReg {last['sigreg']:.3f}, effective rank {last['eff_rank']:.1f} of {cfg.model.embed_dim}")
        latest = find_latest(run)
    timings["train_s"] = time.time() - t

    _stage(f"3/4 plan: {args.eval_episodes} held-out episodes, goal +25 steps, budget 50")
    t = time.time()
    res = evaluate(latest, "tworoom", data, planner=args.planner, episodes=args.eval_episodes,
                   device=args.device, random_baseline=True, videos=args.videos, progress=True)
    saved = save_results(res, out / "eval")
    timings["eval_s"] = time.time() - t

    _stage("4/4 planning latency, one plan for one environment")
    from .model import LeWM
    from .config import resolve_device
    model = LeWM.load(latest, map_location=resolve_device(args.device))
    t = time.time()
    lat = time_planners(model, data)
    timings["latency_s"] = time.time() - t
    timings["total_s"] = time.time() - t0

    lo, hi = res["ci95"]
    rb = res["random_baseline"]
    summary = {
        "date": time.strftime("%Y-%m-%d"), "device": str(model.action_mean.device),
        "torch_threads": torch.get_num_threads(), "preset": cfg.name, "train_steps": cfg.train.steps,
        "episodes_collected": args.episodes, "image_size": cfg.model.image_size,
        "success_rate": res["success_rate"], "ci95": res["ci95"],
        "random_success_rate": rb["success_rate"], "random_ci95": rb["ci95"],
        "already_solved": res["already_solved"]["count"], "exclude_solved": res["already_solved"]["excluded"],
        "planner": args.planner, "latency": lat, "timings": timings,
        "checkpoint": str(latest), "videos": saved.get("videos", []),
    }
    write_json(summary, out / "quickstart.json")

    _stage("results")
    print(f"TwoRoom success   {100 * res['success_rate']:.0f}%  (95% CI {100 * lo:.0f}-{100 * hi:.0f}%, "
          f"{res['num_successes']}/{res['episodes']} episodes, {args.planner} planner)")
    print(f"random policy     {100 * rb['success_rate']:.0f}%  (95% CI {100 * rb['ci95'][0]:.0f}-"
          f"{100 * rb['ci95'][1]:.0f}%, same episodes)")
    print(f"already solved    {res['already_solved']['count']} of {res['already_solved']['of']} drawn start/goal "
          "pairs, replaced by unsolved ones (docs/evaluation.md)")
    print(f"one plan, 1 env   reference (re-encoding) {lat['reference_reencode']['median_ms']:.0f} ms | "
          f"reference {lat['reference']['median_ms']:.0f} ms | fast {lat['fast']['median_ms']:.0f} ms  "
          f"-> {lat['speedup_vs_reference_reencode']:.1f}x / {lat['speedup_vs_reference']:.1f}x "
          f"(plans agree: {lat['plans_agree']})")
    print(f"wall time         {timings['total_s'] / 60:.1f} min (collect {timings['collect_s']:.0f} s, "
          f"train {timings['train_s']:.0f} s, eval {timings['eval_s']:.0f} s, latency {timings['latency_s']:.0f} s)")
    print(f"artefacts         {out}/ (quickstart.json, run/curves.png, run/checkpoints/, eval/results.json, eval/videos/)")
    return 0
