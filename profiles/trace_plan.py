"""Profile one CEM plan (reference and fast planner): a chrome trace with named ranges, the number of
ops / kernel launches per plan, time per range and the top ops.

Ranges (torch.profiler record_function, plus NVTX on CUDA for Nsight Systems):
  plan            the whole plan() call
  encode          LeWM.encode (start and goal; every iteration in the reference's re-encode mode)
  rollout+cost    the candidates' rollout and terminal cost (reference: lewm.plan.cem.terminal_cost;
                  fast: FastPlanner._rollout_cost, where the two are fused)
  rollout         LeWM.rollout inside the reference's rollout+cost (so cost = rollout+cost - rollout)
  (other)         what is left inside plan: sampling candidates, top-k, gather, mean/std (the CEM update)

The ranges are added by wrapping those functions for the profiled run only; the profiled plan is
checked to equal an unprofiled one, and the fast plan to equal the reference plan (same noise).

    python profiles/trace_plan.py                       # CPU: pusht preset, 64 samples x 2 iterations
    python profiles/trace_plan.py --device cuda         # pusht, 300 x 30 x 30; fast planner with and without graph
    python profiles/trace_plan.py --out $OUT            # where the traces go (default runs/traces/, gitignored)

Open a trace in chrome://tracing or https://ui.perfetto.dev.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profutil as pu  # noqa: E402
from profutil import bu  # noqa: E402

RANGES = ["encode", "rollout+cost", "rollout"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--preset", default="pusht")
    ap.add_argument("--samples", type=int, default=None, help="CUDA default 300, CPU 64")
    ap.add_argument("--iterations", type=int, default=None, help="CUDA default 30, CPU 2")
    ap.add_argument("--elites", type=int, default=None)
    ap.add_argument("--envs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(pu.TRACES), help="folder for the chrome traces")
    ap.add_argument("--quick", action="store_true", help="tiny preset, small CEM (smoke test)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = bu.pick_device(args.device)
    gpu = device.type == "cuda"
    import lewm
    import lewm.plan.cem as cem
    from lewm.plan.cem import CEMPlanner
    from lewm.plan.engine import FastPlanner

    preset = "tiny" if args.quick else args.preset
    cfg = lewm.preset(preset)
    S = args.samples or (16 if args.quick else (cfg.plan.samples if gpu else 64))
    I = args.iterations or (2 if args.quick else (cfg.plan.iterations if gpu else 2))
    K = args.elites or min(cfg.plan.elites, S // 2)
    E = args.envs
    print(bu.header(device))
    print(f"config: preset {preset}, samples {S}, elites {K}, iterations {I}, horizon {cfg.plan.horizon}, envs {E}")
    torch.manual_seed(0)
    model = lewm.LeWM(cfg).to(device).eval()
    bu.randomize_predictor(model)
    kw = dict(samples=S, elites=K, iterations=I)
    planners = {"reference (re-encode)": CEMPlanner.from_config(model, reencode=True, **kw),
                "reference": CEMPlanner.from_config(model, **kw)}
    if gpu:
        planners["fast, no graph"] = FastPlanner.from_config(model, cuda_graph=False, **kw)
        planners["fast + CUDA graph"] = FastPlanner.from_config(model, cuda_graph=True, **kw)
    else:
        planners["fast"] = FastPlanner.from_config(model, **kw)
    px = cfg.model.image_size
    g = torch.Generator().manual_seed(1)
    start = torch.randint(0, 256, (E, px, px, 3), dtype=torch.uint8, generator=g).to(device)
    goal = torch.randint(0, 256, (E, px, px, 3), dtype=torch.uint8, generator=g).to(device)
    noise = planners["reference"].draw_noise(E)
    want = planners["reference"].plan(start, goal, noise)
    sync = bu.sync_fn(device)
    out_dir = Path(args.out)
    tag = "cuda" if gpu else "cpu"
    failed = False
    for name, p in planners.items():
        base = p.plan(start, goal, noise)  # warm-up (compilation, graph capture) and the unprofiled result
        d = (base.actions - want.actions).abs().max().item()
        if d > 1e-3:
            print(f"FAILED: {name}: plan differs from the reference plan by {d:.2e}", file=sys.stderr)
            failed = True
            continue
        # ranges for the profiled run only
        orig_encode, orig_tc, orig_roll = model.encode, cem.terminal_cost, model.rollout
        model.encode = pu.ranged("encode", orig_encode)
        model.rollout = pu.ranged("rollout", orig_roll)
        cem.terminal_cost = pu.ranged("rollout+cost", orig_tc)
        if isinstance(p, FastPlanner):
            p._rollout_cost = pu.ranged("rollout+cost", FastPlanner._rollout_cost.__get__(p))
        try:
            sync()
            with pu.profiler(device) as prof:
                with torch.profiler.record_function("plan"), pu.nvtx("plan"):
                    got = p.plan(start, goal, noise)
                sync()
        finally:
            model.encode, cem.terminal_cost, model.rollout = orig_encode, orig_tc, orig_roll
            for a in ("encode", "rollout"):
                model.__dict__.pop(a, None)
            p.__dict__.pop("_rollout_cost", None)
        if not torch.equal(got.actions, base.actions):
            print(f"FAILED: {name}: the profiled plan differs from the unprofiled one", file=sys.stderr)
            failed = True
        s = pu.summarize(prof, RANGES, "plan")
        pu.print_summary(f"{name}: one plan ({S} samples x {I} iterations, {E} env)", s, RANGES, device)
        slug = {"reference (re-encode)": "reference_reencode", "reference": "reference", "fast": "fast",
                "fast, no graph": "fast_nograph", "fast + CUDA graph": "fast_graph"}[name]
        path = pu.export(prof, out_dir / f"plan_{slug}_{tag}.json")
        print(f"trace: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
