"""Profile one training step: a chrome trace with named ranges, the number of ops / kernel launches per
step, time per range and the top ops.

Ranges: `step` (the whole step, data included), `data` (next batch from the loader: gather or HDF5
read), and those the Trainer opens itself (lewm/train.py's `nvtx_range`, made into profiler ranges here
as well): `data_to_device`, `forward`, `backward`, `optimizer` (eager / compile) or `graph_replay`
(CUDA graphs). The profiled step's loss is checked against an unprofiled twin trainer's step on the same
batch from the same weights.

    python profiles/trace_train.py                      # CPU: tworoom-cpu preset, eager
    python profiles/trace_train.py --compile            # torch.compile'd step
    python profiles/trace_train.py --device cuda --compile --cuda-graphs   # pusht preset, batch 128
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profutil as pu  # noqa: E402
from profutil import bu  # noqa: E402

RANGES = ["data", "data_to_device", "forward", "backward", "optimizer", "graph_replay"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--preset", default=None, help="default: pusht on CUDA, tworoom-cpu on the CPU")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--cuda-graphs", action="store_true")
    ap.add_argument("--cache", default="ram", choices=["ram", "none"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(pu.TRACES))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = bu.pick_device(args.device)
    gpu = device.type == "cuda"
    if args.cuda_graphs and not gpu:
        raise SystemExit("--cuda-graphs needs CUDA (none here)")
    import lewm
    import lewm.train as T
    from lewm.data.dataset import BatchSampler, make_loader
    from lewm.data.synthetic import write_synthetic

    preset = "tiny" if args.quick else (args.preset or ("pusht" if gpu else "tworoom-cpu"))
    cfg = lewm.preset(preset)
    B = args.batch or (8 if args.quick else cfg.train.batch_size)
    cfg = cfg.replace(train={"batch_size": B, "steps": 1000, "workers": 0, "val_frac": 0.0, "cache": args.cache})
    tmp = Path(tempfile.mkdtemp(prefix="lewm-trace-train-"))
    n_ep = max(8, (args.warmup + 3) * B // 30 + 2)
    data = write_synthetic(tmp / "synthetic.h5", episodes=n_ep, length=60, image_size=cfg.model.image_size)
    mode = "compile + CUDA graphs" if args.cuda_graphs else ("compile" if args.compile else "eager")
    print(bu.header(device))
    print(f"config: preset {preset} ({cfg.model.image_size} px), batch {B}, {mode}, cache {args.cache}")

    def trainer(name):
        return T.Trainer(cfg, data, tmp / name, device=str(device), compile=args.compile,
                         cuda_graphs=args.cuda_graphs, progress=False, log=lambda *a: None)

    tr, twin = trainer("profiled"), trainer("twin")
    sampler = BatchSampler(len(tr.train_ds), B, cfg.train.seed, 0, args.warmup + 1)
    batches = make_loader(tr.train_ds, sampler, 0)
    for i in range(args.warmup):  # compilation, graph capture; the twin takes the same steps
        px, act = next(batches)
        for t in (tr, twin):
            torch.manual_seed(100 + i)  # the same dropout masks for both
            t.train_step(px, act)
    sync = bu.sync_fn(device)
    orig = T.nvtx_range
    T.nvtx_range = lambda name: _both(torch.profiler.record_function(name), orig(name))
    try:
        sync()
        torch.manual_seed(99)
        with pu.profiler(device) as prof:
            with torch.profiler.record_function("step"):
                with torch.profiler.record_function("data"):
                    px, act = next(batches)
                out = tr.train_step(px, act)
                loss = float(out["loss"])  # the host sync ends the step
    finally:
        T.nvtx_range = orig
    torch.manual_seed(99)
    want = float(twin.train_step(px, act)["loss"])
    ok = abs(loss - want) <= 1e-6 * abs(want) + 1e-8
    print(f"check: profiled step loss {loss:.6f} vs unprofiled twin {want:.6f}: {'OK' if ok else 'FAIL'}")
    s = pu.summarize(prof, RANGES, "step")
    pu.print_summary(f"one training step ({mode}, batch {B})", s, RANGES, device)
    slug = mode.replace(" + ", "_").replace(" ", "_").lower()
    path = pu.export(prof, Path(args.out) / f"train_{slug}_{'cuda' if gpu else 'cpu'}.json")
    print(f"trace: {path}")
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


@contextlib.contextmanager
def _both(a, b):
    with a, b:
        yield


if __name__ == "__main__":
    sys.exit(main())
