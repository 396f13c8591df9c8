"""Planning latency: the same start/goal frames and the same CEM noise planned by

  (a) reference, re-encode   the eager reference planner in the reference system's costly mode
                             (`CEMPlanner(reencode=True)`: start and goal through the ViT every iteration)
  (b) reference              the eager reference planner, encoding once
  (c) fast [+graph]          `lewm.plan.engine.FastPlanner` (on CUDA: fused Triton rollout, with and
                             without the CUDA graph; on the CPU: its best CPU backend, "auto")
  (d) DINO-WM-cost           bench/dinowm.py: ViT-S/14 keeping 196 x 384 patch tokens, a ViT predictor
                             over patch tokens, DINO-WM's CEM loop (one environment at a time)

all with the same CEM (samples, elites, iterations, horizon) in one process. Before any timing, the
plans of (b) and (c) are compared with (a)'s on identical noise and a mismatch ends the run with exit
status 1; (d) must run and give finite costs. fp32 plans must equal (a)'s (max |action difference|
<= --atol). A bfloat16 fast planner (--dtype bfloat16) cannot: bf16 rounding changes which candidates
are elites from the first iteration on, so its plan is a different, equally good plan. It is checked
by the fp32 reference model's cost of the plan instead: the bf16 plan rolled out with the fp32 model
(terminal cost against the goal) must cost at most max(--cost-rtol x (a)'s plan's cost, (a)'s cost +
--cost-spread x the spread (p90 - p10) of the costs of random plans from the CEM's initial
distribution), per environment. Both checks are printed. Then the planners are timed alternately (warm-up first),
and the table gives the median, p10 and p90 per plan, the ratios against (a) and (d)'s ratio to ours,
the counted GFLOP per plan and the compute floor at this device's measured GEMM rate.

    python bench/planning_latency.py                  # CPU: pusht preset, reduced CEM (see below)
    python bench/planning_latency.py --device cuda    # the paper's config: pusht, 300 x 30 x 30, H=5
    python bench/planning_latency.py --envs 50        # batched planning, time per environment
    python bench/planning_latency.py --quick          # toy sizes (the smoke test)

Defaults. CUDA: the "pusht" preset (the reference's full size: ViT-tiny/14 at 224 px, 6-layer
predictor) with the paper's CEM: 300 samples, 30 elites, 30 iterations, horizon 5. CPU: the same
models at full size, but the CEM reduced FOR EVERY PLANNER ALIKE to 6 samples, 2 elites, 2 iterations
(horizon 5): one DINO-WM-cost candidate costs ~133 GFLOP per CEM iteration (~1-2 s on one core of the
development machine), so the paper's CEM would take hours there. No number is extrapolated: every
time in the table is a measured whole plan at the config printed above it.

Rows are appended to profiles/planning_latency.csv (or --csv PATH).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402

CSV_FIELDS = bu.COMMON_FIELDS + [
    "preset", "samples", "elites", "iterations", "horizon", "envs", "planner", "backend", "cuda_graph",
    "median_ms", "p10_ms", "p90_ms", "per_env_ms", "ratio_vs_reference", "ratio_dinowm_vs_this", "gflop_per_plan",
    "compute_floor_ms", "weight_mb_per_plan", "byte_floor_ms", "gemm_gflops", "repeats", "check",
    "dtype", "ref_model_cost", "ref_model_cost_limit"]

CPU_DEFAULTS = {"samples": 6, "elites": 2, "iterations": 2}
QUICK = {"preset": "tiny", "samples": 16, "elites": 4, "iterations": 2}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
    ap.add_argument("--preset", default=None, help="LeWM config preset (default: pusht; tiny with --quick)")
    ap.add_argument("--samples", type=int, default=None, help="CEM samples (CUDA default 300, CPU 6)")
    ap.add_argument("--elites", type=int, default=None, help="CEM elites (CUDA default 30, CPU 2)")
    ap.add_argument("--iterations", type=int, default=None, help="CEM iterations (CUDA default 30, CPU 2)")
    ap.add_argument("--envs", type=int, default=1, help="environments planned at once (times are also given per env)")
    ap.add_argument("--repeats", type=int, default=None, help="timed plans per planner (CUDA 10, CPU 5)")
    ap.add_argument("--dinowm-repeats", type=int, default=None,
                    help="timed plans of the DINO-WM-cost planner (default: min(repeats, 3))")
    ap.add_argument("--no-dinowm", action="store_true", help="skip the DINO-WM-cost planner (d)")
    ap.add_argument("--dinowm-size", choices=["full", "tiny"], default=None,
                    help="DINO-WM-cost model size (default: full; tiny with --quick)")
    ap.add_argument("--backend", default="auto", choices=["auto", "triton", "torch", "compile"],
                    help="FastPlanner backend for (c) (auto: triton + CUDA graph on CUDA, torch on the CPU)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="FastPlanner weight dtype for (c) (bfloat16: checked by the reference model's cost of the "
                         "plan, see above)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--atol", type=float, default=1e-3, help="max |plan difference| allowed vs (a) (fp32 plans)")
    ap.add_argument("--cost-rtol", type=float, default=1.05,
                    help="bf16 plans: the fp32 model's cost of the plan may be this factor x (a)'s plan's cost")
    ap.add_argument("--cost-spread", type=float, default=0.05,
                    help="... or (a)'s cost + this fraction of the random plans' cost spread, whichever is larger")
    ap.add_argument("--random-plans", type=int, default=64, help="random plans per env for the cost spread")
    ap.add_argument("--csv", default=str(bu.PROFILES / "planning_latency.csv"),
                    help="CSV file to append to ('' = none)")
    ap.add_argument("--quick", action="store_true", help="toy sizes for the smoke test (tiny preset, tiny DINO-WM)")
    return ap.parse_args(argv)


def resolve(args, device):
    """The config actually run: --quick's toy sizes; on CUDA the preset's own CEM (pusht: the paper's
    300 x 30 x 30); on the CPU the reduced CEM of CPU_DEFAULTS; explicit flags win."""
    import lewm
    gpu = device.type == "cuda"
    preset = args.preset or (QUICK["preset"] if args.quick else "pusht")
    cfg = lewm.preset(preset)
    if args.quick:
        base = QUICK
    elif gpu:
        base = {"samples": cfg.plan.samples, "elites": cfg.plan.elites, "iterations": cfg.plan.iterations}
    else:
        base = CPU_DEFAULTS
    samples = args.samples or base["samples"]
    elites = args.elites or min(base["elites"], samples)
    iterations = args.iterations or base["iterations"]
    if elites < 2 or elites > samples:
        raise SystemExit(f"--elites must be in [2, samples] (the elites' std needs two), got {elites}")
    if min(samples, iterations, args.envs) < 1:
        raise SystemExit("--samples, --iterations and --envs must be positive")
    repeats = args.repeats or (3 if args.quick else (10 if gpu else 5))
    drep = args.dinowm_repeats or min(repeats, 3)
    dsize = args.dinowm_size or ("tiny" if args.quick else "full")
    return cfg, preset, samples, elites, iterations, repeats, drep, dsize


class RefModelCost:
    """The fp32 reference model's terminal cost of a plan: the plan's actions rolled out from the
    encoded start frame, squared L2 to the encoded goal (lewm.plan.cem.terminal_cost), per env.
    The limit is per env: max(rtol x (a)'s plan's cost, (a)'s cost + spread_frac x (p90 - p10) of the
    costs of `n_random` plans drawn from the CEM's initial distribution N(0, var_scale^2))."""

    def __init__(self, model, start, goal, ref_actions, planner, n_random: int, rtol: float, spread_frac: float,
                 seed: int):
        from lewm.plan.cem import terminal_cost
        self._tc = terminal_cost
        self.model = model
        with torch.no_grad():
            self.z0, self.zg = model.encode(start), model.encode(goal)
        self.ref_cost = self.cost(ref_actions)
        E = ref_actions.shape[0]
        g = torch.Generator(device="cpu").manual_seed(seed + 7)
        rnd = torch.randn((E, max(2, n_random)) + tuple(ref_actions.shape[1:]), generator=g) * planner.var_scale
        with torch.no_grad():
            rc = self._tc(model, self.z0, self.zg, rnd.to(ref_actions.device)).float()  # (E, R)
        q = torch.quantile(rc, torch.tensor([0.1, 0.9], device=rc.device), dim=1)
        self.spread = q[1] - q[0]
        self.limit = torch.maximum(rtol * self.ref_cost, self.ref_cost + spread_frac * self.spread)

    @torch.no_grad()
    def cost(self, actions: torch.Tensor) -> torch.Tensor:
        return self._tc(self.model, self.z0, self.zg, actions.float()[:, None])[:, 0].float()

    def ok(self, c: torch.Tensor) -> bool:
        return bool(torch.isfinite(c).all()) and bool((c <= self.limit).all())

    def ratio(self, c: torch.Tensor) -> str:
        r = c / self.ref_cost.clamp_min(1e-12)
        return f"{r.max().item():.3f}x" if r.numel() == 1 else f"max {r.max().item():.3f}x"

    @staticmethod
    def fmt(c: torch.Tensor) -> str:
        c = c.float()
        return f"{c.item():.4g}" if c.numel() == 1 else f"mean {c.mean().item():.4g} (max {c.max().item():.4g})"


def extend_header(path, fields) -> None:
    """A CSV whose header is a prefix of `fields` (columns were added at the end) gets the new header
    in place; its old rows simply lack the new columns."""
    import csv
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] == fields or rows[0] != fields[:len(rows[0])]:
        return
    rows[0] = list(fields)
    from lewm.atomic import atomic_path
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def main(argv=None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = bu.pick_device(args.device)
    import lewm
    from lewm.plan.cem import CEMPlanner
    from lewm.plan.engine import FastPlanner

    cfg, preset, S, K, I, repeats, drep, dsize = resolve(args, device)
    E, H = args.envs, cfg.plan.horizon
    print(bu.header(device))
    print(f"config: preset {preset} (LeWM {cfg.model.image_size} px, ViT {cfg.model.enc_width}x{cfg.model.enc_depth}, "
          f"predictor {cfg.model.pred_depth} layers), CEM samples {S}, elites {K}, iterations {I}, horizon {H}, "
          f"envs {E}; {repeats} timed plans per planner ({drep} for DINO-WM-cost), after a checked warm-up plan")
    sys.stdout.flush()

    torch.manual_seed(args.seed)
    model = lewm.LeWM(cfg).to(device).eval()
    bu.randomize_predictor(model)
    kw = dict(samples=S, elites=K, iterations=I, horizon=H)
    fkw = dict(kw, backend=args.backend, dtype=getattr(torch, args.dtype))
    planners = {"(a) reference, re-encode": CEMPlanner.from_config(model, reencode=True, **kw),
                "(b) reference, encode once": CEMPlanner.from_config(model, **kw)}
    fast_meta = {}
    if device.type == "cuda":
        fg = FastPlanner.from_config(model, cuda_graph=True, **fkw)
        fn = FastPlanner.from_config(model, cuda_graph=False, **fkw)
        planners["(c) fast + CUDA graph"] = fg
        planners["(c) fast, no graph"] = fn
        fast_meta = {"(c) fast + CUDA graph": (fg.backend, True), "(c) fast, no graph": (fn.backend, False)}
    else:
        fc = FastPlanner.from_config(model, **fkw)
        planners["(c) fast"] = fc
        fast_meta = {"(c) fast": (fc.backend, fc.use_graph)}

    S_px = cfg.model.image_size
    gen = torch.Generator().manual_seed(args.seed + 1)
    start = torch.randint(0, 256, (E, S_px, S_px, 3), dtype=torch.uint8, generator=gen).to(device)
    goal = torch.randint(0, 256, (E, S_px, S_px, 3), dtype=torch.uint8, generator=gen).to(device)
    noise = planners["(b) reference, encode once"].draw_noise(E)

    # -- correctness first: every timed path against (a), same frames, same noise (also the warm-up) ------
    ref = planners["(a) reference, re-encode"].plan(start, goal, noise)
    judge = RefModelCost(model, start, goal, ref.actions, planners["(b) reference, encode once"],
                         args.random_plans, args.cost_rtol, args.cost_spread, args.seed)
    print(f"reference-model cost: (a)'s plan {judge.fmt(judge.ref_cost)}, random plans' spread (p90 - p10) "
          f"{judge.fmt(judge.spread)}, limit for bf16 plans {judge.fmt(judge.limit)} "
          f"(max({args.cost_rtol:g} x (a), (a) + {args.cost_spread:g} x spread))")
    checks, failed, ref_costs = {}, [], {}
    for name, p in planners.items():
        r = ref if name.startswith("(a)") else p.plan(start, goal, noise)
        d_act = (r.actions - ref.actions).abs().max().item()
        d_cost = ((r.cost - ref.cost).abs() / ref.cost.abs().clamp_min(1e-6)).max().item()
        finite = bool(torch.isfinite(r.actions).all())
        c_plan = judge.cost(r.actions)
        ref_costs[name] = c_plan
        by_cost = name in fast_meta and args.dtype != "float32"
        if by_cost:  # bf16: a different plan, judged by what the fp32 model says it costs
            ok = finite and judge.ok(c_plan)
            checks[name] = (f"ref-model cost {judge.fmt(c_plan)} <= {judge.fmt(judge.limit)}: {'yes' if ok else 'NO'}"
                            f" (vs (a) {judge.ratio(c_plan)}); max|da|={d_act:.1e} rel.cost={d_cost:.1e} (not checked)")
        else:
            ok = d_act <= args.atol and d_cost <= max(args.atol, 1e-3) and finite
            checks[name] = (f"max|da|={d_act:.1e} rel.cost={d_cost:.1e}; ref-model cost {judge.fmt(c_plan)} "
                            f"(vs (a) {judge.ratio(c_plan)})")
        print(f"check {name:<28} {'OK  ' if ok else 'FAIL'} {checks[name]}")
        if not ok:
            failed.append(name)
    dplanner = None
    if not args.no_dinowm:
        from dinowm import DinoWM, DinoWMConfig, DinoWMPlanner
        torch.manual_seed(args.seed)
        dcfg = DinoWMConfig.for_lewm(cfg, full=(dsize == "full"))
        if dcfg.image_size != S_px:
            dcfg.image_size = S_px
        dmodel = DinoWM(dcfg).to(device)
        dplanner = DinoWMPlanner(dmodel, **kw)
        t0 = time.perf_counter()
        rd = dplanner.plan(start, goal, noise)
        ok = rd.actions.shape == ref.actions.shape and bool(torch.isfinite(rd.actions).all()) and \
            bool(torch.isfinite(rd.cost).all())
        checks["(d) DINO-WM-cost"] = f"runs, finite, shape {tuple(rd.actions.shape)} ({time.perf_counter() - t0:.1f} s)"
        print(f"check {'(d) DINO-WM-cost':<28} {'OK  ' if ok else 'FAIL'} {checks['(d) DINO-WM-cost']}")
        if not ok:
            failed.append("(d) DINO-WM-cost")
    if failed:
        print(f"FAILED: {', '.join(failed)} differ from the reference plan (fp32: atol {args.atol}; bf16: the "
              f"reference model's cost limit); nothing timed.", file=sys.stderr)
        return 1

    # -- floors --------------------------------------------------------------------------------------------
    import floors
    units = floors.lewm_units(model, planners[next(iter(fast_meta))].weights)
    kinds = {"(a)": "reference_reencode", "(b)": "reference", "(c)": "fast"}
    fl = {n: floors.plan_floors(kinds[n[:3]], units, E, S, I, H) for n in planners}
    if dplanner is not None:
        fl["(d) DINO-WM-cost"] = floors.plan_floors("dinowm", floors.dinowm_units(dplanner.model, H), E, S, I, H)
    peak = bu.gemm_peak_gflops(device)
    bw = bu.copy_bandwidth_gbs(device)

    # -- timing --------------------------------------------------------------------------------------------
    sync = bu.sync_fn(device)
    fns = {n: (lambda p=p: p.plan(start, goal, noise)) for n, p in planners.items()}
    times = bu.time_round_robin(fns, repeats, sync, warmup=1)
    if dplanner is not None:
        times.update(bu.time_round_robin({"(d) DINO-WM-cost": lambda: dplanner.plan(start, goal, noise)}, drep, sync))

    st = {n: bu.stats_ms(t) for n, t in times.items()}
    ref_med = st["(a) reference, re-encode"]["median"]
    fast_names = [n for n in st if n.startswith("(c)")]
    best_fast = min(fast_names, key=lambda n: st[n]["median"])
    d_med = st.get("(d) DINO-WM-cost", {}).get("median")
    rows, csv_rows = [], []
    common = bu.common_row(device)
    for n, s in st.items():
        r_ref = ref_med / s["median"]
        r_d = d_med / s["median"] if d_med else float("nan")
        gf = fl[n]["flops"] / 1e9
        floor_ms = fl[n]["flops"] / (peak * 1e9) * 1e3
        mb = fl[n]["bytes"] / 1e6
        rows.append([n, f"{r_ref:.2f}x", f"{r_d:.1f}x" if d_med else "-", f"{s['median']:.1f}",
                     f"{s['p10']:.1f}", f"{s['p90']:.1f}", f"{s['median'] / E:.1f}", f"{gf:.4g}",
                     f"{floor_ms:.2f}", f"{gf / (s['median'] / 1e3):.0f}", f"{mb:.0f}", f"{mb / 1e3 / bw * 1e3:.2f}",
                     s["n"]])
        backend, graph = fast_meta.get(n, ("dinowm" if n.startswith("(d)") else "eager", False))
        csv_rows.append({**common, "preset": preset, "samples": S, "elites": K, "iterations": I, "horizon": H,
                         "envs": E, "planner": n, "backend": backend, "cuda_graph": graph,
                         "median_ms": f"{s['median']:.3f}", "p10_ms": f"{s['p10']:.3f}", "p90_ms": f"{s['p90']:.3f}",
                         "per_env_ms": f"{s['median'] / E:.3f}", "ratio_vs_reference": f"{r_ref:.3f}",
                         "ratio_dinowm_vs_this": f"{r_d:.3f}" if d_med else "", "gflop_per_plan": f"{gf:.3f}",
                         "compute_floor_ms": f"{floor_ms:.3f}", "weight_mb_per_plan": f"{mb:.1f}",
                         "byte_floor_ms": f"{mb / 1e3 / bw * 1e3:.3f}", "gemm_gflops": f"{peak:.0f}", "repeats": s["n"],
                         "check": checks.get(n, ""),
                         "dtype": args.dtype if n in fast_meta else "float32",
                         "ref_model_cost": f"{ref_costs[n].mean().item():.6g}" if n in ref_costs else "",
                         "ref_model_cost_limit": f"{judge.limit.mean().item():.6g}"
                         if (n in fast_meta and args.dtype != "float32") else ""})

    print()
    print(f"RATIOS  (a) reference re-encode / {best_fast}: {ref_med / st[best_fast]['median']:.2f}x   "
          f"(b) / {best_fast}: {st['(b) reference, encode once']['median'] / st[best_fast]['median']:.2f}x" +
          (f"   DINO-WM-cost / {best_fast}: {d_med / st[best_fast]['median']:.1f}x   "
           f"DINO-WM-cost / (a): {d_med / ref_med:.1f}x" if d_med else ""))
    print(bu.fmt_table(rows, ["planner", "vs (a)", "(d) vs this", "median ms", "p10 ms", "p90 ms", "ms/env",
                              "GFLOP/plan", "floor ms", "GFLOP/s", "weights MB", "byte floor ms", "n"]))
    print(f"(vs (a) = (a)'s median / this median; '(d) vs this' = DINO-WM-cost median / this median; floor ms = "
          f"counted GFLOP / this device's measured fp32 GEMM rate, {peak:.0f} GFLOP/s; weights MB = weights read "
          f"once per dependent model call; byte floor = that / measured copy bandwidth, {bw:.0f} GB/s)")
    print(f"{'CPU' if device.type == 'cpu' else 'GPU'} config: samples {S}, elites {K}, iterations {I}, horizon {H}, "
          f"envs {E}, preset {preset}, DINO-WM-cost size {dsize if dplanner is not None else '-'}")
    if args.csv:
        extend_header(args.csv, CSV_FIELDS)
        p = bu.append_csv(args.csv, csv_rows, CSV_FIELDS)
        print(f"appended {len(csv_rows)} rows to {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
