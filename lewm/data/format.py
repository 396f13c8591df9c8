"""The HDF5 episode layout (the reference platform's, shared/spec/reference.md section 6).

One flat array per column over all N rows of all episodes, plus two index arrays:

    pixels     (N, H, W, 3) uint8   observation t
    action     (N, A)       float   action t (taken after observation t); NaN on each episode's last row
    proprio    (N, P)       float   optional
    state      (N, S)       float   optional
    ep_len     (E,)         int     rows per episode
    ep_offset  (E,)         int     first row of each episode
    ...        (N, ...)             any other per-row column (step_idx, ep_idx, goal_*, ...)

Arrays of 2+ dimensions are chunked by 100 rows and compressed (Blosc-LZ4 through hdf5plugin, as the
reference; files it wrote load once `hdf5plugin` is imported, which this module does). Dataset
metadata goes in HDF5 attributes. Files are written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

try:  # registers the Blosc/LZ4/Zstd filters with HDF5 (reference files use Blosc-LZ4)
    import hdf5plugin  # noqa: F401
    _HAVE_PLUGIN = True
except Exception:  # pragma: no cover - optional
    _HAVE_PLUGIN = False

import h5py

REQUIRED = ("pixels", "action", "ep_len", "ep_offset")
INDEX_COLUMNS = ("ep_len", "ep_offset")
CHUNK_ROWS = 100


class DataError(ValueError):
    """A data set the user gave is unusable; the message names the file and the column."""


@dataclass
class DatasetInfo:
    path: Path
    num_rows: int
    num_episodes: int
    ep_len: np.ndarray
    ep_offset: np.ndarray
    columns: dict = field(default_factory=dict)  # name -> (shape, dtype)
    attrs: dict = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple:
        return tuple(self.columns["pixels"][0][1:])

    @property
    def action_dim(self) -> int:
        return int(self.columns["action"][0][1])


def _decode_attr(v):
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, str) and v[:1] in "{[":
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def open_h5(path: str | os.PathLike) -> h5py.File:
    """Open an HDF5 file read-only with a clear error for missing, non-HDF5 or truncated files."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected an HDF5 file")
    try:
        if not h5py.is_hdf5(str(path)):
            raise DataError(f"{path}: not an HDF5 file")
        return h5py.File(str(path), "r")
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"{path}: cannot be read as HDF5 (truncated or corrupt?): {e}") from None


def inspect(path: str | os.PathLike, required=REQUIRED) -> DatasetInfo:
    """Validate the layout and return its description. Raises DataError naming file and column."""
    path = Path(path)
    with open_h5(path) as f:
        keys = set(f.keys())
        for col in required:
            if col not in keys:
                raise DataError(f"{path}: missing column '{col}' (has: {', '.join(sorted(keys)) or 'nothing'})")
        try:
            ep_len = np.asarray(f["ep_len"][()]).astype(np.int64).reshape(-1)
            ep_offset = np.asarray(f["ep_offset"][()]).astype(np.int64).reshape(-1)
        except Exception as e:
            raise DataError(f"{path}: column 'ep_len'/'ep_offset' unreadable: {e}") from None
        if ep_len.shape != ep_offset.shape:
            raise DataError(f"{path}: columns 'ep_len' ({ep_len.size}) and 'ep_offset' ({ep_offset.size}) "
                            "have different lengths")
        if ep_len.size == 0:
            raise DataError(f"{path}: column 'ep_len' is empty (no episodes)")
        if (ep_len <= 0).any():
            raise DataError(f"{path}: column 'ep_len' has non-positive lengths")
        n = int(f["pixels"].shape[0])
        columns = {}
        for k in keys:
            if not isinstance(f[k], h5py.Dataset):
                continue
            columns[k] = (tuple(f[k].shape), f[k].dtype)
            if k in INDEX_COLUMNS:
                continue
            if f[k].ndim == 0 or f[k].shape[0] != n:
                raise DataError(f"{path}: column '{k}' has {f[k].shape[0] if f[k].ndim else 0} rows, "
                                f"'pixels' has {n}")
        if (ep_offset < 0).any() or (ep_offset + ep_len > n).any():
            raise DataError(f"{path}: columns 'ep_offset'/'ep_len' index past the {n} rows of 'pixels'")
        px = f["pixels"]
        if px.ndim != 4 or px.shape[-1] != 3:
            raise DataError(f"{path}: column 'pixels' must be (N, H, W, 3), has shape {px.shape}")
        if px.dtype != np.uint8:
            raise DataError(f"{path}: column 'pixels' must be uint8, has dtype {px.dtype}")
        act = f["action"]
        if act.ndim != 2:
            raise DataError(f"{path}: column 'action' must be (N, A), has shape {act.shape}")
        if act.dtype.kind != "f":
            raise DataError(f"{path}: column 'action' must be floating point, has dtype {act.dtype}")
        attrs = {k: _decode_attr(v) for k, v in f.attrs.items()}
        try:  # a truncated file can have a readable header but unreadable chunks: touch the ends
            if n:
                px[0]
                px[n - 1]
        except Exception as e:
            raise DataError(f"{path}: column 'pixels' unreadable (truncated, or its compression filter "
                            f"is missing: pip install hdf5plugin): {e}") from None
    return DatasetInfo(path, n, int(ep_len.size), ep_len, ep_offset, columns, attrs)


def _compression_kwargs(arr_ndim: int) -> dict:
    if arr_ndim < 2:
        return {}
    if _HAVE_PLUGIN:
        return dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))
    return {"compression": "gzip", "compression_opts": 4}


class H5Writer:
    """Append episodes, then `close()` renames the temporary file into place (atomic).

        with H5Writer("data.h5", attrs={"env": "tworoom"}) as w:
            w.add_episode({"pixels": px, "action": act, "state": st})

    Every episode must give the same columns. On an exception inside the `with`, the temporary file
    is removed and nothing appears under the final name.

    Rows are buffered and written in whole chunks of CHUNK_ROWS, so every chunk is compressed and
    written exactly once. Writing episodes straight in would rewrite the chunks that straddle episode
    boundaries, and with the Blosc filter that can corrupt a chunk: when a rewrite of a chunk that
    HDF5 had already flushed compressed no longer compresses, HDF5 (1.14, via h5py 3.16 and hdf5plugin
    7.1) stored the raw bytes but kept the chunk's "filtered" mark, so reading it failed with "filter
    returned failure during read" (seen on a PushT action column; tests/test_data.py keeps the case)."""

    def __init__(self, path: str | os.PathLike, attrs: dict | None = None, overwrite: bool = False):
        self.path = Path(path)
        if not self.path.parent.exists():
            raise DataError(f"{self.path}: directory '{self.path.parent}' does not exist")
        if self.path.exists() and not overwrite:
            raise DataError(f"{self.path}: file exists (pass --overwrite to replace it)")
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.f = h5py.File(str(self.tmp), "w")
        self.attrs = dict(attrs or {})
        self.rows = 0  # rows added (written + pending)
        self.written = 0  # rows on disk: a multiple of CHUNK_ROWS until close()
        self.pending: dict[str, list[np.ndarray]] = {}
        self.ep_len: list[int] = []
        self.columns: list[str] | None = None

    def add_episode(self, cols: dict) -> None:
        lens = {k: len(v) for k, v in cols.items()}
        n = next(iter(lens.values()))
        if any(v != n for v in lens.values()):
            raise DataError(f"{self.path}: episode columns have different lengths: {lens}")
        if self.columns is None:
            self.columns = sorted(cols)
            for k in self.columns:
                a = np.asarray(cols[k])
                chunks = (CHUNK_ROWS, *a.shape[1:]) if a.ndim >= 1 else None
                self.f.create_dataset(k, shape=(0, *a.shape[1:]), maxshape=(None, *a.shape[1:]),
                                      dtype=a.dtype, chunks=chunks, **_compression_kwargs(a.ndim))
        elif sorted(cols) != self.columns:
            raise DataError(f"{self.path}: episode columns {sorted(cols)} differ from the first episode's "
                            f"{self.columns}")
        for k in self.columns:
            self.pending.setdefault(k, []).append(np.asarray(cols[k]).astype(self.f[k].dtype, copy=False))
        self.rows += n
        self.ep_len.append(n)
        self._flush(final=False)

    def _flush(self, final: bool) -> None:
        """Write the pending rows that fill whole chunks (all of them when `final`)."""
        n = self.rows - self.written
        if not final:
            n = n // CHUNK_ROWS * CHUNK_ROWS
        if n <= 0 or self.columns is None:
            return
        for k in self.columns:
            buf = np.concatenate(self.pending[k]) if len(self.pending[k]) > 1 else self.pending[k][0]
            d = self.f[k]
            d.resize(self.written + n, axis=0)
            d[self.written:self.written + n] = buf[:n]
            self.pending[k] = [buf[n:]] if len(buf) > n else []
        self.written += n

    def close(self) -> Path:
        self._flush(final=True)
        ep_len = np.asarray(self.ep_len, dtype=np.int64)
        ep_offset = np.concatenate([[0], np.cumsum(ep_len)[:-1]]).astype(np.int64) if len(ep_len) else ep_len
        self.f.create_dataset("ep_len", data=ep_len)
        self.f.create_dataset("ep_offset", data=ep_offset)
        for k, v in self.attrs.items():
            self.f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list, tuple)) else v
        self.f.flush()
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self.f.close()
        except Exception:
            pass
        try:
            os.remove(self.tmp)
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def episode_actions_with_nan_tail(actions: np.ndarray) -> np.ndarray:
    """Row t holds (o_t, a_t): given T-1 actions for T observations, append the NaN last row."""
    actions = np.asarray(actions, dtype=np.float32)
    return np.concatenate([actions, np.full((1, actions.shape[1]), np.nan, np.float32)], axis=0)
