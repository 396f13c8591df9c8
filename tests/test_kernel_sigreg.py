"""The fused SIGReg kernel (lewm_kernels.sigreg) against its eager reference.

On a CPU machine the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before any import). Shapes are small and awkward on purpose: T = 1, odd and tiny B, non-power-of-two
M and D, K = 17 (the default) and others, so that every tile mask is exercised; each case is a handful
of programs (~20-40 ms each in the interpreter).

Tolerances (fp32): errors are measured against the largest magnitude of the reference tensor,
max|kernel - ref| <= RTOL * max|ref| + ATOL. The sums are over at most 33 samples and the gradients
over at most T*B*K ~ 2000 terms, each O(1) and computed in fp32: 1e-5 relative is 25-100x the observed
error, and far below what a wrong mask, index or range reduction gives (>= 1e-3).

The @pytest.mark.gpu tests (skipped without CUDA) compare the kernel and eager PyTorch in the same
input dtype against a float64 reference (the flash-attention rule: kernel error <= 2x eager error +
small atol), and check the target size for accuracy, memory and time.
"""

import pytest
import torch

from lewm_kernels import sigreg as ks
from lewm_kernels.sigreg import (SIGRegFused, ecf_sums_reference, fused_ecf_sums,
                                 knots_and_weights, statistic_from_sums)

RTOL, ATOL = 1e-5, 1e-5

# Tests that run the kernels on CPU tensors (the Triton interpreter): skipped on a CUDA machine.
interp = pytest.mark.interp


def _max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


def assert_close_scaled(x, ref, rtol=RTOL, atol=ATOL, what=""):
    assert x.shape == ref.shape, f"{what}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
    err, scale = _max_err(x, ref), ref.double().abs().max().item()
    assert err <= rtol * scale + atol, f"{what}: max error {err:.3g} (scale {scale:.3g})"


def _inputs(T, B, D, M, K, dtype=torch.float32, a_dtype=None, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(T, B, D, generator=g).to(device=device, dtype=dtype)
    a = torch.randn(D, M, generator=g)
    a = (a / a.norm(dim=0, keepdim=True)).to(device=device, dtype=a_dtype or dtype)
    t, _, _ = knots_and_weights(K, 3.0, device=device)
    return z, a, t


def _upstream(T, M, K, device="cpu", seed=1):
    """Random dL/dcos_sum, dL/dsin_sum, so that every (t, m, k) entry of the backward is checked."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, M, K, generator=g).to(device), torch.randn(T, M, K, generator=g).to(device))


def _grads(fn, z, a, t, gc, gs):
    z = z.detach().clone().requires_grad_()
    a = a.detach().clone().requires_grad_()
    c, s = fn(z, a, t)
    ((c * gc).sum() + (s * gs).sum()).backward()
    return c.detach(), s.detach(), z.grad, a.grad


# (T, B, D, M, K): T = 1, B in {1, 3, 5, 17, 33}, D in {16, 24, 32, 48}, M in {16, 24, 40, 100}, K in {2, 7, 17}
SHAPES = [
    (1, 3, 16, 24, 17),
    (2, 17, 24, 40, 17),
    (1, 33, 48, 100, 17),
    (3, 5, 32, 16, 7),
    (2, 1, 16, 24, 2),
]


@interp
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T%dB%dD%dM%dK%d" % s)
def test_forward_and_gradients_match_reference(shape):
    T, B, D, M, K = shape
    z, a, t = _inputs(*shape)
    gc, gs = _upstream(T, M, K)
    c, s, dz, da = _grads(fused_ecf_sums, z, a, t, gc, gs)
    c_ref, s_ref, dz_ref, da_ref = _grads(ecf_sums_reference, z, a, t, gc, gs)
    assert c.dtype == s.dtype == torch.float32 and c.shape == (T, M, K)
    assert_close_scaled(c, c_ref, what="cos_sum")
    assert_close_scaled(s, s_ref, what="sin_sum")
    assert dz.dtype == z.dtype and da.dtype == a.dtype
    assert_close_scaled(dz, dz_ref, what="dz")
    assert_close_scaled(da, da_ref, what="d_directions")


@interp
@pytest.mark.parametrize("shape", [(1, 9, 16, 24, 17), (2, 17, 32, 40, 7)],
                         ids=lambda s: "T%dB%dD%dM%dK%d" % s)
def test_range_reduced_path(shape):
    """fast_trig=True: the angles are first reduced to [-pi, pi] (on the GPU the hardware sin/cos
    approximations follow; the interpreter keeps tl.cos/tl.sin, so this checks the reduction).
    z is scaled by 8 so that t_k * h reaches ~100 (many turns of 2*pi)."""
    T, B, D, M, K = shape
    z, a, t = _inputs(*shape)
    z = z * 8
    gc, gs = _upstream(T, M, K)
    fused = lambda z_, a_, t_: fused_ecf_sums(z_, a_, t_, fast_trig=True)
    for got, ref, name in zip(_grads(fused, z, a, t, gc, gs),
                              _grads(ecf_sums_reference, z, a, t, gc, gs), ("cos", "sin", "dz", "dA")):
        # angles ~100 carry ~4e-6 rounding in fp32 whichever way cos is taken: 1e-5 * B-scaled sums
        assert_close_scaled(got, ref, rtol=5e-5, what=name)


def test_reference_matches_lewm_reference():
    """The duplicated oracle (kernels cannot import lewm) is the same maths as lewm.sigreg's."""
    from lewm.sigreg import ecf_sums, knots_and_weights as lewm_knots
    z, a, t = _inputs(2, 9, 24, 40, 17)
    for x, y in zip(ecf_sums_reference(z, a, t), ecf_sums(z, a, t)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    for x, y in zip(knots_and_weights(17, 3.0), lewm_knots(17, 3.0)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@interp
def test_only_one_output_used_and_partial_requires_grad():
    """Autograd hands a zero gradient for the unused output; only z needs a gradient here."""
    z, a, t = _inputs(1, 7, 16, 24, 17)
    z1 = z.clone().requires_grad_()
    fused_ecf_sums(z1, a, t)[1].sum().backward()
    z2 = z.clone().requires_grad_()
    ecf_sums_reference(z2, a, t)[1].sum().backward()
    assert_close_scaled(z1.grad, z2.grad, what="dz (sin only)")
    # directions only, through an expanded (stride-0) upstream gradient from .sum()
    a1 = a.clone().requires_grad_()
    fused_ecf_sums(z, a1, t)[0].sum().backward()
    a2 = a.clone().requires_grad_()
    ecf_sums_reference(z, a2, t)[0].sum().backward()
    assert_close_scaled(a1.grad, a2.grad, what="dA (cos only)")


@interp
def test_gradcheck_float64():
    """The kernels run in fp64 when an input is fp64 (tl.dot and cos/sin in fp64), so torch's
    gradcheck applies. fast_mode (random projections of the Jacobian) keeps it to ~1 s here."""
    z, a, t = _inputs(2, 5, 16, 24, 3, dtype=torch.float64)
    t = t.double()
    z.requires_grad_()
    a.requires_grad_()
    c, _ = fused_ecf_sums(z, a, t)
    assert c.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda z, a: fused_ecf_sums(z, a, t), (z, a), fast_mode=True)


@interp
def test_float32_finite_differences():
    """A direct finite-difference check in fp32 (loose: fp32 differences of sums of ~B terms)."""
    z, a, t = _inputs(1, 5, 16, 16, 5)
    w = torch.randn(1, 16, 5, generator=torch.Generator().manual_seed(3))

    def loss(z_, a_):
        c, s = fused_ecf_sums(z_, a_, t)
        return ((c * w).sum() + (s * w.flip(-1)).sum()).double()

    zg = z.clone().requires_grad_()
    ag = a.clone().requires_grad_()
    loss(zg, ag).backward()
    eps = 1e-2
    for x, grad, idx in ((z, zg.grad, (0, 2, 3)), (a, ag.grad, (5, 7)), (a, ag.grad, (0, 15))):
        xp, xm = x.clone(), x.clone()
        xp[idx] += eps
        xm[idx] -= eps
        args_p = (xp, a) if x is z else (z, xp)
        args_m = (xm, a) if x is z else (z, xm)
        fd = (loss(*args_p) - loss(*args_m)).item() / (2 * eps)
        assert abs(fd - grad[idx].item()) <= 1e-2 * max(1.0, abs(fd)), (idx, fd, grad[idx].item())


@pytest.mark.parametrize("dtype,a_dtype", [(torch.float16, torch.float16),
                                           (torch.bfloat16, torch.bfloat16),
                                           (torch.bfloat16, torch.float32),
                                           (torch.float32, torch.float64)],
                         ids=["fp16", "bf16", "bf16-z-fp32-A", "fp32-z-fp64-A"])
@interp
def test_input_dtypes(dtype, a_dtype):
    """16-bit and mixed inputs: same quantised values as the reference, fp32 maths, fp32 sums (the
    compute dtype follows z, as in lewm); gradients come back in the input dtypes. (fp16 runs tl.dot
    in fp16 with fp32 accumulation; the interpreter's bf16 dot is broken, so bf16 is upcast here: the
    GPU tests cover the native bf16 dot.)"""
    T, B, D, M, K = 2, 7, 24, 40, 17
    z, a, t = _inputs(T, B, D, M, K, dtype=dtype, a_dtype=a_dtype)
    gc, gs = _upstream(T, M, K)
    c, s, dz, da = _grads(fused_ecf_sums, z, a, t, gc, gs)
    c_ref, s_ref, dz_ref, da_ref = _grads(ecf_sums_reference, z, a, t, gc, gs)
    assert c.dtype == torch.float32 and dz.dtype == dtype and da.dtype == a_dtype
    assert_close_scaled(c, c_ref, what="cos_sum")
    assert_close_scaled(s, s_ref, what="sin_sum")
    # both gradients are fp32 results rounded to the 16-bit dtype: allow one rounding step
    rtol = 1e-2 if dtype != torch.float32 else RTOL
    assert_close_scaled(dz, dz_ref, rtol=rtol, what="dz")
    assert_close_scaled(da, da_ref, rtol=1e-2 if a_dtype != torch.float32 else RTOL, what="dA")


@interp
def test_strided_inputs():
    """(T, B, D) views of (B, T, D) embeddings (what lewm.sigreg passes) and transposed directions."""
    zb = torch.randn(9, 2, 24, generator=torch.Generator().manual_seed(4))
    z = zb.transpose(0, 1)  # (T=2, B=9, D=24), not contiguous
    a = torch.randn(40, 24, generator=torch.Generator().manual_seed(5)).t()  # (D, M), column-major
    a = a / a.norm(dim=0, keepdim=True)
    t, _, _ = knots_and_weights(17)
    gc, gs = _upstream(2, 40, 17)
    for got, ref, name in zip(_grads(fused_ecf_sums, z, a, t, gc, gs),
                              _grads(ecf_sums_reference, z, a, t, gc, gs), ("cos", "sin", "dz", "dA")):
        assert_close_scaled(got, ref, what=name)
    # a non-unit innermost stride is copied, not mis-read
    z_odd = torch.randn(2, 9, 48)[:, :, ::2]
    assert_close_scaled(fused_ecf_sums(z_odd, a, t)[0], ecf_sums_reference(z_odd, a, t)[0])


@interp
def test_sigreg_statistic_triton_equals_eager():
    """The full statistic through lewm (sigreg_tbd and the public (B, T, D) sigreg), and the
    SIGRegFused module, equal the eager path, value and gradients."""
    from lewm.sigreg import draw_directions, sigreg, sigreg_tbd
    T, B, D, M = 2, 17, 24, 40
    z = torch.randn(T, B, D, generator=torch.Generator().manual_seed(6))
    a = draw_directions(D, M, seed=7)
    grads = {}
    for impl in ("eager", "triton"):
        zz = z.clone().requires_grad_()
        val = sigreg_tbd(zz, a, knots=17, t_max=3.0, impl=impl)
        val.backward()
        grads[impl] = (val.detach(), zz.grad)
    assert grads["triton"][0].dtype == torch.float32 and grads["triton"][0].dim() == 0
    torch.testing.assert_close(grads["triton"][0], grads["eager"][0], rtol=1e-5, atol=1e-6)
    assert_close_scaled(grads["triton"][1], grads["eager"][1], what="d statistic / dz")

    zb = z.transpose(0, 1)  # (B, T, D)
    torch.testing.assert_close(sigreg(zb, a, impl="triton"), sigreg(zb, a, impl="eager"),
                               rtol=1e-5, atol=1e-6)
    mod = SIGRegFused(knots=17, t_max=3.0)
    assert "knots=17" in repr(mod) and len(mod.state_dict()) == 0 and not mod.fast_trig
    torch.testing.assert_close(mod(z, a), grads["eager"][0], rtol=1e-5, atol=1e-6)
    # statistic_from_sums is the same formula as lewm's
    t, w, phi = knots_and_weights(17, 3.0)
    c, s = ecf_sums_reference(z, a, t)
    torch.testing.assert_close(statistic_from_sums(c, s, B, w, phi), grads["eager"][0])


def test_bad_inputs_raise_clear_errors(monkeypatch):
    z, a, t = _inputs(1, 4, 16, 16, 5)
    with pytest.raises(ValueError, match=r"z must be \(T, B, D\)"):
        fused_ecf_sums(z[0], a, t)
    with pytest.raises(ValueError, match=r"directions must be \(D=16, M\)"):
        fused_ecf_sums(z, a[:8], t)
    with pytest.raises(ValueError, match=r"directions must be"):
        fused_ecf_sums(z, a[:, 0], t)
    with pytest.raises(ValueError, match=r"knots t must be 1-D"):
        fused_ecf_sums(z, a, t[None])
    with pytest.raises(TypeError, match=r"z must be float16, bfloat16, float32 or float64"):
        fused_ecf_sums(z.to(torch.int32), a, t)
    with pytest.raises(TypeError, match=r"directions must be"):
        fused_ecf_sums(z, a.to(torch.int64), t)
    with pytest.raises(TypeError, match=r"t must be"):
        fused_ecf_sums(z, a, torch.arange(5))
    with pytest.raises(TypeError, match=r"must be a torch.Tensor"):
        fused_ecf_sums(z.numpy(), a, t)
    with pytest.raises(ValueError, match=r"empty input"):
        fused_ecf_sums(z[:, :0], a, t)
    with pytest.raises(ValueError, match=r"at most"):
        fused_ecf_sums(z, a, torch.zeros(ks._MAX_KNOTS + 1))
    with pytest.raises(ValueError, match=r"one device"):
        fused_ecf_sums(z, a.to("meta"), t)
    with pytest.raises(ValueError, match=r"unsupported device meta"):
        fused_ecf_sums(z.to("meta"), a.to("meta"), t.to("meta"))
    # CPU tensors without the interpreter: point the user at the eager path
    monkeypatch.setattr(ks, "_INTERPRETED", False)
    with pytest.raises(ValueError, match=r"needs a CUDA device.*impl='eager'"):
        fused_ecf_sums(z, a, t)


@pytest.mark.parametrize("interpreted", [True, False])
def test_block_sizes_respect_dot_minimum(interpreted):
    for T, B, D, M, K in [(1, 1, 16, 1, 2), (4, 128, 192, 1024, 17), (1, 3, 24, 100, 200), (7, 1000, 20, 5, 1)]:
        cfg = ks._block_sizes(T, B, D, M, K, interpreted)
        for part in ("fwd", "bwd"):
            ks._check_dot_dims(cfg[part])
            assert all(v & (v - 1) == 0 for v in cfg[part].values())  # powers of two (tl.arange)
        assert cfg["fwd"]["BLOCK_K"] >= K


# ----------------------------------------------------------------------------------------------------
# B split across programs (deterministic partial sums), cached knots, the angle recurrence
# ----------------------------------------------------------------------------------------------------


def _small_b_blocks(monkeypatch, block_b=16, block_m=64):
    """Force the GPU-style B split in the interpreter: BLOCK_B = 16, so B = 33 gives three B blocks
    (pass 1 writes partials, pass 2 reduces them)."""
    real = ks._block_sizes

    def sizes(T, B, D, M, K, interpreted, itemsize=4):
        cfg = real(T, B, D, M, K, interpreted, itemsize)
        for part in ("fwd", "bwd"):
            cfg[part] = dict(cfg[part], BLOCK_B=block_b, BLOCK_M=min(cfg[part]["BLOCK_M"], block_m))
        return cfg
    monkeypatch.setattr(ks, "_block_sizes", sizes)


@interp
@pytest.mark.parametrize("shape", [(2, 33, 24, 40, 17), (1, 17, 16, 24, 5), (1, 32, 16, 16, 17)],
                         ids=lambda s: "T%dB%dD%dM%dK%d" % s)
def test_b_split_matches_reference_and_is_deterministic(shape, monkeypatch):
    """Several B blocks (odd B: a partial last block; B a multiple of the block: none), the fixed-order
    reduction of the partials, and two runs bitwise equal (outputs and both gradients)."""
    _small_b_blocks(monkeypatch)
    T, B, D, M, K = shape
    z, a, t = _inputs(*shape)
    gc, gs = _upstream(T, M, K)
    from lewm_kernels import _utils
    runs = []
    for _ in range(2):
        # recording while running: the launches are checked, and the GPU's tile sizes are used
        with _utils.record_launches(execute=True) as rec:
            runs.append(_grads(fused_ecf_sums, z, a, t, gc, gs))
        names = [r.name for r in rec]
        assert names == ["_ecf_sums_fwd_kernel", "_ecf_sums_reduce_kernel", "_ecf_sums_bwd_kernel"], names
        assert rec[0].grid[1] == -(-B // 16) > 1
    run1, run2 = runs
    ref = _grads(ecf_sums_reference, z, a, t, gc, gs)
    for x1, x2, r, name in zip(run1, run2, ref, ("cos", "sin", "dz", "dA")):
        assert torch.equal(x1, x2), f"{name}: two runs differ"
        assert_close_scaled(x1, r, what=name)


def test_launches_recorded_on_meta_tensors_at_the_target_size():
    """The wrapper walked on meta tensors while recording (no device checks, nothing runs): the
    launches of one forward + backward at the target size, GPU tiles, costs attached, and a grid that
    fills a 132-SM GPU several times."""
    from lewm_kernels import _utils
    T, B, D, M, K = 4, 128, 192, 1024, 17
    with _utils.record_launches(execute=False) as rec:
        z = torch.empty(T, B, D, device="meta").requires_grad_()
        a = torch.empty(D, M, device="meta").requires_grad_()
        t, w, phi = knots_and_weights(K, device="meta")
        c, s = fused_ecf_sums(z, a, t)
        statistic_from_sums(c, s, B, w, phi).backward()
    assert [r.name for r in rec] == ["_ecf_sums_fwd_kernel", "_ecf_sums_reduce_kernel", "_ecf_sums_bwd_kernel"]
    fwd, red, bwd = rec
    assert fwd.meta["RECUR"] and fwd.meta["POLY"] and not fwd.meta["FAST_TRIG"]
    assert fwd.ctas >= 3 * 132 and bwd.ctas >= 3 * 132, (fwd.grid, bwd.grid)
    for r in rec:
        assert set(r.cost) >= {"flops", "hbm_bytes", "l2_bytes"} and r.cost["hbm_bytes"] > 0
    # the forward's workspace is a few % of one (T, B, M, K) fp32 tensor
    assert 2 * fwd.grid[1] * T * K * M * 4 < 0.1 * T * B * M * K * 4


def test_knots_are_cached_per_device_dtype_and_count():
    t1, w1, p1 = knots_and_weights(17, 3.0)
    t2, w2, p2 = knots_and_weights(17, 3.0, device="cpu", dtype=torch.float32)
    assert t1 is t2 and w1 is w2 and p1 is p2
    fresh = ks.build_knots(17, 3.0, torch.device("cpu"), torch.float32)
    for x, y in zip((t1, w1, p1), fresh):
        assert torch.equal(x, y)
    t64, _, _ = knots_and_weights(17, 3.0, dtype=torch.float64)
    assert t64 is not t1 and t64.dtype == torch.float64
    assert knots_and_weights(9, 3.0)[0] is not t1 and knots_and_weights(17, 2.0)[0] is not t1
    from lewm.sigreg import knots_and_weights as lewm_knots
    for x, y in zip(knots_and_weights(17, 3.0), lewm_knots(17, 3.0)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    # knots first built under inference_mode still serve autograd later
    with torch.inference_mode():
        t_inf, w_inf, _ = knots_and_weights(13, 2.5)
    assert not t_inf.is_inference()
    x = torch.ones(13, requires_grad=True)
    (x * w_inf).sum().backward()


def test_equally_spaced_knots_are_recognised():
    t, _, _ = knots_and_weights(11, 3.0)
    assert ks._uniform_from_zero(t)
    assert ks._uniform_from_zero(torch.linspace(0, 2.0, 7))  # CPU: checked by value
    assert not ks._uniform_from_zero(torch.tensor([0.0, 0.5, 1.5]))
    assert not ks._uniform_from_zero(torch.tensor([0.5, 1.0, 1.5]))  # not from zero
    assert not ks._uniform_from_zero(torch.tensor([0.0]))
    # an in-place change of a cached tensor costs it the fast path (version counter)
    t_mod, _, _ = knots_and_weights(5, 1.25)
    t_mod.add_(0.0)
    assert ks._UNIFORM_KNOTS[id(t_mod)][1] != t_mod._version
    t_mod[2] = 0.7
    assert not ks._uniform_from_zero(t_mod)


@interp
def test_general_knots_path():
    """Knots that are not equally spaced from zero: one cos/sin per knot (no recurrence)."""
    z, a, _ = _inputs(2, 9, 16, 24, 5)
    t = torch.tensor([0.1, 0.4, 0.45, 1.7, 2.9])
    assert not ks._uniform_from_zero(t)
    gc, gs = _upstream(2, 24, 5)
    for got, ref, name in zip(_grads(fused_ecf_sums, z, a, t, gc, gs),
                              _grads(ecf_sums_reference, z, a, t, gc, gs), ("cos", "sin", "dz", "dA")):
        assert_close_scaled(got, ref, what=name)


@interp
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on the NaN / inf inputs
def test_sincos_poly_accuracy():
    """The fp32 sincos (Cody-Waite + polynomials) against float64 cos / sin of the same fp32 inputs:
    about one ulp of 1 over SIGReg's range and far beyond (where the reduction stays exact)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _k(X, C, S, N, BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = o < N
        c, s = ks._sincos_poly(tl.load(X + o, mask=m))
        tl.store(C + o, c, mask=m)
        tl.store(S + o, s, mask=m)

    x = torch.cat([torch.linspace(-4, 4, 20001), torch.linspace(-300, 300, 20001),
                   torch.linspace(-12000, 12000, 20001), torch.tensor([0.0, -0.0, 1e-30])])
    c, s = torch.empty_like(x), torch.empty_like(x)
    _k[(triton.cdiv(x.numel(), 16384),)](x, c, s, x.numel(), BLOCK=16384)
    xd = x.double()
    assert (c.double() - xd.cos()).abs().max().item() < 1.5e-7
    assert (s.double() - xd.sin()).abs().max().item() < 1.5e-7
    assert torch.isnan(torch.stack(_k_nan(_k))).all()


def _k_nan(kernel):
    x = torch.tensor([float("nan"), float("inf"), -float("inf")])
    c, s = torch.empty_like(x), torch.empty_like(x)
    kernel[(1,)](x, c, s, 3, BLOCK=16)
    return c, s


@interp
def test_angle_recurrence_accuracy_vs_float64():
    """The recurrence against a float64 reference from the same fp32 inputs, at the knot where its
    error is largest (the last), on SIGReg-like angles (h ~ N(0, 1) scaled up to 3, so t_k h reaches
    tens of radians): the kernel's error is within twice eager fp32's, plus 1e-6 of the sums' scale
    (the GPU tests' rule)."""
    T, B, D, M, K = 1, 64, 32, 64, 17
    z, a, t = _inputs(T, B, D, M, K)
    z = z * 3.0
    fused = fused_ecf_sums(z, a, t)
    eager = ecf_sums_reference(z, a, t)
    ref = ecf_sums_reference(z.double(), a.double(), t.double())
    for k_, e_, r_, name in zip(fused, eager, ref, ("cos", "sin")):
        err_k = (k_.double() - r_).abs()[..., -1].max().item()
        err_e = (e_.double() - r_).abs()[..., -1].max().item()
        assert err_k <= 2 * err_e + 1e-6 * r_.abs().max().item(), (name, err_k, err_e)


# ----------------------------------------------------------------------------------------------------
# sm_90 builds without a GPU: every specialisation of one step, 0 spills, tensor-core MMA for bf16
# ----------------------------------------------------------------------------------------------------


def _sigreg_model():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "bench" / "sigreg_model.py"
    spec = importlib.util.spec_from_file_location("sigreg_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _check_sm90_rows(sm, rows):
    by = {}
    for r in rows:
        for v in r["variant"].split(","):
            by.setdefault(v, {})[r["kernel"]] = r
    report = "\n" + sm.format_rows(rows)
    for v in sm.VARIANTS:
        assert set(by[v]) == {"_ecf_sums_fwd_kernel", "_ecf_sums_reduce_kernel", "_ecf_sums_bwd_kernel"}, report
    for v in sm.NO_SPILL_VARIANTS:
        for r in by[v].values():
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack"] == 0, report
            assert r["local"] == 0 and 0 < r["regs"] <= 255, report
    for r in by["fp64"].values():  # the gradcheck path: no spills (libdevice's fp64 cos keeps a stack)
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, report
    for name in ("_ecf_sums_fwd_kernel", "_ecf_sums_bwd_kernel"):
        assert any(m in by["bf16"][name]["mma"] for m in ("HMMA", "HGMMA")), report
        assert by["fp64"][name]["mma"] == "DMMA" or by["fp64"][name]["dfma"] > 0, report
        assert by["fp32"][name]["mufu"] == 0, report  # no libdevice sin/cos left
        assert by["fp32-fast_trig"][name]["mufu"] > 0, report


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter does not check what the compiler does (constexpr-only globals, operand dtypes
    of tl.dot, tile-size minimums, register pressure): compile every kernel specialisation that one
    forward + backward launches (recorded through the real wrapper on meta tensors, for fp32, bf16 z
    with fp32 directions, bf16, fast_trig and fp64) for sm_90, in a process without TRITON_INTERPRET,
    with the installed triton; no spills anywhere, no local memory at all but in the fp64 (gradcheck)
    kernels, tensor-core MMA for bf16, no libdevice sin/cos in the fp32 default."""
    import sys
    pytest.importorskip("triton.backends.nvidia")
    sm = _sigreg_model()
    if not sm.have_ptxas():
        pytest.skip("this triton wheel ships no ptxas / cuobjdump")
    _check_sm90_rows(sm, sm.compile_with(sys.executable, sm.step_specs()))


def test_kernels_compile_for_sm90_with_another_triton():
    """The same with another triton (the GPU machines' 3.6) installed in its own interpreter, named by
    LEWM_EXTRA_TRITON_PYTHON (e.g. a venv with `pip install triton==3.6.0 numpy`; no torch needed)."""
    import os
    py = os.environ.get("LEWM_EXTRA_TRITON_PYTHON")
    if not py or not os.path.exists(py):
        pytest.skip("set LEWM_EXTRA_TRITON_PYTHON to an interpreter with another triton")
    sm = _sigreg_model()
    _check_sm90_rows(sm, sm.compile_with(py, sm.step_specs()))

# ----------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA): accuracy against float64 in the input dtype, and the target size
# ----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,a_dtype", [(torch.float32, torch.float32),
                                           (torch.bfloat16, torch.float32),
                                           (torch.bfloat16, torch.bfloat16)],
                         ids=["fp32", "bf16-z-fp32-A", "bf16"])
@pytest.mark.parametrize("shape", [(1, 33, 48, 100, 17), (4, 128, 192, 1024, 17)],
                         ids=["awkward", "target"])
@pytest.mark.parametrize("fast_trig", [False, True], ids=["default", "fast-trig"])
def test_cuda_accuracy_vs_float64(shape, dtype, a_dtype, fast_trig):
    """Flash-attention rule: the kernel's error against float64 (computed from the same quantised
    inputs) is at most twice eager PyTorch's in the same dtype, plus a small atol: 1e-6 of the
    tensor's scale for the default path, 1e-5 with fast_trig (the hardware approximations add up to
    ~1e-6 absolute per term, summed over B terms or 17 knots x 1024 directions)."""
    T, B, D, M, K = shape
    z, a, t = _inputs(*shape, dtype=dtype, a_dtype=a_dtype, device="cuda")
    gc, gs = _upstream(T, M, K, device="cuda")
    kern = _grads(lambda z_, a_, t_: fused_ecf_sums(z_, a_, t_, fast_trig=fast_trig), z, a, t, gc, gs)
    eager = _grads(ecf_sums_reference, z, a, t, gc, gs)
    ref = _grads(ecf_sums_reference, z.double(), a.double(), t.double(), gc.double(), gs.double())
    report = []
    for name, k, e, r in zip(("cos", "sin", "dz", "dA"), kern, eager, ref):
        assert k.dtype == e.dtype, name
        err_k, err_e = _max_err(k, r), _max_err(e, r)
        atol = (1e-5 if fast_trig else 1e-6) * r.abs().max().item()
        report.append(f"{name}: kernel {err_k:.3g} eager {err_e:.3g} atol {atol:.3g}")
        assert err_k <= 2 * err_e + atol, "; ".join(report)
    print("\n[sigreg accuracy]", shape, dtype, a_dtype, "fast" if fast_trig else "", "; ".join(report))


@pytest.mark.gpu
def test_cuda_gradcheck_float64():
    z, a, t = _inputs(2, 5, 16, 24, 3, dtype=torch.float64, device="cuda")
    z.requires_grad_()
    a.requires_grad_()
    assert torch.autograd.gradcheck(lambda z, a: fused_ecf_sums(z, a, t.double()), (z, a),
                                    fast_mode=True)


def _time_ms(fn, iters=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


@pytest.mark.gpu
def test_cuda_deterministic_at_target_size():
    """B split across CTAs with fixed-order partial sums: two runs are bitwise equal on the GPU."""
    T, B, D, M, K = 4, 128, 192, 1024, 17
    z, a, t = _inputs(T, B, D, M, K, device="cuda")
    gc, gs = _upstream(T, M, K, device="cuda")
    r1 = _grads(fused_ecf_sums, z, a, t, gc, gs)
    r2 = _grads(fused_ecf_sums, z, a, t, gc, gs)
    for x1, x2, name in zip(r1, r2, ("cos", "sin", "dz", "dA")):
        assert torch.equal(x1, x2), name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_target_size_memory_and_speed(dtype):
    """T=4, B=128, D=192, M=1024, K=17: the fused forward + backward allocates under 5 % of what eager
    allocates beyond the shared inputs and outputs (eager builds several (T, B, M, K) tensors), and is
    at least 5x faster than eager, called eagerly (issue 10's targets; the modelled figures are in
    profiles/sigreg_model.csv)."""
    T, B, D, M, K = 4, 128, 192, 1024, 17
    z, a, t = _inputs(T, B, D, M, K, dtype=dtype, a_dtype=torch.float32, device="cuda")
    z.requires_grad_()
    a.requires_grad_()
    gc, gs = _upstream(T, M, K, device="cuda")

    def step(fn):
        c, s = fn(z, a, t)
        torch.autograd.grad((c * gc).sum() + (s * gs).sum(), (z, a))

    def extra_bytes(fn):
        step(fn)  # compile / warm the allocator
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fn)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    extra = extra_bytes(fused_ecf_sums)
    eager_extra = extra_bytes(ecf_sums_reference)
    big = T * B * M * K * 4
    assert extra < big / 4, f"fused fwd+bwd allocated {extra / 2**20:.1f} MiB (eager tensor {big / 2**20:.1f} MiB)"

    fast = lambda z_, a_, t_: fused_ecf_sums(z_, a_, t_, fast_trig=True)
    fused_ms = _time_ms(lambda: step(fused_ecf_sums))
    fast_ms = _time_ms(lambda: step(fast))
    eager_ms = _time_ms(lambda: step(ecf_sums_reference))
    fwd_ms = _time_ms(lambda: fused_ecf_sums(z.detach(), a.detach(), t))
    fast_fwd_ms = _time_ms(lambda: fast(z.detach(), a.detach(), t))
    eager_fwd_ms = _time_ms(lambda: ecf_sums_reference(z.detach(), a.detach(), t))
    print(f"\n[sigreg {dtype} {torch.cuda.get_device_name()}] fwd: fused {fwd_ms * 1e3:.1f} us, "
          f"fast_trig {fast_fwd_ms * 1e3:.1f} us, eager {eager_fwd_ms * 1e3:.1f} us; fwd+bwd: fused "
          f"{fused_ms * 1e3:.1f} us, fast_trig {fast_ms * 1e3:.1f} us, eager {eager_ms * 1e3:.1f} us "
          f"(ratio {eager_ms / fused_ms:.1f}x); extra memory {extra / 2**20:.2f} MiB, eager "
          f"{eager_extra / 2**20:.1f} MiB")
    assert fused_ms <= 1.5 * eager_ms, f"fused {fused_ms:.3f} ms slower than eager {eager_ms:.3f} ms"
    assert extra < 0.05 * eager_extra, f"fused {extra / 2**20:.2f} MiB vs eager {eager_extra / 2**20:.1f} MiB"
    assert eager_ms >= 5 * fused_ms, f"fused {fused_ms * 1e3:.1f} us vs eager {eager_ms * 1e3:.1f} us"
