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
READ_BLOCK_BYTES = 64 << 20  # how much of a compressed column a reader decodes at a time


def block_rows(frame_shape, chunk_rows: int = CHUNK_ROWS, block_bytes: int = READ_BLOCK_BYTES) -> int:
    """Rows per read of a column with per-row shape `frame_shape` (uint8): about `block_bytes`, a
    whole number of chunks (so every chunk is decoded once), at least one chunk."""
    row = int(np.prod(frame_shape))
    return max(chunk_rows, (block_bytes // max(1, row)) // chunk_rows * chunk_rows)


from ..errors import DataError  # noqa: E402


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
        self.overwrite = overwrite
        self._lock = _lock_for_writing(self.path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
        try:
            self.f = h5py.File(str(self.tmp), "w")
        except BaseException:
            self._unlock()
            raise
        # HDF5 writes some data when h5py frees an object (a chunk cache, metadata), inside __dealloc__,
        # where a failed write (a full disk) is only printed ("Exception ignored in ..."): while this writer
        # is open such failures are recorded instead and raised by the next write (see _guard)
        import sys
        self._failure = None
        self._prev_hook = sys.unraisablehook
        sys.unraisablehook = self._unraisable
        self.attrs = dict(attrs or {})
        self.rows = 0  # rows added (written + pending)
        self.written = 0  # rows on disk: a multiple of CHUNK_ROWS until close()
        self.pending: dict[str, list[np.ndarray]] = {}
        self.ep_len: list[int] = []
        self.columns: list[str] | None = None
        self._ds: dict = {}

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
                # handles kept open while writing: a dataset handle freed mid-write flushes its chunk cache in
                # h5py's __dealloc__, where a failed write (a full disk) could only be printed, not raised
                self._ds[k] = self.f.create_dataset(k, shape=(0, *a.shape[1:]), maxshape=(None, *a.shape[1:]),
                                      dtype=a.dtype, chunks=chunks, **_compression_kwargs(a.ndim))
        elif sorted(cols) != self.columns:
            raise DataError(f"{self.path}: episode columns {sorted(cols)} differ from the first episode's "
                            f"{self.columns}")
        for k in self.columns:
            self.pending.setdefault(k, []).append(np.asarray(cols[k]).astype(self._ds[k].dtype, copy=False))
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

        self._check_space(sum(a.nbytes for k in self.columns for a in self.pending[k]))  # an upper bound

        def write():
            for k in self.columns:
                buf = np.concatenate(self.pending[k]) if len(self.pending[k]) > 1 else self.pending[k][0]
                d = self._ds[k]
                d.resize(self.written + n, axis=0)
                d[self.written:self.written + n] = buf[:n]
                self.pending[k] = [buf[n:]] if len(buf) > n else []

        self._guard(write)
        self.written += n

    def _guard(self, fn):
        """Run a write; an OS-level failure (a full disk), raised or recorded by _unraisable, discards the
        partial file and raises one DataError."""
        try:
            out = fn()
        except (OSError, RuntimeError) as e:
            if not _is_write_error(e):
                raise
            self._failure = self._failure or _WriteFailure(e)
            out = None
        if self._failure is not None:
            err = self._failure
            self._discard()
            raise self._write_error(err) from None
        return out

    def _check_space(self, nbytes: int) -> None:
        """Refuse a write that cannot fit before HDF5 attempts it: HDF5 reports some failed writes only
        from h5py's object destructors, as printed tracebacks rather than exceptions. The estimate is the
        uncompressed size plus 10% and 64 KiB of metadata; a write that fails anyway is still caught."""
        try:
            st = os.statvfs(self.tmp.parent)
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        if free < nbytes * 1.1 + (64 << 10):
            self._failure = _WriteFailure(OSError(28, f"No space left on device ({free} bytes free, about "
                                                      f"{nbytes} to write)"))
            err = self._failure
            self._discard()
            raise self._write_error(err) from None

    def _unraisable(self, u) -> None:
        e = u.exc_value
        if isinstance(e, (OSError, RuntimeError)) and _is_write_error(e) and "file write failed" in str(e):
            if self._failure is None:
                self._failure = _WriteFailure(e)
            return
        self._prev_hook(u)

    def _discard(self) -> None:
        import gc
        self.abort()  # HDF5 objects of the failed file may still report failed flushes when freed: recorded
        gc.collect()
        self._restore_hook()

    def _restore_hook(self) -> None:
        import sys
        if getattr(self, "_prev_hook", None) is not None:
            if sys.unraisablehook == self._unraisable:
                sys.unraisablehook = self._prev_hook
            self._prev_hook = None

    def close(self) -> Path:
        self._flush(final=True)
        ep_len = np.asarray(self.ep_len, dtype=np.int64)
        ep_offset = np.concatenate([[0], np.cumsum(ep_len)[:-1]]).astype(np.int64) if len(ep_len) else ep_len
        self.f.create_dataset("ep_len", data=ep_len)
        self.f.create_dataset("ep_offset", data=ep_offset)
        for k, v in self.attrs.items():
            self.f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list, tuple)) else v

        def finish():
            self.f.flush()
            self._ds.clear()
            self.f.close()
            with open(self.tmp, "rb") as fh:
                os.fsync(fh.fileno())

        self._guard(finish)
        if self.overwrite:
            os.replace(self.tmp, self.path)
        else:
            try:  # atomic "create if absent": a file that appeared meanwhile is never replaced
                os.link(self.tmp, self.path)
            except FileExistsError:
                raise DataError(f"{self.path}: file appeared while this run was writing (another "
                                "`lewm collect`?); it was kept, pass --overwrite to replace it") from None
            os.remove(self.tmp)
        self._unlock()
        self._restore_hook()
        return self.path

    def abort(self) -> None:
        """Remove the temporary file and release the lock (idempotent)."""
        self._ds.clear()
        try:
            self.f.close()
        except Exception:
            pass
        try:
            os.remove(self.tmp)
        except FileNotFoundError:
            pass
        self._unlock()
        if self._failure is None:
            self._restore_hook()

    def _unlock(self) -> None:
        if self._lock is not None:
            _unlock(self._lock)
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    def _write_error(self, e) -> DataError:
        full = getattr(e, "errno", None) == 28 or "No space left" in str(e) or "errno = 28" in str(e)
        kept = "the existing file was not changed" if self.path.exists() else "no file was written"
        return DataError(f"{self.path}: writing failed ({'the disk is full' if full else e}); {kept}, the "
                         "partial temporary file was removed")


class _WriteFailure:
    """The message and errno of a failed write, without its traceback."""

    def __init__(self, e: Exception):
        self.errno, self.text = getattr(e, "errno", None), str(e)

    def __str__(self):
        return self.text


def _is_write_error(e) -> bool:
    """An OS-level write failure: OSError, or h5py's RuntimeError carrying the OS error ("file write
    failed ... errno = 28")."""
    if isinstance(e, FileNotFoundError):
        return False
    return isinstance(e, OSError) or (isinstance(e, RuntimeError) and "errno = " in str(e))


def _lock_for_writing(path: Path):
    """An exclusive lock (flock) on .NAME.lock beside `path`, held while one writer writes `path`: a
    second writer (another `lewm collect` into the same path) is refused at once instead of racing."""
    import fcntl
    lock = path.with_name(f".{path.name}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            other = os.pread(fd, 64, 0).decode(errors="replace").strip()
        finally:
            os.close(fd)
        raise DataError(f"{path}: another process{' (pid ' + other + ')' if other else ''} is writing this "
                        f"file (lock {lock.name}); wait for it or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd, lock


def _unlock(lock) -> None:
    import fcntl
    fd, path = lock
    try:
        path.unlink(missing_ok=True)  # while still holding it: a later writer makes a fresh lock file
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def episode_actions_with_nan_tail(actions: np.ndarray) -> np.ndarray:
    """Row t holds (o_t, a_t): given T-1 actions for T observations, append the NaN last row."""
    actions = np.asarray(actions, dtype=np.float32)
    return np.concatenate([actions, np.full((1, actions.shape[1]), np.nan, np.float32)], axis=0)
