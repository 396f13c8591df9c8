"""Time one decision (one plan for E environments) of the inverse-dynamics head against CEM, on a trained
checkpoint that has an IDM head (`lewm idm`): planner idm, the eager reference CEM, the fast planner,
both CEM planners started from the head's proposal (--init idm), and, where the checkpoint also has a
reachability head (`lewm reach`), both with the reach cost (--cost reach). Real frames from the data set (start
rows and their goals 25 raw steps later), runs alternated round-robin; a CSV row per planner with its
ratio to the reference CEM measured in the same run.

    python bench/decision_latency.py --checkpoint runs/quickstart/run --data runs/quickstart/tworoom.h5
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402

FIELDS = bu.COMMON_FIELDS + ["checkpoint", "envs", "planner", "samples", "iterations", "median_ms", "p10_ms",
                             "p90_ms", "ratio_vs_reference_cem", "threads"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--envs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--csv", default=str(Path(__file__).resolve().parent.parent / "profiles" / "decision_latency.csv"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from lewm.checkpoint import resolve
    from lewm.data.format import inspect
    from lewm.evals.common import frames_at
    from lewm.evals.planning import qualifying_rows
    from lewm.model import LeWM
    from lewm.plan import make_planner
    from lewm.plan.idm import load_idm

    dev = bu.pick_device(a.device)
    ck = resolve(a.checkpoint)
    model = LeWM.load(ck, map_location=dev)
    head = load_idm(ck, dev)
    info = inspect(a.data)
    rows = qualifying_rows(info.ep_len, info.ep_offset, np.arange(info.num_episodes), 25)[: a.envs]
    px = frames_at(info.path, np.concatenate([rows, rows + 25]), info.image_shape)
    start, goal = torch.from_numpy(px[: a.envs]), torch.from_numpy(px[a.envs:])
    planners = {"idm": make_planner("idm", model, idm=head),
                "cem (reference)": make_planner("cem", model),
                "fast": make_planner("fast", model),
                "cem --init idm": make_planner("cem", model, idm=head, init="idm"),
                "fast --init idm": make_planner("fast", model, idm=head, init="idm")}
    if (ck / "reach.safetensors").exists():  # the reachability cost (lewm reach)
        from lewm.plan.reach import load_reach
        reach = load_reach(ck, dev)
        planners.update({"cem --cost reach": make_planner("cem", model, cost="reach", reach=reach),
                         "fast --cost reach": make_planner("fast", model, cost="reach", reach=reach)})
    fns = {k: (lambda p=p: p.plan(start, goal)) for k, p in planners.items()}
    ts = bu.time_round_robin(fns, a.repeats, bu.sync_fn(dev), warmup=1)
    ref = bu.stats_ms(ts["cem (reference)"])["median"]
    out, table = [], []
    for k, p in planners.items():
        s = bu.stats_ms(ts[k])
        out.append(dict(bu.common_row(dev), checkpoint=str(ck), envs=a.envs, planner=k, samples=p.samples,
                        iterations=p.iterations, median_ms=round(s["median"], 3), p10_ms=round(s["p10"], 3),
                        p90_ms=round(s["p90"], 3), ratio_vs_reference_cem=round(ref / s["median"], 2),
                        threads=a.threads))
        table.append([k, p.samples, p.iterations, f"{s['median']:.1f}", f"{ref / s['median']:.1f}x"])
    print(bu.header(dev))
    print(bu.fmt_table(table, ["planner", "samples", "iterations", "median ms", "vs reference CEM"]))
    print(f"-> {bu.append_csv(a.csv, out, FIELDS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
