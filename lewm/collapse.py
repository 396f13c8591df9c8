"""See collapse first-hand: the same model trained with lambda = 0 and lambda = 0.09 on the same data.

Without SIGReg the two-term loss has a trivial minimum: encode every frame to the same point and the
prediction error is 0. `lewm collapse` trains both runs with identical seeds and data and reports the
prediction loss, the per-dimension std of the embeddings and their effective rank on held-out clips
(or the training clips when the data set has no held-out episodes).

    lewm collapse --data tworoom.h5 --preset tiny --steps 300 --out runs/collapse
    lewm collapse --data tworoom.h5 --preset tworoom-cpu --steps 3000 --eval tworoom --out runs/collapse

With `--eval ENV` both models also plan under the evaluation protocol, so the table shows what
collapse costs in success rate.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .atomic import write_json
from .config import Config, preset_names
from .sigreg import effective_rank


@torch.no_grad()
def embedding_stats(model, ds, max_clips: int = 512, batch: int = 64) -> dict:
    """Effective rank and per-dimension std of the encoder's embeddings over up to `max_clips` clips."""
    model.eval()
    idx = np.random.default_rng(0).permutation(len(ds))[:max_clips]
    zs = []
    for i in range(0, len(idx), batch):
        px, _ = ds.batch(idx[i:i + batch])
        zs.append(model.encode(px).reshape(-1, model.cfg.model.embed_dim).float().cpu())
    z = torch.cat(zs)
    std = z.std(0)
    return {"eff_rank": effective_rank(z), "emb_std_mean": float(std.mean()), "emb_std_min": float(std.min()),
            "dims": int(z.shape[1]), "n": int(z.shape[0])}


def run_collapse(cfg: Config, data, out, lambdas=(0.0, 0.09), device: str = "auto", progress: bool = True,
                 env: str | None = None, episodes: int = 50) -> dict:
    """Train one run per lambda; with `env`, also plan with each under the evaluation protocol."""
    from .checkpoint import find_latest
    from .train import Trainer

    out = Path(out)
    results = {}
    for lam in lambdas:
        c = cfg.replace(sigreg={"weight": float(lam)})
        tr = Trainer(c, data, out / f"lambda_{lam:g}", device=device, progress=progress, log=lambda *a: None)
        last = tr.run()
        ds = tr.val_ds if tr.val_ds is not None else tr.train_ds
        stats = embedding_stats(tr.model, ds)
        results[f"{lam:g}"] = {"lambda": lam, "pred_loss": last.get("pred_loss"),
                               "val_pred_loss": last.get("val_pred_loss"), "sigreg": last.get("sigreg"),
                               "steps": tr.step, **stats}
        if env:
            from .evals.planning import evaluate
            r = evaluate(find_latest(out / f"lambda_{lam:g}"), env, data, planner="fast", episodes=episodes,
                         device=device, random_baseline=False, progress=progress)
            results[f"{lam:g}"].update(success_rate=r["success_rate"], ci95=r["ci95"], episodes=r["episodes"])
    write_json(results, out / "collapse.json")
    return results


def format_table(results: dict) -> str:
    with_success = all("success_rate" in r for r in results.values())
    rows = ["lambda  pred_loss  emb_std_mean  eff_rank (of D)" + ("  success (95% CI)" if with_success else "")]
    for r in results.values():
        row = (f"{r['lambda']:<7g} {r['pred_loss']:<10.4f} {r['emb_std_mean']:<13.4f} "
               f"{r['eff_rank']:>6.2f} / {r['dims']:<6}")
        if with_success:
            lo, hi = r["ci95"]
            row += f"  {100 * r['success_rate']:.0f}% ({100 * lo:.0f}-{100 * hi:.0f}%)"
        rows.append(row)
    return "\n".join(rows)


def add_parser(sub) -> None:
    p = sub.add_parser("collapse", help="train with lambda=0 and lambda=0.09 and compare effective rank")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="tiny", choices=preset_names())
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.09])
    p.add_argument("--eval", dest="env", metavar="ENV", help="also plan with both models in ENV (evaluation protocol)")
    p.add_argument("--episodes", type=int, default=50, help="evaluation episodes with --eval")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)


def main(args) -> int:
    from .errors import UserError
    from .config import preset
    if args.steps <= 0:
        raise UserError(f"--steps must be positive, got {args.steps}")
    cfg = preset(args.preset, train={"steps": args.steps, "ckpt_every": args.steps})
    res = run_collapse(cfg, args.data, args.out, args.lambdas, args.device, progress=not args.no_progress,
                       env=args.env, episodes=args.episodes)
    print(format_table(res))
    print(f"lewm collapse: wrote {Path(args.out) / 'collapse.json'}")
    return 0
