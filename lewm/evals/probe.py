"""`lewm probe --checkpoint C --data F`: linear and MLP probes from frozen embeddings to physical state.

    lewm probe --checkpoint runs/pusht --data data/pusht.h5 --out evals/probe
    lewm probe --checkpoint runs/tworoom --data data/tworoom.h5 --target agent --target state[2:4]

    from lewm.evals.probe import run_probe
    res = run_probe("runs/pusht", "data/pusht.h5", out="evals/probe")
    res["targets"]["block"]["linear"]["mse"], res["targets"]["block"]["mlp"]["r"]

What is probed: the encoder + projector latent z (`LeWM.encode`, eval mode, no gradient) of single
frames; the model is never changed. Targets are the environment's `probe_targets` (name -> column
and slice of the data set's per-row state columns, and optionally a transform): PushT agent xy, block
xy, block angle (the `state` column's angle in [0, 2 pi), regressed as is, as the paper's table) and
angle_sc (its sin and cos: no wrap at 0 / 2 pi); TwoRoom agent xy; Cube cube position; Reacher joint
angles and joints_sc (their sin and cos). `--target` picks some of them, or names any data column
(`state`, `state[2:4]`, `qpos[0]`). The environment comes from `--env` or the data set's `env`
attribute; no simulator is started.

Protocol: rows of the training episodes fit the probes, rows of the held-out episodes (the split
training used: `split_episodes(E, cfg.train.val_frac, cfg.train.seed)` with the checkpoint's config)
are reported. Both are subsampled (seeded) to at most --max-rows / --max-eval-rows. Embeddings are
z-scored with the training rows' mean/std, and so are targets; metrics are on the z-scored targets:

    MSE  mean squared error over rows and target dims (predicting the training mean scores ~1)
    r    Pearson correlation between prediction and truth per target dim, averaged over dims

Probes: linear = closed-form ridge regression (bias unpenalised, --ridge lambda times the number of
rows); MLP = D -> 256 -> 256 -> dims (ReLU), Adam (lr 1e-3, batch 256), early stopping on the MSE
of 10% of the training episodes (patience 10 epochs, best weights kept). The table is printed as
the paper's ("MSE / r") and written to probe.json with the per-dim numbers; probe_scatter.png plots
predicted against true held-out values of the first target, for both probes.

The confound floor ("from the others"): a target correlated with other probed quantities can look
partly encoded when the latent holds only the others (PushT's agent stays near its block: the block's
true pose alone predicts the agent's position at r ~0.7). So, when several targets are probed, each
target is also regressed (the same ridge and MLP, same rows) from the true values of the targets that
share none of its columns; a latent probe at or below that floor says nothing about the target itself.
"""
from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import write_json
from ..errors import UserError
from ..plots import pyplot, save_figure
from .common import add_split_seed_device_args, data_env_name, encode_rows, episode_rows, heldout_split, load_model

_COLUMN_SPEC = re.compile(r"^(?P<col>[A-Za-z_][\w/.-]*)(\[(?P<a>-?\d*)(?P<colon>:)?(?P<b>-?\d*)\])?$")



# what a target may do to its columns before it is probed (an env's probe_targets third element)
TRANSFORMS = ("sincos",)  # sincos: angles in radians -> (sin, cos) of each (no wrap at 0 / 2 pi)


@dataclass
class Target:
    name: str
    column: str
    sl: slice
    transform: str = ""

    def describe(self) -> str:
        a = "" if self.sl.start is None else self.sl.start
        b = "" if self.sl.stop is None else self.sl.stop
        cols = f"{self.column}[{a}:{b}]"
        return f"sin, cos of {cols}" if self.transform == "sincos" else cols

    def apply(self, y: np.ndarray) -> np.ndarray:
        """(rows, dims) selected values -> what is probed: as is, or (sin of each dim, cos of each)."""
        if self.transform == "sincos":
            return np.concatenate([np.sin(y), np.cos(y)], axis=1)
        return y


def env_probe_targets(env: str | None) -> dict:
    """name -> (column, slice) for environment `env` (its class's `probe_targets`)."""
    if env is None:
        return {}
    from ..envs.base import env_class, env_names
    cls = None
    if ":" in env:  # a user's 'package.module:Factory' (as lewm collect takes)
        import importlib
        mod, _, attr = env.partition(":")
        try:
            cls = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise UserError(f"--env {env}: cannot import it ({e})") from None
    else:
        cls = env_class(env)  # the env modules import without their simulators
    t = getattr(cls, "probe_targets", None)
    if isinstance(t, dict) and t:
        return dict(t)
    raise UserError(f"--env {env}: unknown environment, so no probe targets are known (known environments: "
                      f"{', '.join(env_names())}); name data columns with --target COLUMN or COLUMN[a:b]")


def resolve_targets(info, env: str | None, targets: list[str] | None) -> list[Target]:
    """The targets to probe: `targets` (env target names or column specs) or all of the env's."""
    known = env_probe_targets(env)
    cols = {k: v for k, v in info.columns.items() if k not in ("pixels", "action", "ep_len", "ep_offset")}
    if not targets:
        if not known:
            raise UserError(f"{info.path}: no 'env' attribute, so no probe targets are known; pass --env NAME "
                              "or --target COLUMN[a:b]")
        specs = list(known)
    else:
        specs = list(targets)
    out = []
    for s in specs:
        s = str(s).strip()
        if s in known:
            col, sl, *tf = known[s]
            tf = tf[0] if tf else ""
            if tf not in ("",) + TRANSFORMS:
                raise UserError(f"--env {env}: probe target '{s}' has an unknown transform '{tf}' "
                                  f"(known: {', '.join(TRANSFORMS)})")
            out.append(Target(s, col, sl, tf))
            continue
        m = _COLUMN_SPEC.match(s)
        if not m or m.group("col") not in cols:
            env_part = f"{env} targets: {', '.join(known)}; " if known else ""
            raise UserError(f"unknown probe target '{s}' ({env_part}or a data column as COLUMN or COLUMN[a:b], "
                              f"columns: {', '.join(sorted(cols)) or 'none'})")
        col = m.group("col")
        a, b = m.group("a"), m.group("b")
        if m.group(2) is None:
            sl = slice(None)
        elif m.group("colon"):
            sl = slice(int(a) if a else None, int(b) if b else None)
        else:
            if not a:
                raise UserError(f"probe target '{s}': empty index")
            i = int(a)
            sl = slice(i, i + 1 if i != -1 else None)
        out.append(Target(s, col, sl))
    # the columns must exist, be numeric and give at least one dim
    for t in out:
        if t.column not in info.columns:
            raise UserError(f"{info.path}: probe target '{t.name}' needs column '{t.column}', which the data set "
                              f"lacks (columns: {', '.join(sorted(cols)) or 'none'})")
        shape, dtype = info.columns[t.column]
        if np.dtype(dtype).kind not in "fiub":
            raise UserError(f"{info.path}: column '{t.column}' (probe target '{t.name}') is not numeric ({dtype})")
        width = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        if len(range(width)[t.sl]) == 0:
            raise UserError(f"{info.path}: probe target '{t.name}' selects nothing of column '{t.column}' "
                              f"({width} values per row)")
    return out


# -- probes ------------------------------------------------------------------------------------------
def fit_ridge(X: np.ndarray, Y: np.ndarray, lam: float = 1e-3) -> np.ndarray:
    """Closed-form ridge on (n, D) features with a bias column; returns W (D+1, k). The penalty is
    lam * n on the weights (not the bias)."""
    X = np.asarray(X, np.float64)
    Y = np.asarray(Y, np.float64)
    n, D = X.shape
    Xb = np.concatenate([X, np.ones((n, 1))], 1)
    reg = np.eye(D + 1) * lam * n
    reg[-1, -1] = 0.0
    return np.linalg.solve(Xb.T @ Xb + reg, Xb.T @ Y)


def predict_ridge(W: np.ndarray, X: np.ndarray) -> np.ndarray:
    return np.asarray(X, np.float64) @ W[:-1] + W[-1]


def fit_mlp(X, Y, X_val, Y_val, hidden: int = 256, layers: int = 2, lr: float = 1e-3, batch_size: int = 256,
            max_epochs: int = 200, patience: int = 10, seed: int = 0, device: str = "cpu"):
    """A small MLP (D -> hidden x layers -> k, ReLU), Adam, early stopping on (X_val, Y_val).
    Returns (model, info dict)."""
    import torch
    import torch.nn as nn
    g = torch.Generator().manual_seed(seed)
    torch_state = torch.get_rng_state()
    torch.manual_seed(seed)
    dims = [X.shape[1]] + [hidden] * layers
    mods = []
    for a, b in zip(dims[:-1], dims[1:]):
        mods += [nn.Linear(a, b), nn.ReLU()]
    net = nn.Sequential(*mods, nn.Linear(dims[-1], Y.shape[1])).to(device)
    torch.set_rng_state(torch_state)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    Xt = torch.as_tensor(X, dtype=torch.float32, device=device)
    Yt = torch.as_tensor(Y, dtype=torch.float32, device=device)
    Xv = torch.as_tensor(X_val, dtype=torch.float32, device=device)
    Yv = torch.as_tensor(Y_val, dtype=torch.float32, device=device)
    best, best_state, best_epoch, bad = float("inf"), None, 0, 0
    n = len(Xt)
    epoch = 0
    for epoch in range(1, max_epochs + 1):
        net.train()
        perm = torch.randperm(n, generator=g).to(device)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            loss = (net(Xt[idx]) - Yt[idx]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            v = float((net(Xv) - Yv).pow(2).mean())
        if v < best - 1e-6:
            best, best_epoch, bad = v, epoch, 0
            best_state = {k: t.detach().clone() for k, t in net.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return net, {"epochs": epoch, "best_epoch": best_epoch, "val_mse": best}


def predict_mlp(net, X, device: str = "cpu") -> np.ndarray:
    import torch
    with torch.no_grad():
        return net(torch.as_tensor(X, dtype=torch.float32, device=device)).cpu().numpy().astype(np.float64)


def metrics(pred: np.ndarray, true: np.ndarray) -> dict:
    """MSE and Pearson r on z-scored targets (n, k): overall and per dim (r averaged over dims)."""
    pred = np.asarray(pred, np.float64)
    true = np.asarray(true, np.float64)
    mse_d = ((pred - true) ** 2).mean(0)
    r_d = np.array([_pearson(pred[:, j], true[:, j]) for j in range(true.shape[1])])
    return {"mse": float(mse_d.mean()), "r": float(np.nanmean(r_d)) if np.isfinite(r_d).any() else float("nan"),
            "mse_per_dim": mse_d.tolist(), "r_per_dim": r_d.tolist()}


def _pearson(a, b) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def _subsample(rows: np.ndarray, k: int | None, rng: np.random.Generator) -> np.ndarray:
    if k is None or len(rows) <= k:
        return rows
    return np.sort(rng.choice(rows, size=k, replace=False))


def _read_targets(path, targets: list[Target], rows: np.ndarray) -> dict:
    from ..data.format import open_h5
    out = {}
    with open_h5(path) as f:
        for t in targets:
            col = np.asarray(f[t.column][()], np.float64)
            col = col.reshape(len(col), -1)[:, t.sl]
            y = col[rows]
            if not np.isfinite(y).all():
                bad = int((~np.isfinite(y).all(1)).sum())
                raise UserError(f"{path}: column '{t.column}' (probe target '{t.name}') has {bad} rows with NaN "
                                  "or inf among the probed rows")
            out[t.name] = t.apply(y)
    return out


def _overlaps(a: Target, b: Target, info) -> bool:
    """Whether two targets read a common value (the same column, intersecting slices)."""
    if a.column != b.column:
        return False
    shape = info.columns[a.column][0]
    width = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return bool(set(range(width)[a.sl]) & set(range(width)[b.sl]))


def _zscore(y: np.ndarray, like: np.ndarray) -> np.ndarray:
    m, s = like.mean(0), like.std(0)
    return (y - m) / np.where(s > 1e-12, s, 1.0)


# -- the whole evaluation ------------------------------------------------------------------------------
def run_probe(checkpoint, data, env: str | None = None, targets: list[str] | None = None, out=None,
              device: str = "auto", mlp: bool = True, max_rows: int | None = 20000,
              max_eval_rows: int | None = 10000, ridge: float = 1e-3, hidden: int = 256, layers: int = 2,
              max_epochs: int = 200, patience: int = 10, seed: int = 0, split: str = "heldout",
              progress: bool = True, log=print) -> dict:
    """Fit probes on the training episodes, report them on the held-out episodes; see the module
    docstring. `checkpoint` is a LeWM or a path. Writes probe.json and probe_scatter.png under `out`
    when given. Returns the results dict (`table` holds the printed table)."""
    from ..data.format import inspect
    t_start = time.perf_counter()
    for name, v in (("max-rows", max_rows), ("max-eval-rows", max_eval_rows)):
        if v is not None and v < 2:
            raise UserError(f"--{name} must be at least 2, got {v}")
    if not ridge >= 0:
        raise UserError(f"--ridge must be >= 0, got {ridge}")
    info = inspect(data)
    env = data_env_name(info, env)
    tgts = resolve_targets(info, env, targets)
    model, ckpt = load_model(checkpoint, device)
    dev = str(model.action_mean.device)
    train_eps, eval_eps = heldout_split(info, model.cfg, split)
    rng = np.random.default_rng(seed)
    # 10% of the training episodes (at least one) stop the MLP early; the ridge fits on all of them
    perm = rng.permutation(train_eps)
    n_stop = max(1, int(round(0.1 * len(perm)))) if len(perm) > 1 else 0
    stop_eps, fit_eps = np.sort(perm[:n_stop]), np.sort(perm[n_stop:])
    fit_rows = _subsample(episode_rows(info, fit_eps), max_rows, rng)
    stop_cap = max(2, max_rows // 9) if max_rows else None
    stop_rows = _subsample(episode_rows(info, stop_eps), stop_cap, rng) if n_stop else fit_rows[:0]
    eval_rows = _subsample(episode_rows(info, eval_eps), max_eval_rows, rng)
    if len(fit_rows) < 2 or len(eval_rows) < 2:
        raise UserError(f"{info.path}: too few rows to probe ({len(fit_rows)} training, {len(eval_rows)} held-out)")

    all_rows = np.unique(np.concatenate([fit_rows, stop_rows, eval_rows]))
    Z_all = encode_rows(model, info.path, all_rows, progress=progress, desc="encode frames")
    pos = {r: i for i, r in enumerate(all_rows.tolist())}

    def feats(rows):
        return Z_all[[pos[r] for r in rows.tolist()]]

    Z_fit, Z_stop, Z_eval = feats(fit_rows), feats(stop_rows), feats(eval_rows)
    mu, sd = Z_fit.mean(0), Z_fit.std(0) + 1e-6
    X_fit, X_stop, X_eval = (Z_fit - mu) / sd, (Z_stop - mu) / sd, (Z_eval - mu) / sd
    Y_fit_all = _read_targets(info.path, tgts, fit_rows)
    Y_stop_all = _read_targets(info.path, tgts, stop_rows) if len(stop_rows) else None
    Y_eval_all = _read_targets(info.path, tgts, eval_rows)

    results = {}
    scatter = None
    for t in tgts:
        y_fit, y_eval = Y_fit_all[t.name], Y_eval_all[t.name]
        ym, ys = y_fit.mean(0), y_fit.std(0)
        ys = np.where(ys > 1e-12, ys, 1.0)
        Yf, Ye = (y_fit - ym) / ys, (y_eval - ym) / ys
        W = fit_ridge(X_fit, Yf, ridge)
        p_lin = predict_ridge(W, X_eval)
        res = {"column": t.column, "slice": t.describe(), "dims": int(Yf.shape[1]),
               "train_mean": ym.tolist(), "train_std": ys.tolist(),
               "linear": metrics(p_lin, Ye),
               "mean_baseline": {"mse": float((Ye ** 2).mean())}}
        p_mlp = None
        if mlp:
            if Y_stop_all is not None:
                Ys = (Y_stop_all[t.name] - ym) / ys
                Xs = X_stop
            else:  # a single training episode: stop on the training rows themselves
                Ys, Xs = Yf, X_fit
            net, fit_info = fit_mlp(X_fit, Yf, Xs, Ys, hidden=hidden, layers=layers, max_epochs=max_epochs,
                                    patience=patience, seed=seed, device=dev)
            p_mlp = predict_mlp(net, X_eval, dev)
            res["mlp"] = metrics(p_mlp, Ye)
            res["mlp"].update(fit_info)
        others = [u for u in tgts if not _overlaps(t, u, info)]
        if others:  # the confound floor: this target from the other targets' true values (module docstring)
            O = {k: np.concatenate([_zscore(Y[u.name], Y_fit_all[u.name]) for u in others], 1)
                 for k, Y in (("fit", Y_fit_all), ("stop", Y_stop_all), ("eval", Y_eval_all)) if Y is not None}
            floor = {"from": [u.name for u in others],
                     "linear": metrics(predict_ridge(fit_ridge(O["fit"], Yf, ridge), O["eval"]), Ye)}
            if mlp:
                Os, Ys = (O["stop"], (Y_stop_all[t.name] - ym) / ys) if Y_stop_all is not None else (O["fit"], Yf)
                onet, _ = fit_mlp(O["fit"], Yf, Os, Ys, hidden=hidden, layers=layers, max_epochs=max_epochs,
                                  patience=patience, seed=seed, device=dev)
                floor["mlp"] = metrics(predict_mlp(onet, O["eval"], dev), Ye)
            res["from_others"] = floor
        results[t.name] = res
        if scatter is None:
            scatter = (t, y_eval, p_lin * ys + ym, None if p_mlp is None else p_mlp * ys + ym)

    table = format_table(results, mlp)
    res = {"env": env, "checkpoint": ckpt, "data": str(info.path), "split": split,
           "embed_dim": int(model.mcfg.embed_dim),
           "episodes": {"fit": len(fit_eps), "early_stop": len(stop_eps), "eval": len(eval_eps)},
           "rows": {"fit": len(fit_rows), "early_stop": len(stop_rows), "eval": len(eval_rows)},
           "probe": {"linear": f"ridge, lambda {ridge} x rows",
                     "mlp": f"{layers}x{hidden} ReLU, Adam 1e-3, early stop patience {patience}" if mlp else None},
           "targets": results, "table": table, "time_s": time.perf_counter() - t_start}
    if out is not None:
        out = Path(out)
        res["json"] = str(write_json(res, out / "probe.json"))
        res["png"] = str(plot_scatter(scatter, out / "probe_scatter.png"))
    return res


def format_table(results: dict, mlp: bool = True) -> str:
    """The paper's table: one row per target, 'MSE / r' for the linear and the MLP probe."""
    floor = any("from_others" in r for r in results.values())
    head = (["Target", "Linear MSE / r"] + (["MLP MSE / r"] if mlp else []) + ["Mean baseline MSE"]
            + ([f"From the others' true values ({'MLP' if mlp else 'linear'} r)"] if floor else []))
    rows = []
    for name, r in results.items():
        cells = [f"{name} ({r['slice']})", f"{r['linear']['mse']:.3f} / {r['linear']['r']:.3f}"]
        if mlp:
            cells.append(f"{r['mlp']['mse']:.3f} / {r['mlp']['r']:.3f}")
        cells.append(f"{r['mean_baseline']['mse']:.3f}")
        if floor:
            o = r.get("from_others")
            cells.append(f"{o['mlp' if mlp else 'linear']['r']:.3f} ({', '.join(o['from'])})" if o else "-")
        rows.append(cells)
    w = [max(len(c[i]) for c in [head] + rows) for i in range(len(head))]
    line = lambda c: "| " + " | ".join(x.ljust(w[i]) for i, x in enumerate(c)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(c) for c in rows])


def plot_scatter(scatter, png: Path) -> Path:
    """Predicted vs true held-out values of one target: one panel per (probe, dim)."""
    plt = pyplot()
    t, y, p_lin, p_mlp = scatter
    probes = [("linear", p_lin)] + ([("MLP", p_mlp)] if p_mlp is not None else [])
    dims = min(y.shape[1], 4)
    fig, axes = plt.subplots(len(probes), dims, figsize=(3.6 * dims, 3.4 * len(probes)), squeeze=False)
    rng = np.random.default_rng(0)
    idx = rng.choice(len(y), size=min(len(y), 3000), replace=False)
    for i, (kind, p) in enumerate(probes):
        for j in range(dims):
            ax = axes[i, j]
            ax.scatter(y[idx, j], p[idx, j], s=3, alpha=0.4)
            lo, hi = float(min(y[:, j].min(), p[:, j].min())), float(max(y[:, j].max(), p[:, j].max()))
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            r = _pearson(p[:, j], y[:, j])
            ax.set_title(f"{t.name}[{j}] {kind}: r = {r:.3f}", fontsize=9)
            ax.set_xlabel("true")
            ax.set_ylabel("predicted")
    fig.suptitle(f"probe: {t.name} ({t.describe()}), held-out rows", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, png)


# -- CLI -----------------------------------------------------------------------------------------------
def _targets_help() -> str:
    from ..envs.base import env_class, env_names
    return "; ".join(f"{n} {', '.join(env_class(n).probe_targets)}" for n in env_names() if env_class(n) is not None)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("probe", help="linear/MLP probes from frozen embeddings to physical state",
                       description="Fit linear (ridge) and MLP probes from the frozen latent z of single frames to "
                                   "physical quantities on the training episodes, and report MSE (z-scored "
                                   "targets) and Pearson r on the held-out episodes.",
                       epilog=f"Targets per environment: {_targets_help()}. Writes probe.json and probe_scatter.png "
                              "with --out.")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint folder (model.safetensors + config.json) or a training run folder (its latest)")
    p.add_argument("--data", required=True, help="HDF5 episodes with the state columns")
    p.add_argument("--env", help="environment (default: the data set's 'env' attribute)")
    p.add_argument("--target", action="append", default=None, metavar="NAME",
                   help="probe target: an env target name (e.g. agent) or a data column COLUMN / COLUMN[a:b] "
                        "(repeatable; default: all of the env's targets)")
    p.add_argument("--out", help="folder for probe.json and probe_scatter.png")
    p.add_argument("--no-mlp", action="store_true", help="linear probes only")
    p.add_argument("--max-rows", type=int, default=20000, help="training rows used to fit (20000)")
    p.add_argument("--max-eval-rows", type=int, default=10000, help="held-out rows reported (10000)")
    p.add_argument("--ridge", type=float, default=1e-3, help="ridge lambda, times the number of rows (1e-3)")
    add_split_seed_device_args(p, "report on held-out episodes (default) or on all episodes",
                               "row subsampling and MLP initialisation (0)")
    p.set_defaults(func=main)
    return p


def main(args) -> int:
    res = run_probe(args.checkpoint, args.data, env=args.env, targets=args.target, out=args.out,
                    device=args.device, mlp=not args.no_mlp, max_rows=args.max_rows,
                    max_eval_rows=args.max_eval_rows, ridge=args.ridge, seed=args.seed, split=args.split,
                    progress=not args.no_progress)
    r = res["rows"]
    print(f"lewm probe: {res['env'] or 'data columns'}, fit on {r['fit']} rows of {res['episodes']['fit']} training "
          f"episodes, reported on {r['eval']} rows of {res['episodes']['eval']} {res['split']} episodes "
          "(MSE on z-scored targets / Pearson r)")
    print(res["table"])
    if args.out:
        print(f"results: {res['json']}, {res['png']}")
    return 0
