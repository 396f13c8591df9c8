"""Training throughput with the data path included: HDF5 -> loader -> device -> step, in samples/s.

Modes, each a continuous stream of batches from the same seeded sampler, as `lewm train` runs them:

  data path only (RAM cache)    the loader's gather + the copy to the device, no step
  data path only (HDF5 reads)   clips read and decoded from the HDF5 file per batch (--workers processes)
  eager                         Trainer.train_step, the reference
  compile                       Trainer(compile=True): torch.compile of the loss (forward + backward)
  compile + CUDA graphs         Trainer(compile=True, cuda_graphs=True), CUDA only

If the data path alone is slower than a step, the loader limits training, not the model. Each step mode
is checked before timing: its first step's loss, from the same initial weights on the same first batch,
must equal the eager step's. Warm-up steps (compilation, graph capture) are not timed; then `windows`
windows of `steps` steps are timed, synchronising only at window ends, and the table gives the median
and p10/p90 of samples/s over the windows.

    python bench/train_throughput.py                    # CPU: tworoom-cpu preset (32 px, batch 32)
    python bench/train_throughput.py --device cuda      # GPU: pusht preset (224 px, batch 128)
    python bench/train_throughput.py --quick            # smoke test

Rows are appended to profiles/train_throughput.csv (or --csv PATH).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402

CSV_FIELDS = bu.COMMON_FIELDS + [
    "preset", "batch", "image_size", "mode", "cache", "workers", "steps_timed", "samples_per_s", "p10_samples_per_s",
    "p90_samples_per_s", "ms_per_step", "ratio_vs_eager", "gflop_per_step", "floor_samples_per_s", "check"]


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
    ap.add_argument("--preset", default=None, help="default: pusht on CUDA, tworoom-cpu on the CPU, tiny with --quick")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: the preset's)")
    ap.add_argument("--steps", type=int, default=None, help="steps per timed window (CUDA 20, CPU 10)")
    ap.add_argument("--windows", type=int, default=5, help="timed windows per mode")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, capture)")
    ap.add_argument("--workers", type=int, default=2, help="loader processes for the HDF5-read data path")
    ap.add_argument("--episodes", type=int, default=None, help="episodes in the synthetic HDF5 file")
    ap.add_argument("--data", default=None, help="an existing HDF5 file instead of a synthetic one")
    ap.add_argument("--no-compile", action="store_true", help="skip the compile modes")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    ap.add_argument("--csv", default=str(bu.PROFILES / "train_throughput.csv"), help="CSV to append to ('' = none)")
    ap.add_argument("--quick", action="store_true", help="toy sizes for the smoke test")
    return ap.parse_args(argv)


def make_data(path: Path, cfg, episodes: int, length: int) -> Path:
    from lewm.data.synthetic import write_synthetic
    return write_synthetic(path, episodes=episodes, length=length, image_size=cfg.model.image_size, seed=0,
                           overwrite=True)


def main(argv=None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = bu.pick_device(args.device)
    gpu = device.type == "cuda"
    import lewm
    from lewm.data.dataset import BatchSampler, ClipDataset, make_loader
    from lewm.train import Trainer

    preset = args.preset or ("tiny" if args.quick else ("pusht" if gpu else "tworoom-cpu"))
    cfg = lewm.preset(preset)
    B = args.batch or (8 if args.quick else cfg.train.batch_size)
    steps = args.steps or (2 if args.quick else (20 if gpu else 10))
    windows = 2 if args.quick else args.windows
    warmup = 1 if args.quick else args.warmup
    total = warmup + steps * windows
    tmp = Path(tempfile.mkdtemp(prefix="lewm-train-bench-"))
    # about an epoch of clips per mode, capped (a GPU mode runs ~100 steps of 128: the sampler simply
    # starts a new shuffled epoch when one ends); the file is gzip-compressed, as collected data is
    length = 60
    clips_per_ep = length - cfg.train.num_frames * cfg.model.frameskip + 1
    episodes = args.episodes or int(np.clip(np.ceil((total + 2) * B / clips_per_ep), 8, 64))
    cfg = cfg.replace(train={"batch_size": B, "steps": total + 10, "workers": 0, "val_frac": 0.0})
    print(bu.header(device))
    t0 = time.perf_counter()
    data = Path(args.data) if args.data else make_data(tmp / "synthetic.h5", cfg, episodes, length)
    print(f"config: preset {preset} ({cfg.model.image_size} px, batch {B}, {cfg.train.num_frames} frames/clip), "
          f"{windows} windows x {steps} steps after {warmup} warm-up steps; data {data.name}"
          + ("" if args.data else f" (synthetic, {episodes} episodes x {length} steps, written in "
                                  f"{time.perf_counter() - t0:.1f} s)"))
    sys.stdout.flush()
    sync = bu.sync_fn(device)

    # -- the reference: eager step on the first batch -------------------------------------------------------
    def trainer(name, **kw):
        return Trainer(cfg, data, tmp / name, device=str(device), progress=False, log=lambda *a: None, **kw)

    modes = [("eager", {})]
    if not args.no_compile:
        modes.append(("compile", {"compile": True}))
        if gpu:
            modes.append(("compile + CUDA graphs", {"compile": True, "cuda_graphs": True}))
    trainers, checks, failed = {}, {}, []
    first_batch = None
    ref_loss = None
    for name, kw in modes:
        tr = trainer(name.replace(" ", "_").replace("+", ""), **kw)
        sampler = BatchSampler(len(tr.train_ds), B, cfg.train.seed, 0, total + 1)
        it = iter(make_loader(tr.train_ds, sampler, 0))
        px, act = next(it)
        if first_batch is None:
            first_batch = (px.clone(), act.clone())
        loss = float(tr.train_step(px, act)["loss"])
        if ref_loss is None:
            ref_loss = loss
        tol = (2e-2 if gpu else 1e-4) * abs(ref_loss) + 1e-6
        ok = abs(loss - ref_loss) <= tol and np.isfinite(loss)
        checks[name] = f"first loss {loss:.6f} vs eager {ref_loss:.6f}"
        print(f"check {name:<38} {'OK  ' if ok else 'FAIL'} {checks[name]}")
        if not ok:
            failed.append(name)
        trainers[name] = (tr, it)
    if failed:
        print(f"FAILED: {', '.join(failed)}: first-step loss differs from the eager step's; nothing timed.",
              file=sys.stderr)
        return 1

    # -- floors: FLOPs of one step, counted (forward + backward; the optimizer's elementwise work is not) ----
    import copy

    from torch.utils.flop_counter import FlopCounterMode
    m = copy.deepcopy(trainers["eager"][0].model).train()
    with FlopCounterMode(display=False) as fc:
        o = m.loss(pixels=first_batch[0].to(device), actions=first_batch[1].to(device))
        o["loss"].backward()
    step_gflop = fc.get_total_flops() / 1e9
    del m, o
    peak = bu.gemm_peak_gflops(device)
    floor_sps = B / (step_gflop / peak)

    # -- data path only ---------------------------------------------------------------------------------------
    data_modes = {}
    ds_ram = trainers["eager"][0].train_ds if trainers["eager"][0].train_ds.cache == "ram" else \
        ClipDataset(data, cfg.train.num_frames, cfg.model.frameskip, cache="ram", image_size=cfg.model.image_size)
    ds_h5 = ClipDataset(data, cfg.train.num_frames, cfg.model.frameskip, trainers["eager"][0].train_ds.episodes,
                        cache="none", image_size=cfg.model.image_size)
    for label, ds, workers in (("data path only", ds_ram, 0), ("data path only", ds_h5, args.workers)):
        sampler = BatchSampler(len(ds), B, cfg.train.seed, 0, total + 1)
        it = iter(make_loader(ds, sampler, workers))
        px, act = next(it)
        same = torch.equal(px, first_batch[0]) and torch.allclose(act, first_batch[1])
        key = f"{label} ({'RAM cache' if ds.cache == 'ram' else f'HDF5, {workers} workers'})"
        checks[key] = "first batch equals the trainer's" if same else "FIRST BATCH DIFFERS"
        print(f"check {key:<38} {'OK  ' if same else 'FAIL'} {checks[key]}")
        if not same:
            print("FAILED: the data path gives a different first batch; nothing timed.", file=sys.stderr)
            return 1

        def step(it=it):
            p, a = next(it)
            p.to(device, non_blocking=True)
            a.to(device, non_blocking=True)
            return p.shape[0]
        data_modes[key] = (step, ds.cache, workers)

    step_modes = {}
    for name, (tr, it) in trainers.items():
        def step(tr=tr, it=it):
            p, a = next(it)
            tr.train_step(p, a)
            return p.shape[0]
        step_modes[name] = (step, tr.train_ds.cache, 0)

    # -- timing ------------------------------------------------------------------------------------------------
    results = {}
    for name, (fn, cache, workers) in {**data_modes, **step_modes}.items():
        for _ in range(warmup):
            fn()
        sync()
        rates = []
        for _ in range(windows):
            t0 = time.perf_counter()
            n = sum(fn() for _ in range(steps))
            sync()
            rates.append(n / (time.perf_counter() - t0))
        r = np.asarray(rates)
        results[name] = {"median": float(np.median(r)), "p10": float(np.percentile(r, 10)),
                         "p90": float(np.percentile(r, 90)), "cache": cache, "workers": workers}

    eager = results["eager"]["median"]
    best = max((n for n in step_modes), key=lambda n: results[n]["median"])
    data_best = max((n for n in data_modes), key=lambda n: results[n]["median"])
    print()
    step_r = "   ".join(f"{n} / eager: {results[n]['median'] / eager:.2f}x" for n in step_modes if n != "eager")
    ratios = "   ".join(f"{n.replace('data path only ', 'data path ')} / {best}: "
                         f"{results[n]['median'] / results[best]['median']:.2f}x" for n in data_modes)
    limit = "the model limits" if results[data_best]["median"] > results[best]["median"] else "THE LOADER LIMITS"
    print(f"RATIOS  {step_r + '   ' if step_r else ''}{ratios}   ({limit}, best data path "
          f"{data_best.replace('data path only ', '')}, best step mode {best})")
    rows, csv_rows = [], []
    common = bu.common_row(device)
    for name, s in results.items():
        rows.append([name, f"{s['median'] / eager:.2f}x", f"{s['median']:.0f}", f"{s['p10']:.0f}", f"{s['p90']:.0f}",
                     f"{B / s['median'] * 1e3:.2f}", s["cache"], s["workers"]])
        csv_rows.append({**common, "preset": preset, "batch": B, "image_size": cfg.model.image_size, "mode": name,
                         "cache": s["cache"], "workers": s["workers"], "steps_timed": steps * windows,
                         "samples_per_s": f"{s['median']:.1f}", "p10_samples_per_s": f"{s['p10']:.1f}",
                         "p90_samples_per_s": f"{s['p90']:.1f}", "ms_per_step": f"{B / s['median'] * 1e3:.3f}",
                         "ratio_vs_eager": f"{s['median'] / eager:.3f}",
                         "gflop_per_step": f"{step_gflop:.3f}", "floor_samples_per_s": f"{floor_sps:.0f}",
                         "check": checks.get(name, "")})
    print(bu.fmt_table(rows, ["mode", "vs eager", "samples/s", "p10", "p90", "ms/batch", "cache", "workers"]))
    print(f"(samples/s: median over {windows} windows of {steps} steps; a sample is one clip of "
          f"{cfg.train.num_frames} frames)")
    print(f"floor: {step_gflop:.2f} GFLOP per step (forward + backward, counted) -> at this device's measured "
          f"fp32 GEMM rate ({peak:.0f} GFLOP/s) at most {floor_sps:.0f} samples/s; best step mode reaches "
          f"{results[best]['median'] / floor_sps * 100:.0f}% of it")
    if args.csv:
        p = bu.append_csv(args.csv, csv_rows, CSV_FIELDS)
        print(f"appended {len(csv_rows)} rows to {p}")
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
