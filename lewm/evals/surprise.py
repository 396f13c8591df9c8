"""`lewm surprise --checkpoint C --data F`: violation of expectation (the paper's section 5.2).

    lewm surprise --checkpoint runs/tworoom --data data/tworoom.h5 --out evals/voe
    lewm surprise --checkpoint runs/pusht --data data/pusht.h5 --frames 12 --t0 6 --trajectories 100

    from lewm.evals.surprise import run_surprise
    res = run_surprise("runs/tworoom", "data/tworoom.h5", out="evals/voe")
    res["tests"]["physical_vs_unperturbed"]["at_t0"]["p"]

Surprise at frame j is the latent prediction error of the model's next-embedding prediction,

    s_j = || pred(z_{j-W..j-1}, a_{j-W..j-1}) - enc(o_j) ||^2        (squared L2 over the D dims)

with W = model.history context frames and the frames/actions of a training clip: frames every
`frameskip` raw rows, macro actions = the `frameskip` raw actions between two frames (z-scored with
the model's action statistics). It is defined for j = W .. K-1 of a K-frame trajectory.

Trajectories: one per held-out episode (the split training used; --split all for every episode)
long enough for K frames, from a seeded random start row, at most --trajectories of them. Each is
evaluated three ways, all fed the same recorded macro actions; frames before t0 are the same in all
three:

    unperturbed  the recorded trajectory
    visual       from frame t0 on, an object's colour changes (the states are the recorded ones)
    physical     at frame t0 an object is teleported to a random position (--min-distance away
                 from where it was) and the simulator is stepped on from there with the recorded
                 raw actions (a single discontinuity at t0; the motion after it is physical)

What each perturbation does is the environment's own: `Env.teleport` and `Env.recolour`, described by
its `visual_doc` and `physical_doc` (lewm/envs/<env>.py; `lewm surprise --help` lists them). Frames
are rendered by the env at the data set's image size via set_state_from_row, so all three variants
come from the same renderer.

Without a simulator for the data set (an unknown env, or its package missing) frames come from the
data set, the physical variant is left out and the visual one swaps the R and G channels.

Statistics: per trajectory the surprise at t0 and the maximum over [t0, t0 + window); paired
t-tests (scipy.stats.ttest_rel, two-sided p and the one-sided p for 'greater') of each perturbation
against the unperturbed trajectories and physical against visual. Writes surprise.json and
surprise.png (mean surprise over frames for the three variants, t0 marked) and
surprise_frames.png (the first trajectory's frames, one row per variant) under --out.
"""
from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import numpy as np

from ..atomic import write_json
from ..errors import UserError
from ..envs.base import Env, swap_red_green
from ..plots import pyplot, save_figure
from .common import add_split_seed_device_args, data_env_name, frames_at, heldout_split, load_model

VARIANTS = ("unperturbed", "visual", "physical")



# -- trajectories and frames ---------------------------------------------------------------------------
def _make_env(env_name: str | None, image_size: int, log):
    """The env to render with, or None (with the reason logged) when it cannot be built here."""
    if env_name is None:
        return None
    try:
        from ..data.collect import build_env  # a registered name or a 'package.module:Factory'
        return build_env(env_name, image_size)
    except Exception as e:  # unknown env, missing simulator package, no display
        log(f"lewm surprise: no simulator for '{env_name}' ({type(e).__name__}: {e}); frames come from the data "
            "set, the physical variant is left out and the visual one swaps R and G")
        return None


def _render_rows(env, rows: list[dict], size: int, ctx=None) -> np.ndarray:
    frames = []
    with (ctx if ctx is not None else contextlib.nullcontext()):
        for r in rows:
            env.set_state_from_row(r)
            frames.append(env.render(size))
    return np.stack(frames)


def _physical_frames(env, row_t0: dict, raw_actions: np.ndarray, n_frames: int, fs: int, size: int):
    """Frames t0 .. t0+n_frames-1 after teleporting to `row_t0` and stepping the recorded actions."""
    env.set_state_from_row(row_t0)
    frames = [env.render(size)]
    for k in range(1, n_frames):
        for a in raw_actions[(k - 1) * fs:k * fs]:
            env.step(np.asarray(a, np.float64))
        frames.append(env.render(size))
    return np.stack(frames)


def surprise_series(model, z: np.ndarray | "torch.Tensor", actions, batch_size: int = 1024) -> np.ndarray:
    """(N, K, D) latents and (N, K, fs*A) z-scored macro actions -> (N, K - W) surprise of frames
    W .. K-1, s_j = ||pred(z_{j-W..j-1}, a_{j-W..j-1}) - z_j||^2 (W = model.history)."""
    import torch
    W = model.mcfg.history
    z = torch.as_tensor(z, dtype=torch.float32, device=model.action_mean.device)
    a = torch.as_tensor(actions, dtype=torch.float32, device=model.action_mean.device)
    N, K, D = z.shape
    if K <= W:
        raise ValueError(f"surprise needs more than history={W} frames, got {K}")
    with torch.no_grad():
        emb = model.action_encoder(a)  # per step: (N, K, D)
        zw = z.unfold(1, W, 1)[:, :K - W].permute(0, 1, 3, 2).reshape(-1, W, D)  # windows ending at j-1
        aw = emb.unfold(1, W, 1)[:, :K - W].permute(0, 1, 3, 2).reshape(-1, W, emb.shape[-1])
        preds = torch.cat([model.predict_last(zw[i:i + batch_size], aw[i:i + batch_size])
                           for i in range(0, len(zw), batch_size)])
        target = z[:, W:].reshape(-1, D)
        s = (preds.float() - target).pow(2).sum(-1)
    return s.reshape(N, K - W).cpu().numpy().astype(np.float64)


def _ttest(a: np.ndarray, b: np.ndarray) -> dict:
    from scipy import stats
    d = a - b
    out = {"mean_diff": float(d.mean()), "n": int(len(d))}
    if len(d) < 2 or not np.isfinite(d).all() or np.all(d == d[0]):
        out.update(t=float("nan"), p=float("nan"), p_greater=float("nan"))
        return out
    t = stats.ttest_rel(a, b)
    out.update(t=float(t.statistic), p=float(t.pvalue),
               p_greater=float(stats.ttest_rel(a, b, alternative="greater").pvalue))
    return out


def run_surprise(checkpoint, data, env: str | None = None, out=None, device: str = "auto",
                 frames: int | None = None, t0: int | None = None, window: int = 3, trajectories: int = 50,
                 split: str = "heldout", seed: int = 0, min_distance: float | None = None,
                 progress: bool = True, log=print) -> dict:
    """Surprise along unperturbed, visually and physically perturbed trajectories; see the module
    docstring. `checkpoint` is a LeWM or a path. Writes surprise.json and surprise.png under `out`
    when given; returns the results dict."""
    t_start = time.perf_counter()
    ld = _load(checkpoint, data, env, device, frames, t0, window, trajectories, split, seed)
    rd = _render(ld, seed, min_distance, progress, log)
    s = _score(ld, rd)
    return _report(ld, rd, s, split, seed, out, time.perf_counter() - t_start)


def _load(checkpoint, data, env, device, frames, t0, window, trajectories, split, seed) -> dict:
    """Load: the data set, the model, the checks of every argument, the trajectories (episodes and start
    rows) to evaluate."""
    from ..data.format import inspect
    info = inspect(data)
    env_name = data_env_name(info, env)
    model, ckpt = load_model(checkpoint, device)
    W, fs = int(model.mcfg.history), int(model.mcfg.frameskip)
    K = int(frames) if frames is not None else 2 * W + 4
    if K < W + 2:
        raise UserError(f"--frames must be at least history + 2 = {W + 2} (the model's history is {W}), got {K}")
    t0 = int(t0) if t0 is not None else W + 2 if K >= W + 4 else W
    if not W <= t0 <= K - 1:
        raise UserError(f"--t0 must be in [{W}, {K - 1}] (after the model's {W} context frames, within "
                          f"--frames {K}), got {t0}")
    if window < 1:
        raise UserError(f"--window must be positive, got {window}")
    window = min(int(window), K - t0)
    if trajectories < 2:
        raise UserError(f"--trajectories must be at least 2 (a paired t-test), got {trajectories}")
    if info.action_dim != model.mcfg.action_dim:
        raise UserError(f"{info.path}: column 'action' has {info.action_dim} dims but the checkpoint's model has "
                          f"action_dim {model.mcfg.action_dim}")
    _, eval_eps = heldout_split(info, model.cfg, split)
    span = (K - 1) * fs + 1  # raw rows from the first to the last frame
    long_enough = [int(e) for e in eval_eps if info.ep_len[e] >= span]
    if len(long_enough) < 2:
        longest = int(info.ep_len[eval_eps].max())
        raise UserError(f"{info.path}: only {len(long_enough)} of the {len(eval_eps)} {split} episodes have the "
                          f"{span} rows that --frames {K} at frameskip {fs} needs (longest: {longest} rows); "
                          "lower --frames")
    rng = np.random.default_rng(seed)
    eps = np.sort(rng.permutation(long_enough)[:trajectories])
    starts = np.array([int(info.ep_offset[e]) + int(rng.integers(0, info.ep_len[e] - span + 1)) for e in eps])

    return dict(info=info, env_name=env_name, model=model, ckpt=ckpt, W=W, fs=fs, K=K, t0=t0, window=window,
                eps=eps, starts=starts)


def _render(ld: dict, seed, min_distance, progress, log) -> dict:
    """Render: the frames (N, V, K, H, W, 3) of every variant (unperturbed, visual, physical) with the
    env's own renderer and perturbations, or from the data set where there is no simulator."""
    from ..data.format import open_h5
    info, env_name, K, t0, fs, eps, starts = (ld[k] for k in ("info", "env_name", "K", "t0", "fs", "eps", "starts"))
    N = len(eps)
    size = int(info.image_shape[0])
    # the env after the model: importing timm/triton after a MuJoCo EGL context exists can crash
    sim = _make_env(env_name, size, log)
    # the env's own perturbations (lewm/envs/base.py: teleport, recolour); Env's defaults without one
    pert = sim if sim is not None and sim.physical_doc is not None else None
    if sim is not None and pert is None:
        log(f"lewm surprise: no physical perturbation is defined for '{env_name}'; the physical variant is left "
            "out")
    if min_distance is None:
        min_distance = pert.default_min_distance if pert is not None else 0.0
    state_cols = [c for c in (getattr(sim, "state_columns", ()) or ()) if c in info.columns] if sim else []
    if sim is not None and not state_cols:
        raise UserError(f"{info.path}: none of the state columns {', '.join(sim.state_columns)} that '{env_name}' "
                          "needs to re-render rows; collect the data with `lewm collect`")

    frame_rows = starts[:, None] + np.arange(K) * fs  # (N, K)
    act_rows = starts[:, None] + np.arange((K - 1) * fs)  # (N, (K-1)*fs)
    with open_h5(info.path) as f:
        raw_act = np.asarray(f["action"][()], np.float32)
        cols = {c: np.asarray(f[c][()]) for c in state_cols}
    acts = raw_act[act_rows]  # (N, (K-1)*fs, A)
    if not np.isfinite(acts).all():
        raise UserError(f"{info.path}: column 'action' has NaN or inf inside the trajectories (rows "
                          f"{int(act_rows[~np.isfinite(acts).all(-1)][0])}...)")

    # frames (N, V, K, H, W, 3)
    variants = ["unperturbed", "visual"] + (["physical"] if pert is not None else [])
    px = np.empty((N, len(variants), K, size, size, 3), np.uint8)
    teleports = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=N, desc="trajectories", unit="traj", leave=False)
    flat = frames_at(info.path, frame_rows, info.image_shape)
    flat = flat.reshape(N, K, *info.image_shape)  # the data set's own frames of the trajectories
    if flat.shape[2:4] != (size, size):
        raise UserError(f"{info.path}: column 'pixels' must hold square frames, got {flat.shape[2:4]}")
    if sim is None:
        px[:, 0] = flat
        px[:, 1] = flat
        px[:, 1, t0:] = swap_red_green(flat[:, t0:])
        if bar is not None:
            bar.update(N)
    else:
        for i in range(N):
            rows = [{c: cols[c][r] for c in state_cols} for r in frame_rows[i]]
            base = _render_rows(sim, rows, size)
            px[i, 0] = base
            px[i, 1, :t0] = base[:t0]
            ctx = sim.recolour()
            if ctx is None:
                px[i, 1, t0:] = sim.recolour_frames(base[t0:])
            else:
                px[i, 1, t0:] = _render_rows(sim, rows[t0:], size, ctx)
            if pert is not None:
                trng = np.random.default_rng([seed, int(eps[i])])
                moved = sim.teleport(rows[t0], trng, min_distance)
                px[i, 2, :t0] = base[:t0]
                px[i, 2, t0:] = _physical_frames(sim, moved, acts[i, t0 * fs:], K - t0, fs, size)
                teleports.append({k: np.asarray(v).tolist() for k, v in moved.items()})
            if bar is not None:
                bar.update(1)
        try:
            sim.close()
        except Exception:
            pass
    if bar is not None:
        bar.close()
    # the env's renders of the recorded rows should be the data set's frames (same renderer and size)
    render_diff = float(np.abs(px[:, 0].astype(np.int16) - flat).mean()) if sim is not None else 0.0
    if render_diff > 4.0:
        log(f"lewm surprise: warning: the env's renders of the recorded rows differ from the data set's frames by "
            f"{render_diff:.1f}/255 on average (another renderer or version?); all variants use the renders")
    return dict(px=px, variants=variants, acts=acts, teleports=teleports, sim=sim is not None,
                visual_doc=(sim or Env).visual_doc, physical_doc=pert.physical_doc if pert is not None else None,
                min_distance=float(min_distance), render_diff=render_diff)


def _score(ld: dict, rd: dict) -> np.ndarray:
    """Score: embeddings of every frame, the recorded macro actions, surprise (N, V, K - W)."""
    import torch
    model, K, W, fs = ld["model"], ld["K"], ld["W"], ld["fs"]
    px, acts, variants = rd["px"], rd["acts"], rd["variants"]
    N, size = px.shape[0], px.shape[3]
    # embeddings, macro actions, surprise
    V = len(variants)
    with torch.no_grad():
        all_px = torch.from_numpy(px.reshape(N * V * K, size, size, 3))
        z = torch.cat([model.encode(all_px[i:i + 512]).float() for i in range(0, len(all_px), 512)])
    z = z.reshape(N * V, K, -1)
    macro = np.concatenate([acts, np.zeros((N, fs, acts.shape[-1]), np.float32)], 1).reshape(N, K, fs, -1)
    macro = model.normalize_actions(torch.from_numpy(macro).to(model.action_mean.device)).reshape(N, K, -1)
    macro = macro.repeat_interleave(V, dim=0)  # the same actions for every variant
    return surprise_series(model, z, macro).reshape(N, V, K - W)


def _report(ld: dict, rd: dict, s: np.ndarray, split: str, seed: int, out, seconds: float) -> dict:
    """Report: per-variant statistics, paired t-tests, the results dict; surprise.json and the two PNGs
    under `out`."""
    W, K, t0, window, fs, eps, starts = (ld[k] for k in ("W", "K", "t0", "window", "fs", "eps", "starts"))
    variants, px, N = rd["variants"], rd["px"], s.shape[0]
    steps = list(range(W, K))
    i0 = t0 - W

    per_variant, at_t0, win_max = {}, {}, {}
    for v, name in enumerate(variants):
        sv = s[:, v]
        at_t0[name] = sv[:, i0]
        win_max[name] = sv[:, i0:i0 + window].max(1)
        per_variant[name] = {
            "mean": sv.mean(0).tolist(), "sem": (sv.std(0, ddof=1) / np.sqrt(N)).tolist(),
            "at_t0": {"mean": float(at_t0[name].mean()), "std": float(at_t0[name].std(ddof=1))},
            "window_max": {"mean": float(win_max[name].mean()), "std": float(win_max[name].std(ddof=1))},
            "before_t0": {"mean": float(sv[:, :i0].mean()) if i0 > 0 else None},
        }
    tests = {}
    pairs = [("visual", "unperturbed")] + ([("physical", "unperturbed"), ("physical", "visual")]
                                           if "physical" in variants else [])
    for a, b in pairs:
        tests[f"{a}_vs_{b}"] = {"at_t0": _ttest(at_t0[a], at_t0[b]), "window_max": _ttest(win_max[a], win_max[b])}

    res = {"env": ld["env_name"], "checkpoint": ld["ckpt"], "data": str(ld["info"].path), "split": split,
           "frames": K, "frameskip": fs, "history": W, "t0": t0, "window": window, "seed": seed,
           "trajectories": N, "episodes": eps.tolist(), "start_rows": starts.tolist(),
           "frames_from": "env" if rd["sim"] else "data",
           "render_vs_data_mean_abs_diff": rd["render_diff"], "min_distance": rd["min_distance"],
           "perturbations": {"visual": rd["visual_doc"], "physical": rd["physical_doc"]},
           "surprise": "||pred(z_{j-W..j-1}, a_{j-W..j-1}) - enc(o_j)||^2, summed over D",
           "steps": steps, "variants": per_variant, "tests": tests,
           "per_trajectory": {name: s[:, v].tolist() for v, name in enumerate(variants)},
           "teleported_rows": rd["teleports"], "time_s": seconds}
    res["table"] = format_table(res)
    if out is not None:
        out = Path(out)
        res["json"] = str(write_json(res, out / "surprise.json"))
        res["png"] = str(plot_surprise(res, out / "surprise.png"))
        res["frames_png"] = str(plot_frames(px[0], variants, t0, out / "surprise_frames.png"))
    return res


def plot_frames(px: np.ndarray, variants: list[str], t0: int, png: Path) -> Path:
    """The first trajectory's frames (V, K, H, W, 3): one row per variant, t0 marked."""
    plt = pyplot()
    V, K = px.shape[:2]
    fig, axes = plt.subplots(V, K, figsize=(1.3 * K, 1.4 * V), squeeze=False)
    for v in range(V):
        for k in range(K):
            ax = axes[v, k]
            ax.imshow(px[v, k], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if k == t0:
                for sp in ax.spines.values():
                    sp.set_color("red")
                    sp.set_linewidth(2)
            if v == 0:
                ax.set_title("t0" if k == t0 else str(k), fontsize=8)
        axes[v, 0].set_ylabel(variants[v], fontsize=8)
    fig.tight_layout()
    return save_figure(fig, png)


def format_table(res: dict) -> str:
    t0, w = res["t0"], res["window"]
    lines = [f"{'variant':<12} {'before t0':>10} {'at t0':>18} {f'max t0..t0+{w - 1}':>18}   "
             "paired t-test vs unperturbed (at t0; max)"]
    for name, v in res["variants"].items():
        b = v["before_t0"]["mean"]
        n = res["trajectories"]
        a = f"{v['at_t0']['mean']:.4g} ± {v['at_t0']['std'] / np.sqrt(n):.2g}"
        m = f"{v['window_max']['mean']:.4g} ± {v['window_max']['std'] / np.sqrt(n):.2g}"
        test = res["tests"].get(f"{name}_vs_unperturbed")
        tt = "" if test is None else (f"t={test['at_t0']['t']:.2f} p={test['at_t0']['p']:.2g}; "
                                      f"t={test['window_max']['t']:.2f} p={test['window_max']['p']:.2g}")
        lines.append(f"{name:<12} {('-' if b is None else f'{b:.4g}'):>10} {a:>18} {m:>18}   {tt}")
    if "physical_vs_visual" in res["tests"]:
        pv = res["tests"]["physical_vs_visual"]["at_t0"]
        lines.append(f"physical vs visual at t0: t={pv['t']:.2f} p={pv['p']:.2g}")
    return "\n".join(lines)


def plot_surprise(res: dict, png: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.asarray(res["steps"])
    colours = {"unperturbed": "tab:blue", "visual": "tab:orange", "physical": "tab:red"}
    for name, v in res["variants"].items():
        m, e = np.asarray(v["mean"]), np.asarray(v["sem"])
        ax.plot(steps, m, "o-", color=colours.get(name), label=name)
        ax.fill_between(steps, m - e, m + e, color=colours.get(name), alpha=0.2)
    ax.axvline(res["t0"], color="k", ls="--", lw=1)
    ax.text(res["t0"], ax.get_ylim()[1], " t0", va="top")
    ax.set_xlabel(f"frame (every {res['frameskip']} raw steps)")
    ax.set_ylabel("surprise ||pred - enc||^2")
    ax.set_title(f"violation of expectation: {res['env'] or 'data'}, {res['trajectories']} trajectories "
                 f"(mean ± sem)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, png)


# -- CLI -----------------------------------------------------------------------------------------------
def _perturbation_help() -> str:
    import textwrap

    from ..envs.base import env_class, env_names
    lines = []
    for name in env_names():
        cls = env_class(name)
        if cls is None:
            continue
        for kind, doc in (("visual", cls.visual_doc), ("physical", cls.physical_doc or "none")):
            lines.append(textwrap.fill(doc, 100, initial_indent=f"  {name} {kind}: ", subsequent_indent="      "))
    return "\n".join(lines)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("surprise", help="violation-of-expectation surprise along trajectories",
                       description="Latent prediction error (surprise) along held-out trajectories: unperturbed, "
                                   "with an object's colour changed from frame t0 (visual), and with an object "
                                   "teleported at t0 (physical); paired t-tests between them.",
                       epilog="Writes surprise.json and surprise.png with --out. Perturbations per environment:\n"
                              + _perturbation_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint folder (model.safetensors + config.json) or a training run folder (its latest)")
    p.add_argument("--data", required=True, help="HDF5 episodes with the env's state columns")
    p.add_argument("--env", help="environment (default: the data set's 'env' attribute)")
    p.add_argument("--out", help="folder for surprise.json and surprise.png")
    p.add_argument("--frames", type=int, help="frames per trajectory, every frameskip raw rows (2 x history + 4)")
    p.add_argument("--t0", type=int, help="frame of the perturbation (history + 2)")
    p.add_argument("--window", type=int, default=3, help="frames from t0 over which the max surprise is taken (3)")
    p.add_argument("--trajectories", type=int, default=50, help="at most this many trajectories, one per episode (50)")
    p.add_argument("--min-distance", type=float,
                   help="smallest teleport distance in the env's units (tworoom 50 px, pusht 80 px, cube 0.1 m, "
                        "reacher 0.5 rad)")
    add_split_seed_device_args(p, "trajectories from held-out episodes (default) or from all episodes",
                               "start rows and teleport positions (0)")
    p.set_defaults(func=main)
    return p


def main(args) -> int:
    if args.min_distance is not None and not args.min_distance >= 0:
        raise UserError(f"--min-distance must be >= 0, got {args.min_distance}")
    res = run_surprise(args.checkpoint, args.data, env=args.env, out=args.out, device=args.device,
                       frames=args.frames, t0=args.t0, window=args.window, trajectories=args.trajectories,
                       split=args.split, seed=args.seed, min_distance=args.min_distance,
                       progress=not args.no_progress)
    print(f"lewm surprise: {res['env'] or 'data set'}, {res['trajectories']} {res['split']} trajectories of "
          f"{res['frames']} frames (frameskip {res['frameskip']}, history {res['history']}), perturbed at frame "
          f"{res['t0']}; frames from the {res['frames_from']}")
    print(res["table"])
    if args.out:
        print(f"results: {res['json']}, {res['png']}")
    return 0
