"""`lewm eval ENV --checkpoint C --data F`: plan with a checkpoint under the evaluation protocol.

    lewm eval tworoom --checkpoint runs/tworoom --data data/tworoom.h5
    lewm eval tworoom --checkpoint runs/tworoom --data data/tworoom.h5 --planner mppi \\
        --random-baseline --out evals/tworoom --videos 4

The protocol (lewm/plan/mpc.py, docs/evaluation.md): 50 start rows drawn with seed 42 from the
held-out episodes (--split train: every episode, as the reference), goal = the frame 25 raw steps
later, budget 50 steps, replanning every 25 steps, success if the env's success rule holds at any
step. Start/goal pairs already solved before any action are counted and, by default, replaced
(--include-solved keeps them, as the reference). The random policy runs on the same episodes every
time. --seeds N repeats the protocol with N planner seeds. Prints the success rate with its 95%
Wilson interval beside the random policy's, and the planning time per plan; --out writes
results.json (with a record per episode) and GIFs (agent view | goal) of the first --videos episodes.

Every input mistake is reported in one line before any planning starts: a missing checkpoint, a
checkpoint trained for another action dimension, a data set from another environment (its `env`
attribute) or too short for the goal offset, an environment without a success rule. Differing
image sizes are fine (the model's encode resizes frames).
"""
from __future__ import annotations

import argparse

from .mpc import PLANNERS


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="plan with a checkpoint under the evaluation protocol",
                       description="Plan with a checkpoint under the evaluation protocol; print the success rate "
                                   "(95% Wilson interval) and the planning time per plan.",
                       epilog="Defaults for the planner and the protocol come from the checkpoint's plan config "
                              "(reference: CEM 300 samples, 30 elites, 30 iterations (10 outside PushT); "
                              "50 episodes, goal offset 25, budget 50).")
    p.add_argument("env", help="environment name (tworoom, pusht, cube, reacher)")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint folder (model.safetensors + config.json) or a training run folder (its latest)")
    p.add_argument("--data", required=True, help="HDF5 episodes of ENV: start and goal rows are drawn from it")
    p.add_argument("--planner", default="cem", choices=PLANNERS)
    p.add_argument("--episodes", type=int, help="episodes (50)")
    p.add_argument("--goal-offset", type=int, help="raw steps from start row to goal row (25)")
    p.add_argument("--budget", type=int, help="env steps per episode (50)")
    p.add_argument("--samples", type=int, help="planner samples (CEM/MPPI: plan config; gradient: 100)")
    p.add_argument("--iterations", type=int, help="planner iterations (gradient: Adam steps, 30)")
    p.add_argument("--elites", type=int, help="CEM/MPPI elites")
    p.add_argument("--temperature", type=float, help="MPPI temperature (0.5)")
    p.add_argument("--lr", type=float, help="gradient planner learning rate (0.1)")
    p.add_argument("--receding-horizon", type=int, help="macro steps executed per plan (5: the whole plan)")
    p.add_argument("--split", default="heldout", choices=["heldout", "train"],
                   help="heldout: episodes held out of training (default); train: every episode (the reference)")
    p.add_argument("--seed", type=int, help="start-row draw and planner noise (42)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--num-envs", type=int, help="episodes planned per batched call (default: all)")
    p.add_argument("--random-baseline", action="store_true",
                   help="(always on: the random policy runs on the same episodes; kept for old scripts)")
    p.add_argument("--exclude-solved", action=argparse.BooleanOptionalAction, default=True,
                   help="replace start/goal pairs already solved before any action by unsolved ones (default); "
                        "--include-solved / --no-exclude-solved keeps them, as the reference")
    p.add_argument("--include-solved", dest="exclude_solved", action="store_false", help=argparse.SUPPRESS)
    p.add_argument("--seeds", type=int, default=1,
                   help="repeat the protocol with N planner seeds (seed, seed+1, ...) on the same episodes: "
                        "per-seed rates, mean +- std, a pooled 95%% interval")
    p.add_argument("--allow-other-data", action="store_true",
                   help="plan on held-out episodes of a file other than the checkpoint's training data "
                        "(refused by default: its held-out split means nothing there)")
    p.add_argument("--out", help="folder for results.json and videos")
    p.add_argument("--videos", type=int, default=0, help="write GIF/MP4s of the first N episodes (needs --out)")
    p.add_argument("--video-format", default="gif", choices=["gif", "mp4"])
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)


def _fmt_ci(r: dict) -> str:
    lo, hi = r["ci95"]
    return f"{100 * r['success_rate']:.1f}% (95% CI {100 * lo:.1f}-{100 * hi:.1f}%, {r['num_successes']}/{len(r['successes'])})"


def main(args) -> int:
    from ..errors import UserError
    from .mpc import evaluate, save_results

    for flag in ("episodes", "goal_offset", "budget", "samples", "iterations", "elites", "receding_horizon",
                 "num_envs", "seeds"):
        v = getattr(args, flag)
        if v is not None and v <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {v}")
    for flag in ("temperature", "lr"):
        v = getattr(args, flag)
        if v is not None and not v > 0:
            raise UserError(f"--{flag} must be positive, got {v}")
    if args.videos < 0:
        raise UserError(f"--videos must be >= 0, got {args.videos}")
    if args.videos and not args.out:
        raise UserError("--videos needs --out (the folder the videos go to)")
    kw = {"samples": args.samples, "iterations": args.iterations}
    if args.planner in ("cem", "fast", "mppi"):
        kw["elites"] = args.elites
    if args.planner == "mppi":
        kw["temperature"] = args.temperature
    if args.planner == "gradient":
        kw["lr"] = args.lr
    if args.planner == "random":
        kw = {}
    res = evaluate(args.checkpoint, args.env, args.data, planner=args.planner, planner_kw=kw,
                   episodes=args.episodes, goal_offset=args.goal_offset, budget=args.budget,
                   receding_horizon=args.receding_horizon, split=args.split, seed=args.seed, device=args.device,
                   num_envs=args.num_envs, random_baseline=True, exclude_solved=args.exclude_solved,
                   seeds=args.seeds, allow_other_data=args.allow_other_data, videos=args.videos,
                   progress=not args.no_progress, log=print)
    c = res["config"]
    print(f"lewm eval {args.env}: {args.planner}, {c['episodes']} episodes ({c['split']} split, seed {c['seed']}), "
          f"goal offset {c['goal_offset']}, budget {c['budget']}, on {c['device']}")
    a = res["already_solved"]
    print(f"already solved at the start: {a['count']} of {a['of']} drawn pairs"
          + (" (replaced by unsolved pairs)" if a["excluded"] else " (kept, as the reference; --exclude-solved "
                                                                    "replaces them)"))
    print(f"success {_fmt_ci(res)}")
    if "random_baseline" in res:
        print(f"random policy {_fmt_ci(res['random_baseline'])}")
    sd = res["seeds"]
    if len(sd["planner_seeds"]) > 1:
        lo, hi = sd["pooled_ci95"]
        rates = ", ".join(f"{100 * r['success_rate']:.0f}" for r in sd["per_seed"])
        print(f"{len(sd['planner_seeds'])} seeds: {rates} %; mean {100 * sd['mean']:.1f} +- {100 * sd['std']:.1f}, "
              f"pooled {sd['pooled_successes']}/{sd['pooled_trials']} (95% CI {100 * lo:.1f}-{100 * hi:.1f}%)")
        if "random" in sd:
            r = sd["random"]
            print(f"random policy over the seeds: mean {100 * r['mean']:.1f} +- {100 * r['std']:.1f} "
                  f"(95% CI {100 * r['pooled_ci95'][0]:.1f}-{100 * r['pooled_ci95'][1]:.1f}%)")
    pt, pe = res["plan_time_s"], res["plan_time_per_env_s"]
    if pt["n"]:
        print(f"planning time per plan: median {pt['median']:.3f} s (p10 {pt['p10']:.3f}, p90 {pt['p90']:.3f}) "
              f"for {res['envs_per_call']['median']:.0f} envs per call; {1e3 * pe['median']:.1f} ms per env "
              f"({pt['n']} calls)")
    if args.out:
        saved = save_results(res, args.out, video_format=args.video_format)
        print(f"results: {args.out}/results.json" + (f", {len(saved['videos'])} videos" if saved["videos"] else ""))
    return 0
