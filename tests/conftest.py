"""Test setup. TRITON_INTERPRET must be set before any @triton.jit runs, so it is set here, before
the kernel modules are imported, whenever there is no CUDA device."""
import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        # TRITON_INTERPRET is only set without CUDA (above): with a GPU, a kernel launched on CPU tensors
        # is an error, so the interpreter tests skip and the `gpu` tests cover the kernels
        skip = pytest.mark.skip(reason="interp: runs Triton kernels on CPU tensors under TRITON_INTERPRET=1, "
                                       "which is off on a machine with CUDA (the gpu tests run instead)")
        marker = "interp"
    else:
        skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
        marker = "gpu"
    for item in items:
        if marker in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tmp_out(tmp_path):
    return tmp_path


# == TwoRoom data set and a tiny trained model, once per session (planning/eval helper) ============
import contextlib  # noqa: E402

# `tworoom_data`: 300 TwoRoom episodes at 32 px collected with the door-seeking expert (noise 2.0, as
# the reference's collector), max 100 steps, each episode stopping at success; ~2 s.
# `tworoom_model`: the "tiny" preset trained 1500 steps of batch 32 on it (~50 s on one loaded core);
# the checkpoint folder (LeWM.load / lewm eval --checkpoint). Held-out episodes: split_episodes(300,
# 0.1, 3072), as the training used. Measured: CEM 94% vs random 32% on its 50 held-out episodes
# (150 episodes / 800 steps gave only 46% vs 40%: too few held-out episodes and too little training).
# Set LEWM_TEST_CACHE=DIR to keep both between sessions.
TWOROOM_TEST_DATA = {"episodes": 300, "image_size": 32, "seed": 0, "max_steps": 100}
TWOROOM_TEST_TRAIN = {"train": {"steps": 1500, "batch_size": 32, "log_every": 100, "ckpt_every": 1500}}


def collect_tworoom(path, episodes=150, image_size=32, seed=0, max_steps=100, policy="expert"):
    """TwoRoom episodes from `lewm collect`'s own code path (one process, no progress bar)."""
    from lewm.data.collect import collect
    return collect("tworoom", episodes, path, image_size=image_size, seed=seed, max_steps=max_steps,
                   policy=policy, overwrite=True, progress=False)


@contextlib.contextmanager
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster than
    two once other processes compete for the cores (measured 41 vs 5.5 train steps/s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def single_thread():
    """Module-wide one_torch_thread(): `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    with one_torch_thread():
        yield


def _lewm_cache_dir(tmp_path_factory, name):
    from pathlib import Path
    root = os.environ.get("LEWM_TEST_CACHE")
    if root:
        d = Path(root) / name
        d.mkdir(parents=True, exist_ok=True)
        return d
    return tmp_path_factory.mktemp(name)


@pytest.fixture(scope="session")
def tworoom_data(tmp_path_factory):
    import hashlib
    import json
    key = hashlib.sha1(json.dumps(TWOROOM_TEST_DATA, sort_keys=True).encode()).hexdigest()[:8]
    path = _lewm_cache_dir(tmp_path_factory, "tworoom_data") / f"tworoom_{key}.h5"
    if not path.exists():
        collect_tworoom(path, **TWOROOM_TEST_DATA)
    return path


@pytest.fixture(scope="session")
def tworoom_model(tworoom_data, tmp_path_factory):
    import hashlib
    import json

    import lewm
    from lewm.checkpoint import find_latest
    from lewm.train import Trainer
    key = hashlib.sha1(json.dumps([TWOROOM_TEST_DATA, TWOROOM_TEST_TRAIN], sort_keys=True).encode()).hexdigest()[:8]
    out = _lewm_cache_dir(tmp_path_factory, "tworoom_model") / f"run_{key}"
    ckpt = find_latest(out)
    if ckpt is None:
        import shutil
        shutil.rmtree(out, ignore_errors=True)
        cfg = lewm.preset("tiny", **TWOROOM_TEST_TRAIN)
        with one_torch_thread():
            Trainer(cfg, tworoom_data, out, device="cpu", progress=False, log=lambda *a: None).run()
        ckpt = find_latest(out)
    return ckpt
def random_frames(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """(n, size, size, 3) uint8 frames of uniform noise from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)


def untrained_checkpoint(data, folder):
    """A tiny LeWM that never trained (seed 0), with the action statistics of `data`, saved in folder/untrained."""
    import lewm
    from lewm.data.dataset import ClipDataset
    torch.manual_seed(0)
    m = lewm.LeWM(lewm.preset("tiny"))
    ds = ClipDataset(data, cache="none")
    m.set_action_stats(ds.action_mean, ds.action_std)
    return m.save(folder / "untrained")
# == end TwoRoom fixtures ===========================================================================


# == small synthetic data sets for the training tests (test_train.py, test_faults.py) ===============
def quiet(*a):
    """A log function that prints nothing."""


def synthetic_h5(tmp_path_factory, episodes: int):
    """`episodes` synthetic episodes of 40 rows at 32 px (lewm.data.synthetic), in a fresh folder."""
    from lewm.data.synthetic import write_synthetic
    d = tmp_path_factory.mktemp("syn")
    return write_synthetic(d / "syn.h5", episodes=episodes, length=40, image_size=32, seed=0)
