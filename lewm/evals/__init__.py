"""Evaluations of a trained model: planning under the protocol (`lewm eval`), probes (`lewm probe`) and
surprise (`lewm surprise`).

    from lewm.evals import evaluate, run_probe, run_surprise
    res = evaluate("runs/tworoom", "tworoom", "data/tworoom.h5")             # lewm/evals/planning.py
    res = run_probe("runs/pusht", "data/pusht.h5", out="evals/probe")        # lewm/evals/probe.py
    res = run_surprise("runs/tworoom", "data/tworoom.h5", out="evals/voe")   # lewm/evals/surprise.py

All three read a checkpoint (a checkpoint folder, a file inside one, or a training run folder: its
latest checkpoint) and an HDF5 data set, and evaluate on the episodes training held out
(`split_episodes(E, cfg.train.val_frac, cfg.train.seed)` with the checkpoint's config; `split="all"`
for every episode). What they share (the env-name rule, the split, reading frames) is in common.py.
"""
from __future__ import annotations

import importlib

_LAZY = {"evaluate": ".planning", "save_results": ".planning", "run_probe": ".probe", "run_surprise": ".surprise"}
__all__ = list(_LAZY)


def __getattr__(name):  # the entry points are imported lazily (they pull in torch, scipy, matplotlib)
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'lewm.evals' has no attribute '{name}'")
