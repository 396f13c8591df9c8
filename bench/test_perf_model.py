"""Model pieces: encoder forward, predictor rollout, SIGReg forward+backward (eager vs fused Triton).

Each benchmark first checks its output against the eager reference in the same process."""
from __future__ import annotations

import pytest
import torch

import benchutil as bu

needs_cuda = bu._needs_cuda()

pytestmark = pytest.mark.benchmark(min_rounds=3, warmup=True)
CHECK_FRAMES = 16


@pytest.fixture(scope="module")
def frames(lewm_model, sizes, device):
    S = lewm_model.cfg.model.image_size
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (sizes["encode_frames"], 1, S, S, 3), dtype=torch.uint8, generator=g).to(device)


@pytest.fixture(scope="module")
def encoder_ref(lewm_model, frames):
    """The eager fp32 encoder (what the other encoder paths are checked against)."""
    with torch.no_grad():
        return lewm_model.encode(frames)


@pytest.fixture(scope="module")
def encoder_f64(lewm_model, frames):
    """The same encoder in float64 on the CPU: the independent check of the eager fp32 benchmark."""
    import copy
    m64 = copy.deepcopy(lewm_model).cpu().double()
    sub = frames[:CHECK_FRAMES].cpu()  # eval mode: frames are independent, a subset checks the path
    x = m64.encoder.preprocess(sub.reshape(-1, *sub.shape[2:]))
    with torch.no_grad():
        return m64.encoder(x.double()).reshape(sub.shape[0], sub.shape[1], -1).float()


# -- encoder ----------------------------------------------------------------------------------------------
@pytest.mark.benchmark(group="encoder forward")
def test_encoder_eager_fp32(benchmark, lewm_model, frames, encoder_f64, sizes, sync):
    """uint8 frames -> preprocess on the device -> ViT -> projector; the reference, checked against the
    same weights in float64."""
    with torch.no_grad():
        bu.check_close("encoder eager fp32 vs float64", lewm_model.encode(frames[:CHECK_FRAMES]).cpu(), encoder_f64,
                       1e-3, 1e-3)
        bu.bench_run(benchmark, lambda: lewm_model.encode(frames), sync, sizes["rounds"])
    benchmark.extra_info["frames_per_s"] = frames.shape[0] / benchmark.stats.stats.median


@needs_cuda
@pytest.mark.benchmark(group="encoder forward")
def test_encoder_bf16_autocast(benchmark, lewm_model, frames, encoder_ref, sizes, sync):
    def fn():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return lewm_model.encode(frames)
    bu.check_close("encoder bf16 autocast", fn(), encoder_ref, 5e-2, 5e-2)
    bu.bench_run(benchmark, fn, sync, sizes["rounds"])
    benchmark.extra_info["frames_per_s"] = frames.shape[0] / benchmark.stats.stats.median


# -- predictor rollout (one planning rollout of N candidates, horizon 5) -----------------------------------
@pytest.fixture(scope="module")
def rollout_inputs(lewm_model, sizes, device):
    m = lewm_model.cfg.model
    N, H = sizes["rollout_candidates"], lewm_model.cfg.plan.horizon
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(N, 1, m.embed_dim, generator=g).to(device)
    acts = torch.randn(N, H, m.action_input_dim, generator=g).to(device)
    goal = torch.randn(1, m.embed_dim, generator=g).to(device)
    with torch.no_grad():
        ref = lewm_model.rollout(z0, acts)
    return z0, acts, goal, ref


@pytest.fixture(scope="module")
def packed(lewm_model):
    from lewm.plan.engine import pack_predictor
    return pack_predictor(lewm_model)


@pytest.mark.benchmark(group="predictor rollout")
def test_rollout_reference_eager(benchmark, lewm_model, rollout_inputs, sizes, sync):
    """LeWM.rollout: the reference (whole window re-run every step, no KV cache), checked against the
    rollout from its definition (model.predict on each window)."""
    z0, acts, _, ref = rollout_inputs
    bu.check_close("rollout reference vs predict on each window", ref, bu.rollout_by_predict(lewm_model, z0, acts),
                   1e-4, 1e-5)
    bu.bench_run(benchmark, lambda: lewm_model.rollout(z0, acts), sync, sizes["rounds"])


@pytest.mark.benchmark(group="predictor rollout")
def test_rollout_kv_cache_torch(benchmark, packed, rollout_inputs, sizes, sync):
    """lewm_kernels.rollout.rollout_reference: KV cache, folded modulation (the fast planner's CPU path)."""
    from lewm_kernels.rollout import rollout_reference
    z0, acts, goal, ref = rollout_inputs
    fn = lambda: rollout_reference(packed, z0, acts, goal, check=False)[0]  # noqa: E731
    with torch.no_grad():
        bu.check_close("rollout KV cache (torch)", fn(), ref, 1e-4, 1e-4)
        bu.bench_run(benchmark, fn, sync, sizes["rounds"])


@needs_cuda
@pytest.mark.benchmark(group="predictor rollout")
def test_rollout_fused_triton(benchmark, packed, rollout_inputs, sizes, sync):
    from lewm_kernels.rollout import RolloutWorkspace, fused_rollout
    z0, acts, goal, ref = rollout_inputs
    ws = RolloutWorkspace(packed, z0.shape[0], 1, acts.shape[1])
    fn = lambda: fused_rollout(packed, z0, acts, goal, workspace=ws)[0]  # noqa: E731
    with torch.no_grad():
        bu.check_close("rollout fused triton", fn().clone(), ref, 1e-3, 1e-3)
        bu.bench_run(benchmark, fn, sync, sizes["rounds"])


# -- SIGReg forward + backward -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sigreg_inputs(sizes, device):
    from lewm.sigreg import draw_directions
    T, B, D, M = sizes["sigreg"]
    g = torch.Generator().manual_seed(2)
    z = torch.randn(T, B, D, generator=g).to(device)
    A = draw_directions(D, M, seed=3, device=device)
    return z, A


def _sigreg_fwd_bwd(z, A, impl):
    from lewm.sigreg import sigreg_tbd
    zz = z.detach().requires_grad_(True)
    loss = sigreg_tbd(zz, A, impl=impl)
    loss.backward()
    return loss.detach(), zz.grad


@pytest.fixture(scope="module")
def sigreg_ref(sigreg_inputs):
    return _sigreg_fwd_bwd(*sigreg_inputs, "eager")


@pytest.mark.benchmark(group="sigreg forward+backward")
def test_sigreg_eager(benchmark, sigreg_inputs, sigreg_ref, sizes, sync):
    """Materialises (T, B, M, K) cos and sin: the reference, checked against the float64 formula."""
    want = torch.tensor(bu.sigreg_float64(*sigreg_inputs))
    bu.check_close("sigreg eager vs float64 formula", sigreg_ref[0].cpu(), want, 1e-4, 1e-6)
    bu.bench_run(benchmark, lambda: _sigreg_fwd_bwd(*sigreg_inputs, "eager"), sync, sizes["rounds"])


@needs_cuda
@pytest.mark.benchmark(group="sigreg forward+backward")
def test_sigreg_fused_triton(benchmark, sigreg_inputs, sigreg_ref, sizes, sync):
    loss, grad = _sigreg_fwd_bwd(*sigreg_inputs, "triton")
    bu.check_close("sigreg triton value", loss, sigreg_ref[0], 1e-3, 1e-5)
    bu.check_close("sigreg triton grad", grad, sigreg_ref[1], 1e-2, 1e-6)
    bu.bench_run(benchmark, lambda: _sigreg_fwd_bwd(*sigreg_inputs, "triton"), sync, sizes["rounds"])

