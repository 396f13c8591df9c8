"""The HDF5 layout, the clip loader and every bad input the training command must name clearly."""
import h5py
import numpy as np
import pytest
import torch

from lewm.cli import main as cli
from lewm.data.dataset import BatchSampler, ClipDataset, epoch_order, split_episodes
from lewm.data.format import DataError, H5Writer, inspect
from lewm.data.synthetic import write_synthetic


def write_raw(path, pixels, action, ep_len, ep_offset, **extra):
    """A file in the reference platform's layout, written column by column with plain h5py."""
    with h5py.File(path, "w") as f:
        if pixels is not None:
            f.create_dataset("pixels", data=pixels, chunks=(min(100, len(pixels)), *pixels.shape[1:]))
        if action is not None:
            f.create_dataset("action", data=action)
        if ep_len is not None:
            f.create_dataset("ep_len", data=np.asarray(ep_len))
        if ep_offset is not None:
            f.create_dataset("ep_offset", data=np.asarray(ep_offset))
        for k, v in extra.items():
            f.create_dataset(k, data=v)
    return path


def good_columns(n_eps=3, length=25, size=16, A=2):
    rng = np.random.default_rng(0)
    N = n_eps * length
    px = rng.integers(0, 256, (N, size, size, 3), dtype=np.uint8)
    act = rng.normal(size=(N, A)).astype(np.float32)
    act[length - 1::length] = np.nan  # last row of each episode
    return px, act, [length] * n_eps, list(range(0, N, length))


def test_reference_layout_loads_unchanged(tmp_path):
    """Columns as the reference platform writes them (pixels, action, proprio, state, step_idx,
    ep_idx, ep_len, ep_offset; Blosc-LZ4 chunks of 100 rows)."""
    import hdf5plugin
    px, act, L, O = good_columns()
    N = len(px)
    path = tmp_path / "ref.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("pixels", data=px, chunks=(50, 16, 16, 3), **hdf5plugin.Blosc(cname="lz4"))
        f.create_dataset("action", data=act, chunks=(50, 2), **hdf5plugin.Blosc(cname="lz4"))
        f.create_dataset("proprio", data=np.zeros((N, 4), np.float32))
        f.create_dataset("state", data=np.zeros((N, 7), np.float32))
        f.create_dataset("step_idx", data=np.tile(np.arange(25), 3))
        f.create_dataset("episode_idx", data=np.repeat(np.arange(3), 25))
        f.create_dataset("ep_len", data=np.array(L, np.int32))
        f.create_dataset("ep_offset", data=np.array(O, np.int64))
    ds = ClipDataset(path, num_frames=4, frameskip=5, cache="none")
    assert len(ds) == 3 * (25 - 20 + 1)
    p, a = ds.batch([0, 7])
    assert p.shape == (2, 4, 16, 16, 3) and p.dtype == torch.uint8
    assert a.shape == (2, 4, 10) and not torch.isnan(a).any()
    # frames are rows s, s+5, s+10, s+15; actions rows s..s+19 z-scored, NaN -> 0
    s = ds.starts[7]
    assert torch.equal(p[1, 2], torch.from_numpy(px[s + 10]))
    mean, std = np.nanmean(act, 0), np.nanstd(act, 0)
    want = np.nan_to_num((act[s:s + 20] - mean) / std).reshape(4, 10)
    assert np.allclose(a[1].numpy(), want, atol=1e-5)


def test_ram_cache_resizes_once_and_matches(tmp_path):
    path = write_synthetic(tmp_path / "s.h5", episodes=4, length=30, image_size=32)
    a = ClipDataset(path, cache="ram", image_size=16)
    b = ClipDataset(path, cache="none", image_size=16)
    pa, aa = a.batch([3, 1, 20])
    pb, ab = b.batch([3, 1, 20])
    assert pa.shape[-3:] == (16, 16, 3) and torch.equal(pa, pb) and torch.equal(aa, ab)


def test_writer_is_atomic_and_refuses_overwrite(tmp_path):
    path = tmp_path / "w.h5"
    with pytest.raises(RuntimeError):
        with H5Writer(path) as w:
            w.add_episode({"pixels": np.zeros((3, 4, 4, 3), np.uint8), "action": np.zeros((3, 2), np.float32)})
            raise RuntimeError("boom")
    assert not path.exists() and not list(tmp_path.iterdir())  # no partial file, no temp file
    write_synthetic(path, episodes=2, length=21, image_size=8)
    with pytest.raises(DataError, match="file exists"):
        write_synthetic(path, episodes=2, length=21, image_size=8)
    info = inspect(path)
    assert info.num_episodes == 2 and info.num_rows == 42 and np.isnan(h5py.File(path)["action"][20]).all()


def test_split_and_order_are_deterministic():
    tr, va = split_episodes(50, 0.1, 3072)
    assert len(va) == 5 and not set(tr) & set(va) and len(tr) + len(va) == 50
    assert np.array_equal(split_episodes(50, 0.1, 3072)[1], va)
    assert np.array_equal(epoch_order(100, 1, 2), epoch_order(100, 1, 2))
    assert not np.array_equal(epoch_order(100, 1, 2), epoch_order(100, 1, 3))
    s = BatchSampler(100, 8, seed=1, start_step=0, total_steps=30)
    full = list(s)
    assert len(full) == 30 and all(len(b) == 8 for b in full)
    resumed = list(BatchSampler(100, 8, seed=1, start_step=17, total_steps=30))
    assert all(np.array_equal(x, y) for x, y in zip(full[17:], resumed))
    r0 = list(BatchSampler(100, 8, seed=1, total_steps=3, rank=0, world=2))
    r1 = list(BatchSampler(100, 8, seed=1, total_steps=3, rank=1, world=2))
    assert all(not set(x) & set(y) for x, y in zip(r0, r1))  # ranks see disjoint clips


def run_train(capsys, data, tmp_path, *extra):
    code = cli(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--preset", "tiny",
                "--steps", "2", "--no-progress", *extra])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("case,needle", [
    ("missing", "file not found"),
    ("not_hdf5", "not an HDF5 file"),
    ("truncated", "cannot be read as HDF5"),
    ("no_pixels", "missing column 'pixels'"),
    ("no_action", "missing column 'action'"),
    ("lengths", "column 'action' has 74 rows, 'pixels' has 75"),
    ("ep_index", "columns 'ep_len' (3) and 'ep_offset' (2)"),
    ("past_end", "index past the 75 rows"),
    ("short", "every episode is shorter than a clip (20 rows"),
    ("dtype", "column 'pixels' must be uint8, has dtype float32"),
    ("action_dtype", "column 'action' must be floating point"),
    ("action_dim", "column 'action' has 3 dims but the model expects model.action_dim = 2"),
])
def test_bad_data_gets_one_clear_message(tmp_path, capsys, case, needle):
    px, act, L, O = good_columns()
    p = tmp_path / f"{case}.h5"
    if case == "missing":
        p = tmp_path / "nope.h5"
    elif case == "not_hdf5":
        p.write_text("pixels,action\n1,2\n")
    elif case == "truncated":
        write_raw(p, px, act, L, O)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 3])
    elif case == "no_pixels":
        write_raw(p, None, act, L, O)
    elif case == "no_action":
        write_raw(p, px, None, L, O)
    elif case == "lengths":
        write_raw(p, px, act[:-1], L, O)
    elif case == "ep_index":
        write_raw(p, px, act, L, O[:2])
    elif case == "past_end":
        write_raw(p, px, act, [25, 25, 30], O)
    elif case == "short":
        px, act, L, O = good_columns(n_eps=5, length=15)
        write_raw(p, px, act, L, O)
    elif case == "dtype":
        write_raw(p, px.astype(np.float32), act, L, O)
    elif case == "action_dtype":
        write_raw(p, px, np.zeros(act.shape, np.int32), L, O)
    elif case == "action_dim":
        write_raw(p, px, np.concatenate([act, act[:, :1]], 1), L, O)
    code, err = run_train(capsys, p, tmp_path)
    assert code == 2
    assert needle in err, err
    assert str(p.name) in err  # the message names the file
    assert err.count("\n") == 1  # one line, no traceback


def test_bad_flags(tmp_path, capsys):
    data = write_synthetic(tmp_path / "s.h5", episodes=4, length=30, image_size=16)
    code, err = run_train(capsys, data, tmp_path, "--cuda-graphs")
    if not torch.cuda.is_available():
        assert code == 2 and "--cuda-graphs needs a CUDA device" in err
    with pytest.raises(SystemExit) as e:
        cli(["train", "--data", str(data), "--out", str(tmp_path / "x"), "--preset", "nope"])
    assert e.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["train", "--data", str(data), "--out", str(tmp_path / "x"), "--frobnicate"])
    assert "unrecognized arguments: --frobnicate" in capsys.readouterr().err
    code, err = run_train(capsys, data, tmp_path, "--batch-size", "0")
    assert code == 2 and "--batch-size: train.batch_size: must be an integer >= 2" in err
    code, err = run_train(capsys, data, tmp_path, "--batch-size", "4096")
    assert code == 2 and "fewer than one batch of 4096" in err


def test_writer_buffers_whole_chunks_and_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    eps = [{"pixels": rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8),
            "action": rng.normal(size=(n, 3)).astype(np.float32)} for n in rng.integers(1, 260, 23)]
    with H5Writer(tmp_path / "w.h5") as w:
        for e in eps:
            w.add_episode(e)
            assert w.written % 100 == 0  # only whole chunks reach the file before close()
    with h5py.File(tmp_path / "w.h5") as f:
        for k in ("pixels", "action"):
            assert np.array_equal(f[k][()], np.concatenate([e[k] for e in eps]))
        assert list(f["ep_len"][()]) == [len(e["action"]) for e in eps]


@pytest.mark.slow
def test_pusht_action_column_stays_readable(tmp_path):
    """Regression: writing episodes straight into Blosc chunks corrupted the chunk of PushT's action
    column at rows 28300-28399 (episodes 187/188 share it); every chunk must read back."""
    from lewm.data.collect import episodes
    with H5Writer(tmp_path / "p.h5") as w:
        for ep in episodes("pusht", episodes=190, image_size=8, render=False):
            w.add_episode(ep)
    with h5py.File(tmp_path / "p.h5") as f:
        for k in f:
            if f[k].chunks:
                for i in range(0, f[k].shape[0], f[k].chunks[0]):
                    f[k][i:i + f[k].chunks[0]]  # raises "filter returned failure" on a corrupt chunk


def test_corrupt_chunk_is_named(tmp_path, capsys):
    """A chunk whose bytes are damaged after writing: training ends with one line naming the column."""
    import hdf5plugin
    px, act, L, O = good_columns(n_eps=4, length=50)
    act = np.round(act)  # compressible, so Blosc stores the chunks compressed
    p = tmp_path / "corrupt.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("pixels", data=px, chunks=(50, 16, 16, 3))
        f.create_dataset("action", data=act, chunks=(50, 2), **hdf5plugin.Blosc(cname="lz4"))
        f.create_dataset("ep_len", data=np.array(L))
        f.create_dataset("ep_offset", data=np.array(O))
    with h5py.File(p, "r+") as f:  # replace one compressed chunk by its first 10 bytes
        mask, raw = f["action"].id.read_direct_chunk((50, 0))
        assert mask == 0  # the chunk went through the filter
        f["action"].id.write_direct_chunk((50, 0), raw[:10], mask)
    code, err = run_train(capsys, p, tmp_path)
    assert code == 2 and "column 'action'" in err and "unreadable" in err and "corrupt.h5" in err, err
