"""The fast planner (lewm.plan.engine.FastPlanner) against the eager reference CEMPlanner.

Tolerance: with identical noise the two planners run the same CEM; their rollouts differ only in fp32
summation order (~1e-7 relative), far below the gaps between candidates' costs at the top-k boundary
in these settings, so the same elites are chosen and the plans agree to atol 1e-4 (observed: equal),
final costs to rtol 1e-4. On the GPU (marked gpu) at the full default config, where 30 iterations
could let one near-tie flip, the plans are compared through their costs under the reference model.
"""
from __future__ import annotations

import time
import warnings

import pytest
import torch

import lewm
from lewm.plan import CEMPlanner, PlanResult
from lewm.plan.engine import FastPlanner, pack_predictor
from lewm_kernels import rollout as kr


# Tiny problems on a shared 2-core machine: one intra-op thread avoids OpenMP contention with other
# processes (measured: the same test 4 s with one thread, up to 19 s with two under load).
pytestmark = pytest.mark.usefixtures("single_thread")


def make_model(seed: int = 0, preset: str = "tiny", std: float = 0.3) -> lewm.LeWM:
    """adaLN-zero starts every block as the identity: random adaLN weights make the predictor (and so
    the planning problem) non-trivial."""
    torch.manual_seed(seed)
    m = lewm.LeWM(lewm.preset(preset))
    m.set_action_stats([0.1, -0.2], [0.5, 2.0])
    with torch.no_grad():
        for b in m.predictor.blocks:
            torch.nn.init.normal_(b.adaLN_modulation[1].weight, std=std)
            torch.nn.init.normal_(b.adaLN_modulation[1].bias, std=std)
    return m.eval()


@pytest.fixture(scope="module")
def model():
    return make_model()


def frames(n, seed, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)


def assert_same_plan(a: PlanResult, b: PlanResult):
    torch.testing.assert_close(a.actions, b.actions, atol=1e-4, rtol=0)
    torch.testing.assert_close(a.raw_actions, b.raw_actions, atol=1e-4, rtol=0)
    torch.testing.assert_close(a.cost, b.cost, atol=1e-5, rtol=1e-4)


KW = dict(samples=48, elites=6, iterations=4)


def test_fast_equals_reference_torch_backend(model):
    ref = CEMPlanner(model, **KW)
    fast = FastPlanner(model, **KW, backend="torch")
    start, goal = frames(3, 1), frames(3, 2)
    noise = ref.draw_noise(3)
    r, f = ref.plan(start, goal, noise), fast.plan(start, goal, noise)
    assert_same_plan(r, f)
    assert f.actions.shape == (3, 5, 10) and f.raw_actions.shape == (3, 25, 2)
    # the problem is not degenerate: the plan moved away from the initial mean and envs differ
    assert f.actions.abs().max() > 0.1 and f.cost.std() > 1e-3


@pytest.mark.interp
@pytest.mark.slow
def test_fast_equals_reference_triton_backend(model):
    """The fused Triton rollout (interpreted on this CPU) inside the whole CEM loop."""
    kw = dict(samples=24, elites=4, iterations=2)
    ref = CEMPlanner(model, **kw)
    fast = FastPlanner(model, **kw, backend="triton")
    assert fast.backend == "triton"
    start, goal = frames(2, 3), frames(2, 4)
    noise = ref.draw_noise(2)
    assert_same_plan(ref.plan(start, goal, noise), fast.plan(start, goal, noise))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interp)])
@pytest.mark.slow
def test_batched_equals_one_by_one(model, backend):
    kw = dict(samples=24, elites=4, iterations=2) if backend == "triton" else KW
    fast = FastPlanner(model, **kw, backend=backend)
    E = 3 if backend == "torch" else 2
    start, goal = frames(E, 5), frames(E, 6)
    noise = torch.randn(fast.noise_shape(E), generator=torch.Generator().manual_seed(7))
    batched = fast.plan(start, goal, noise)
    for i in range(E):
        one = fast.plan(start[i], goal[i], noise[:, i:i + 1])  # a single (H, W, 3) frame each
        torch.testing.assert_close(batched.actions[i], one.actions[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(batched.cost[i], one.cost[0], atol=1e-5, rtol=1e-4)


def test_same_seed_same_draws(model):
    """noise=None: both planners draw from generators seeded alike, so they plan alike."""
    ref = CEMPlanner(model, **KW, seed=11)
    fast = FastPlanner(model, **KW, seed=11)
    start, goal = frames(2, 8), frames(2, 9)
    assert_same_plan(ref.plan(start, goal), fast.plan(start, goal))


def test_cem_loop_has_no_host_sync(model):
    """The whole CEM loop runs on meta tensors (shapes only, no values): any .item(), .tolist() or
    Python branch on a tensor value would raise. This is what lets CUDA capture it in one graph."""
    fast = FastPlanner(model, **KW, backend="torch")
    fast.weights = fast.weights.to("meta")
    E, D = 2, model.mcfg.embed_dim
    z0, zg = torch.empty(E, D, device="meta"), torch.empty(E, D, device="meta")
    mean, final = fast._cem(z0, zg, torch.empty(fast.noise_shape(E), device="meta"))
    assert mean.shape == (E, 5, 10) and final.shape == (E,) and mean.device.type == "meta"


def test_triton_cem_loop_records_one_persistent_launch_per_rollout(model):
    """The GPU path walked on meta tensors with the launches recorded, not run (no GPU, no
    interpreter): no host synchronisation anywhere on it, and one persistent rollout kernel per CEM
    iteration plus one for the final mean."""
    from lewm_kernels import _utils
    fast = FastPlanner(model, **KW)  # "auto": torch on this CPU, the Triton path while recording
    fast.weights = fast.weights.to("meta")
    E, D = 2, model.mcfg.embed_dim
    z0, zg = torch.empty(E, D, device="meta"), torch.empty(E, D, device="meta")
    with _utils.record_launches() as rec:
        mean, final = fast._cem(z0, zg, torch.empty(fast.noise_shape(E), device="meta"))
    assert mean.shape == (E, 5, 10) and final.shape == (E,)
    assert [r.name for r in rec] == ["_rollout_kernel"] * (KW["iterations"] + 1)
    assert all(r.meta["PERSISTENT"] for r in rec)


def test_from_config_and_by_name(model):
    p = model.cfg.plan
    fast = FastPlanner.from_config(model)
    assert (fast.samples, fast.elites, fast.iterations, fast.horizon) == (p.samples, p.elites, p.iterations, p.horizon)
    assert fast.backend == "torch" and not fast.use_graph  # auto on the CPU
    from lewm.plan.planners import make_planner
    assert isinstance(make_planner("fast", model, samples=16, elites=4), FastPlanner)


def test_pack_predictor_folds(model):
    """Packing folds the action encoder's Conv1d and pred_proj's eval BatchNorm; the packed action
    path and pred_proj reproduce the modules."""
    w = pack_predictor(model)
    a = torch.randn(4, 5, model.mcfg.action_input_dim)
    with torch.no_grad():
        e = model.action_encoder(a)
        h = torch.randn(7, model.mcfg.embed_dim)
        want = model.pred_proj(h)
    got_e = torch.nn.functional.silu(a @ w.act_w1 + w.act_b1) @ w.act_w2 + w.act_b2
    torch.testing.assert_close(got_e, e, atol=1e-5, rtol=1e-5)
    got = torch.nn.functional.gelu(h @ w.head_w1 + w.head_b1) @ w.head_w2 + w.head_b2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="dtype must be"):
        pack_predictor(model, dtype=torch.int8)


def test_refresh_after_weight_change():
    m = make_model(3)
    fast = FastPlanner(m, **KW)
    ref = CEMPlanner(m, **KW)
    start, goal = frames(1, 1), frames(1, 2)
    noise = ref.draw_noise(1)
    with torch.no_grad():
        m.predictor.pos_embedding.mul_(0.5)
    fast.refresh()
    assert_same_plan(ref.plan(start, goal, noise), fast.plan(start, goal, noise))


# -- options and bad input ---------------------------------------------------------------------------


def test_backend_choices_and_notices(model, monkeypatch):
    with pytest.raises(ValueError, match="unknown backend"):
        FastPlanner(model, **KW, backend="cuda")
    with pytest.raises(ValueError, match="dtype must be"):
        FastPlanner(model, **KW, dtype=torch.float16)
    with pytest.warns(RuntimeWarning, match="cuda_graph=True needs the model on CUDA"):
        f = FastPlanner(model, **KW, cuda_graph=True)
    assert not f.use_graph
    monkeypatch.setattr(kr, "_interpreted", lambda: False)  # as on a CPU machine without TRITON_INTERPRET
    with pytest.warns(RuntimeWarning, match="backend 'triton' needs CUDA"):
        f = FastPlanner(model, **KW, backend="triton")
    assert f.backend == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert FastPlanner(model, **KW).backend == "torch"  # auto: silent


def test_bad_inputs(model):
    fast = FastPlanner(model, **KW)
    start, goal = frames(2, 1), frames(2, 2)
    with pytest.raises(ValueError, match="start must be"):
        fast.plan(start[..., :2], goal)
    with pytest.raises(ValueError, match="different numbers of envs"):
        fast.plan(start, goal[:1])
    with pytest.raises(ValueError, match="noise must have shape"):
        fast.plan(start, goal, torch.zeros(fast.noise_shape(3)))
    with pytest.raises(TypeError, match="noise must be a floating"):
        fast.plan(start, goal, torch.zeros(fast.noise_shape(2), dtype=torch.long))
    # float64 and non-contiguous noise are accepted (cast / copied) and give the float32 answer
    noise = torch.randn(fast.noise_shape(2))
    want = fast.plan(start, goal, noise)
    nc = torch.stack([noise, noise], -1)[..., 0]
    assert not nc.is_contiguous()
    assert_same_plan(fast.plan(start, goal, nc.double()), want)


@pytest.mark.slow
def test_compile_backend_matches(model):
    kw = dict(samples=16, elites=4, iterations=1, horizon=2)  # a short rollout keeps compilation short
    ref = CEMPlanner(model, **kw)
    fast = FastPlanner(model, **kw, backend="compile")
    start, goal = frames(1, 1), frames(1, 2)
    noise = ref.draw_noise(1)
    assert_same_plan(ref.plan(start, goal, noise), fast.plan(start, goal, noise))


# -- GPU -----------------------------------------------------------------------------------------------


def _gpu_setup(E=1, seed=0):
    dev = torch.device("cuda")
    m = make_model(seed, preset="pusht", std=0.02).to(dev)
    S = m.mcfg.image_size
    return m, frames(E, 1, S), frames(E, 2, S)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_graph_plan_matches_reference(dtype):
    """Default config (preset pusht: 300 samples, 30 elites, 30 iterations), CUDA graph + Triton."""
    m, start, goal = _gpu_setup(E=2)
    ref = CEMPlanner.from_config(m)
    fast = FastPlanner.from_config(m, dtype=dtype)
    assert fast.backend == "triton" and fast.use_graph
    noise = ref.draw_noise(2)
    r = ref.plan(start, goal, noise)
    f = fast.plan(start, goal, noise)
    f2 = fast.plan(start, goal, noise)  # replay: identical
    assert torch.equal(f.actions, f2.actions)
    # compare through the reference model's own cost of each plan
    from lewm.plan.cem import terminal_cost
    with torch.no_grad():
        z0, zg = m.encode(start.cuda()), m.encode(goal.cuda())
        c_ref = terminal_cost(m, z0, zg, r.actions[:, None])[:, 0]
        c_fast = terminal_cost(m, z0, zg, f.actions[:, None])[:, 0]
    rel = 1e-3 if dtype == torch.float32 else 2e-2
    assert ((c_fast - c_ref) / c_ref).max() <= rel, (c_fast, c_ref)
    if dtype == torch.float32:
        # few iterations: no near-tie can have flipped yet, the plans agree closely
        kw = dict(iterations=3)
        r3 = CEMPlanner.from_config(m, **kw).plan(start, goal, noise[:3])
        f3 = FastPlanner.from_config(m, **kw).plan(start, goal, noise[:3])
        torch.testing.assert_close(f3.actions, r3.actions, atol=1e-3, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "compile"])
def test_gpu_other_backends_in_graph(backend):
    m, start, goal = _gpu_setup()
    kw = dict(iterations=3)
    ref = CEMPlanner.from_config(m, **kw)
    fast = FastPlanner.from_config(m, backend=backend, **kw)
    assert fast.use_graph
    noise = ref.draw_noise(1)
    torch.testing.assert_close(fast.plan(start, goal, noise).actions, ref.plan(start, goal, noise).actions,
                               atol=1e-3, rtol=0)


@pytest.mark.gpu
def test_gpu_timing_smoke():
    """One plan (1 env) and 50 envs at the default config: the fast planner beats the reference and
    prints its times (the benchmark proper: python bench/planning_latency.py --device cuda)."""
    m, start, goal = _gpu_setup(E=1)
    ref = CEMPlanner.from_config(m)
    fast = FastPlanner.from_config(m)
    noise = ref.draw_noise(1)
    fast.plan(start, goal, noise)  # capture

    def t(fn, n=5):
        ts = []
        for _ in range(n):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[n // 2]

    t_fast = t(lambda: fast.plan(start, goal, noise))
    t_ref = t(lambda: ref.plan(start, goal, noise), n=2)
    print(f"\n{torch.cuda.get_device_name()}: one plan: reference {t_ref * 1e3:.1f} ms, fast {t_fast * 1e3:.2f} ms, "
          f"ratio {t_ref / t_fast:.0f}x")
    assert t_fast < t_ref
    S = m.mcfg.image_size
    s50, g50 = frames(50, 3, S), frames(50, 4, S)
    n50 = fast.draw_noise(50)
    fast.plan(s50, g50, n50)
    t50 = t(lambda: fast.plan(s50, g50, n50), n=3)
    print(f"50 envs: {t50 * 1e3:.1f} ms, {t50 / 50 * 1e3:.2f} ms per env")
