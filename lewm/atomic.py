"""Writing files so that nothing half-written is ever left where a reader looks: write a temporary
name beside the target, fsync, rename over it. A failure (a full disk, an interrupt) removes the
temporary and leaves the previous file as it was.

    with atomic_path("out/results.json") as tmp:   # any writer that takes a path
        tmp.write_text(...)
    write_json(obj, "out/probe.json")                # NaN/inf -> null, numpy -> Python
    with atomic_dir("runs/x/export") as tmp:      # a whole folder, renamed into place when complete
        (tmp / "weights.pt").write_bytes(...)

The HDF5 writer (lewm/data/format.py) follows the same rule with its own temporary file, since it
must also refuse to replace an existing file unless asked.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np


def fsync_file(path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(d: Path) -> None:
    """fsync every file in folder `d`, then the folder itself (before renaming it into place)."""
    for f in Path(d).iterdir():
        if f.is_file():
            fsync_file(f)
    try:
        fd = os.open(d, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


@contextlib.contextmanager
def atomic_path(path, fsync: bool = True):
    """Yield a temporary path beside `path` (same suffix, so writers that go by the suffix work); on a
    clean exit it is fsynced and renamed to `path`, on any exception removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{os.urandom(3).hex()}{path.suffix}")
    try:
        yield tmp
        if fsync:
            fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(text: str, path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(obj, path, sort_keys: bool = False) -> Path:
    """Atomic JSON write; NaN and inf become null, numpy scalars and arrays Python values."""
    return write_text(json.dumps(jsonable(obj), indent=2, sort_keys=sort_keys), path)


def publish_dir(tmp: Path, path: Path) -> None:
    """Put the finished folder `tmp` in place as `path` (fsynced first): a rename, with an existing
    `path` moved aside and removed only once the new one is in place."""
    tmp, path = Path(tmp), Path(path)
    fsync_dir(tmp)
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary folder beside `path`; on a clean exit it is published as `path` (`publish_dir`),
    on any exception removed, leaving an existing `path` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        publish_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def jsonable(o):
    if isinstance(o, dict):
        return {str(k): jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return jsonable(o.tolist())
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return f if np.isfinite(f) else None
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, Path):
        return str(o)
    return o
