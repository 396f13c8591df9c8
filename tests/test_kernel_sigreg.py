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


_AOT_SCRIPT = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import lewm_kernels.sigreg as ks
assert not ks._INTERPRETED
cfg = ks._block_sizes(4, 128, 192, 1024, 17, False)
for zdt, ieee, fast in [("fp32", True, False), ("bf16", False, False), ("fp32", True, True)]:
    common = dict(IEEE=ieee, REDUCE=fast, FAST_TRIG=fast, COMPUTE_DTYPE=tl.float32)
    for kern, ptrs, blocks in [
        (ks._ecf_sums_fwd_kernel, ("Z", "A", "KNOTS", "COS_OUT", "SIN_OUT"), cfg["fwd"]),
        (ks._ecf_sums_bwd_kernel, ("Z", "A", "KNOTS", "GRAD_COS", "GRAD_SIN", "DH"), cfg["bwd"]),
    ]:
        consts = dict(blocks, **common)
        sig = {n: ("*" + (zdt if n in ("Z", "A") else "fp32")) if n in ptrs
               else ("constexpr" if n in consts else "i32") for n in kern.arg_names}
        k = triton.compile(ASTSource(kern, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": cfg["num_warps"]})
        assert ("cos.approx" in k.asm["ptx"]) == fast
print("compiled")
"""


def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    """The interpreter does not check what the compiler does (constexpr-only globals, operand dtypes
    of tl.dot, tile-size minimums): compile both kernels for sm_90 (Hopper) ahead of time, in a
    process without TRITON_INTERPRET, for the fp32, bf16 and fast_trig variants at the target size."""
    import os
    import subprocess
    import sys
    pytest.importorskip("triton.backends.nvidia")
    script = tmp_path / "aot.py"
    script.write_text(_AOT_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]


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
@pytest.mark.parametrize("fast_trig", [False, True], ids=["libdevice", "fast-trig"])
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_target_size_memory_and_speed(dtype):
    """T=4, B=128, D=192, M=1024, K=17: the fused forward + backward never allocates anything near the
    (T, B, M, K) fp32 tensor (35.7 MB) that eager builds, and is not slower than eager."""
    T, B, D, M, K = 4, 128, 192, 1024, 17
    z, a, t = _inputs(T, B, D, M, K, dtype=dtype, a_dtype=torch.float32, device="cuda")
    z.requires_grad_()
    a.requires_grad_()
    gc, gs = _upstream(T, M, K, device="cuda")

    def step(fn):
        c, s = fn(z, a, t)
        torch.autograd.grad((c * gc).sum() + (s * gs).sum(), (z, a))

    step(fused_ecf_sums)  # compile
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(fused_ecf_sums)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
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
          f"{fused_ms * 1e3:.1f} us, fast_trig {fast_ms * 1e3:.1f} us, eager {eager_ms * 1e3:.1f} us; "
          f"extra memory {extra / 2**20:.2f} MiB")
    assert fused_ms <= 1.5 * eager_ms, f"fused {fused_ms:.3f} ms slower than eager {eager_ms:.3f} ms"
