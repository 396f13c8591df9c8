"""Fused SIGReg: the per-(T, M, K) empirical characteristic-function sums without (T, B, M, K).

SIGReg (see lewm/sigreg.py for the statistic) needs, for embeddings z (T, B, D), unit directions
A (D, M) and knots t (K,),

    h[t, b, m]      = sum_d z[t, b, d] * A[d, m]                     (T, B, M)
    cos_sum[t, m, k] = sum_b cos(t_k * h[t, b, m])                    (T, M, K)
    sin_sum[t, m, k] = sum_b sin(t_k * h[t, b, m])                    (T, M, K)

The eager reference builds the (T, B, M, K) tensor of angles (35 MB per intermediate at the target
size T=4, B=128, M=1024, K=17) and then reduces it. The kernels here never do:

- forward: one program per (t, block of M). It walks over B in blocks, projects the tile with
  `tl.dot` (fp32 accumulation, loop over D), and for each knot adds the column sums of cos / sin into
  a (BLOCK_M, BLOCK_K) register accumulator. Only (T, M, K) is written.
- backward: given g_cos, g_sin (T, M, K),
      dL/dh[t, b, m] = sum_k t_k * (-sin(t_k h) * g_cos[t, m, k] + cos(t_k h) * g_sin[t, m, k]).
  One program per (t, block of B, block of M) recomputes its h tile (nothing of size (T, B, M) is
  saved by the forward) and writes dh (T, B, M) (2 MB at the target size). The two contractions
  dz = dh @ A^T and dA = sum_t z[t]^T dh[t] are then plain cuBLAS matmuls: they are tiny, and fusing
  them would need either atomics (non-deterministic dA) or a sequential loop over all of M per program.

Layout (Liger-Kernel style): the Triton kernels, the autograd.Function `FusedECFSums`, the functional
entry point `fused_ecf_sums`, and a module `SIGRegFused` computing the whole statistic. The plain
PyTorch oracle `ecf_sums_reference` sits beside them (the same maths as lewm.sigreg.ecf_sums; this
package depends on torch and triton only, never on lewm).

Precision: every sum is accumulated in fp32. fp32 operands go through an exact ("ieee") tl.dot, a
bf16 or fp16 pair through a 16-bit dot with fp32 accumulation (exact products), a mixed pair (bf16 z,
fp32 directions: the training case) is cast to fp32 first. cos / sin are libdevice's accurate ones;
`fast_trig=True` swaps in range reduction + the hardware approximations (opt-in, GPU speed option).
fp64 embeddings run entirely in fp64 and return fp64 (so that torch.autograd.gradcheck applies).

Runs on triton 3.6 (GPU machines) and 3.9, and under TRITON_INTERPRET=1 on CPU tensors: plain pointer
arithmetic (no tl.make_block_ptr), no autotuning (block sizes come from `_block_sizes`).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import triton
import triton.language as tl

try:  # the hardware sin/cos approximations (GPU only; the interpreter has no libdevice)
    from triton.language.extra.cuda import libdevice as _cuda_libdevice
except ImportError:  # pragma: no cover - a triton without the CUDA extras
    _cuda_libdevice = None

__all__ = [
    "fused_ecf_sums",
    "ecf_sums_reference",
    "statistic_from_sums",
    "knots_and_weights",
    "FusedECFSums",
    "SIGRegFused",
]

# 2*pi split in two for range reduction (Cody-Waite): the high part has 8 significant bits, so
# n * _TWO_PI_HI is exact in fp32 for every |n| < 2^16, i.e. |angle| < ~4e5. tl.constexpr because
# compiled kernels may only read constexpr globals (the interpreter does not check this).
_TWO_PI_HI = tl.constexpr(6.28125)
_TWO_PI_LO = tl.constexpr(2.0 * math.pi - 6.28125)
_INV_TWO_PI = tl.constexpr(1.0 / (2.0 * math.pi))

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_KNOTS = 256  # the (BLOCK_M, BLOCK_K) accumulators live in registers


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _cos_sin(x, REDUCE: tl.constexpr, FAST_TRIG: tl.constexpr):
    """(cos x, sin x), elementwise.

    Default (both flags off): tl.cos / tl.sin, which Triton lowers to libdevice's accurate
    __nv_cosf / __nv_sinf on NVIDIA (seen in the sm_90 PTX of triton 3.9; they range-reduce
    internally) and to numpy in the interpreter: the same maths as the eager reference.
    REDUCE: first map x to [-pi, pi] (x - 2*pi*round(x / (2*pi)), two-constant Cody-Waite: a mul, a
    floor and two FMAs). Needed by FAST_TRIG, whose error is only small near [-pi, pi] while the
    angles t_k * h reach ~10-30.
    FAST_TRIG: the hardware approximations (__nv_fast_cosf / __nv_fast_sinf, i.e. cos.approx.f32 /
    sin.approx.f32: ~1e-6 absolute error on [-pi, pi]), fp32 only, GPU only."""
    if REDUCE:
        n = tl.floor(x * _INV_TWO_PI + 0.5)
        x = (x - n * _TWO_PI_HI) - n * _TWO_PI_LO
    if FAST_TRIG:
        c = _cuda_libdevice.fast_cosf(x)
        s = _cuda_libdevice.fast_sinf(x)
    else:
        c = tl.cos(x)
        s = tl.sin(x)
    return c, s


@triton.jit
def _project_tile(
    z_ptrs_base,
    a_ptrs_base,
    mask_b,
    mask_m,
    D,
    stride_zd,
    stride_ad,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """h tile (BLOCK_B, BLOCK_M) = z[t, offs_b, :] @ A[:, offs_m], accumulated in COMPUTE_DTYPE.

    z_ptrs_base: (BLOCK_B, 1) pointers to z[t, offs_b, 0]; a_ptrs_base: (1, BLOCK_M) pointers to
    A[0, offs_m]; mask_b (BLOCK_B,), mask_m (BLOCK_M,): which rows / directions exist; D, stride_zd,
    stride_ad: depth and its strides. Padded rows / columns / depth load as 0 and add nothing to h.
    IEEE: z and A are fp32 (or fp64) and the dot must be exact ("ieee"): the default fp32 tl.dot on
    the GPU uses TF32 (~1e-3 relative error in h, magnified by t_k up to 3). Otherwise z and A share a
    16-bit dtype and the dot runs in it: products of two bf16/fp16 values are exact in fp32 and the
    sum is fp32. The wrapper casts mixed dtypes (bf16 z, fp32 A: the usual training case) to fp32 in
    PyTorch rather than here, because Triton may fold an in-kernel bf16->fp32 cast into a TF32 dot
    despite input_precision="ieee" (triton-lang/triton#10176)."""
    h = tl.zeros((BLOCK_B, BLOCK_M), dtype=COMPUTE_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        z_tile = tl.load(z_ptrs_base + offs_d[None, :] * stride_zd,
                         mask=mask_b[:, None] & mask_d[None, :], other=0.0)
        a_tile = tl.load(a_ptrs_base + offs_d[:, None] * stride_ad,
                         mask=mask_d[:, None] & mask_m[None, :], other=0.0)
        if IEEE:
            h = tl.dot(z_tile, a_tile, h, input_precision="ieee")
        else:
            h = tl.dot(z_tile, a_tile, h)
    return h


@triton.jit
def _ecf_sums_fwd_kernel(
    Z,
    A,
    KNOTS,
    COS_OUT,
    SIN_OUT,
    B,
    D,
    M,
    K,
    stride_zt,
    stride_zb,
    stride_zd,
    stride_ad,
    stride_am,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
    REDUCE: tl.constexpr,
    FAST_TRIG: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """Forward: cos_sum / sin_sum for one (t, block of BLOCK_M directions), all K knots.

    Grid: (T * cdiv(M, BLOCK_M),), program id = t * cdiv(M, BLOCK_M) + m_block.

    Args:
        Z: pointer to z (T, B, D), fp16 / bf16 / fp32 / fp64, any strides (read via stride_z*).
        A: pointer to the directions (D, M) (unit columns), the dtype of Z (tl.dot takes one operand
            dtype; the wrapper casts), any strides.
        KNOTS: pointer to the knots t (K,), contiguous, in COMPUTE_DTYPE.
        COS_OUT, SIN_OUT: pointers to the outputs (T, M, K), contiguous, COMPUTE_DTYPE; every element
            is written exactly once (no zero-initialisation needed).
        B, D, M, K: batch size, embedding dim, number of directions, number of knots (runtime ints;
            any values >= 1, tiles are masked).
        stride_zt, stride_zb, stride_zd: strides of z in elements.
        stride_ad, stride_am: strides of A in elements.
        BLOCK_B: rows of z per inner step (>= 16: tl.dot's minimum).
        BLOCK_M: directions per program (>= 16).
        BLOCK_D: reduction depth per tl.dot (>= 16).
        BLOCK_K: K rounded up to a power of two (the accumulator width; columns >= K are not stored).
        IEEE: exact fp32/fp64 dot (z and A in COMPUTE_DTYPE) rather than a 16-bit one; see
            _project_tile.
        REDUCE: range-reduce the angles to [-pi, pi] before cos/sin (see _cos_sin).
        FAST_TRIG: hardware sin/cos approximations (fp32 on the GPU; implies REDUCE).
        COMPUTE_DTYPE: tl.float32, or tl.float64 when z is fp64.
    """
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(M, BLOCK_M)
    pid_t = (pid // num_m_blocks).to(tl.int64)  # int64: t * stride_zt may exceed 2^31 elements
    pid_m = pid % num_m_blocks

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    a_base = A + offs_m[None, :] * stride_am

    # Per-(m, k) sums over the whole batch: the only state carried across the loop over B.
    acc_cos = tl.zeros((BLOCK_M, BLOCK_K), dtype=COMPUTE_DTYPE)
    acc_sin = tl.zeros((BLOCK_M, BLOCK_K), dtype=COMPUTE_DTYPE)

    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        z_base = Z + pid_t * stride_zt + offs_b[:, None] * stride_zb
        h = _project_tile(z_base, a_base, mask_b, mask_m, D, stride_zd, stride_ad,
                          BLOCK_B, BLOCK_M, BLOCK_D, IEEE, COMPUTE_DTYPE)
        # A dynamic loop over knots (not an unrolled static one): compile time does not grow with K.
        for k in range(0, K):
            t_k = tl.load(KNOTS + k)
            cos_x, sin_x = _cos_sin(h * t_k, REDUCE, FAST_TRIG)
            # Padded rows have h = 0, i.e. cos = 1: they must be masked out of the sum.
            c = tl.sum(tl.where(mask_b[:, None], cos_x, 0.0), axis=0)  # (BLOCK_M,)
            s = tl.sum(tl.where(mask_b[:, None], sin_x, 0.0), axis=0)
            # Scatter the column sums into accumulator column k (registers cannot be indexed).
            is_k = offs_k[None, :] == k
            acc_cos = tl.where(is_k, acc_cos + c[:, None], acc_cos)
            acc_sin = tl.where(is_k, acc_sin + s[:, None], acc_sin)

    out_offs = pid_t * M * K + offs_m[:, None] * K + offs_k[None, :]
    out_mask = mask_m[:, None] & (offs_k[None, :] < K)
    tl.store(COS_OUT + out_offs, acc_cos, mask=out_mask)
    tl.store(SIN_OUT + out_offs, acc_sin, mask=out_mask)


@triton.jit
def _ecf_sums_bwd_kernel(
    Z,
    A,
    KNOTS,
    GRAD_COS,
    GRAD_SIN,
    DH,
    B,
    D,
    M,
    K,
    stride_zt,
    stride_zb,
    stride_zd,
    stride_ad,
    stride_am,
    stride_gct,
    stride_gcm,
    stride_gck,
    stride_gst,
    stride_gsm,
    stride_gsk,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
    REDUCE: tl.constexpr,
    FAST_TRIG: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """Backward: dh[t, b, m] = sum_k t_k (-sin(t_k h) g_cos[t, m, k] + cos(t_k h) g_sin[t, m, k]).

    Grid: (T * cdiv(B, BLOCK_B) * cdiv(M, BLOCK_M),), program id =
    (t * cdiv(B, BLOCK_B) + b_block) * cdiv(M, BLOCK_M) + m_block. Each program recomputes its h tile
    (cheaper than saving (T, B, M) in the forward) and writes its dh tile once.

    Args:
        Z, A, KNOTS: as in _ecf_sums_fwd_kernel.
        GRAD_COS, GRAD_SIN: pointers to dL/dcos_sum, dL/dsin_sum (T, M, K) in COMPUTE_DTYPE, any
            strides (autograd may hand over expanded, stride-0 gradients).
        DH: pointer to the output dL/dh (T, B, M), contiguous, COMPUTE_DTYPE.
        B, D, M, K: sizes, as in the forward.
        stride_zt, stride_zb, stride_zd, stride_ad, stride_am: strides of z and A in elements.
        stride_gct, stride_gcm, stride_gck: strides of GRAD_COS in elements.
        stride_gst, stride_gsm, stride_gsk: strides of GRAD_SIN in elements.
        BLOCK_B, BLOCK_M, BLOCK_D: tile sizes (each >= 16 for tl.dot).
        IEEE, REDUCE, FAST_TRIG, COMPUTE_DTYPE: as in the forward (the same h and angles are recomputed).
    """
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(M, BLOCK_M)
    num_b_blocks = tl.cdiv(B, BLOCK_B)
    pid_m = pid % num_m_blocks
    pid_tb = pid // num_m_blocks
    pid_b = pid_tb % num_b_blocks
    pid_t = (pid_tb // num_b_blocks).to(tl.int64)

    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_b = offs_b < B
    mask_m = offs_m < M

    z_base = Z + pid_t * stride_zt + offs_b[:, None] * stride_zb
    a_base = A + offs_m[None, :] * stride_am
    h = _project_tile(z_base, a_base, mask_b, mask_m, D, stride_zd, stride_ad,
                      BLOCK_B, BLOCK_M, BLOCK_D, IEEE, COMPUTE_DTYPE)

    gc_base = GRAD_COS + pid_t * stride_gct + offs_m * stride_gcm
    gs_base = GRAD_SIN + pid_t * stride_gst + offs_m * stride_gsm
    dh = tl.zeros((BLOCK_B, BLOCK_M), dtype=COMPUTE_DTYPE)
    for k in range(0, K):
        t_k = tl.load(KNOTS + k)
        # Fold t_k into the (BLOCK_M,) gradient rows once instead of into the (BLOCK_B, BLOCK_M) tile.
        gc = tl.load(gc_base + k * stride_gck, mask=mask_m, other=0.0).to(COMPUTE_DTYPE) * t_k
        gs = tl.load(gs_base + k * stride_gsk, mask=mask_m, other=0.0).to(COMPUTE_DTYPE) * t_k
        cos_x, sin_x = _cos_sin(h * t_k, REDUCE, FAST_TRIG)
        dh += cos_x * gs[None, :] - sin_x * gc[None, :]

    dh_offs = pid_t * B * M + offs_b[:, None] * M + offs_m[None, :]
    tl.store(DH + dh_offs, dh, mask=mask_b[:, None] & mask_m[None, :])


# ----------------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------------


def _interpreted() -> bool:
    """True when the kernels above were built by the Triton interpreter (TRITON_INTERPRET=1 was set
    before this module was imported): then they run on CPU tensors."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
        return isinstance(_ecf_sums_fwd_kernel, InterpretedFunction)
    except ImportError:  # pragma: no cover - layout of older/newer triton
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


_INTERPRETED = _interpreted()


def _pow2_clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _block_sizes(T: int, B: int, D: int, M: int, K: int, interpreted: bool) -> dict:
    """Tile sizes for both kernels (a heuristic, not autotuning: the interpreter cannot autotune).

    Every tl.dot dim is >= 16 (the hardware minimum, which the interpreter does not check).
    In the interpreter each program costs ~20-40 ms of Python whatever its tile size, so tiles are as
    large as the problem (few programs). On the GPU, tiles keep the (BLOCK_M, BLOCK_K) accumulators and
    the (BLOCK_B, BLOCK_M) angle tile in registers, and BLOCK_M drops to 32 when the grid would not fill
    the ~100+ SMs (T=4, M=1024 gives 64 programs at 64, 128 at 32)."""
    block_k = triton.next_power_of_2(K)
    if interpreted:
        return dict(
            fwd=dict(BLOCK_B=_pow2_clamp(B, 16, 128), BLOCK_M=_pow2_clamp(M, 16, 128),
                     BLOCK_D=_pow2_clamp(D, 16, 128), BLOCK_K=block_k),
            bwd=dict(BLOCK_B=_pow2_clamp(B, 16, 128), BLOCK_M=_pow2_clamp(M, 16, 128),
                     BLOCK_D=_pow2_clamp(D, 16, 128)),
            num_warps=4,
        )
    block_m = 64 if T * triton.cdiv(M, 64) >= 128 else 32
    # Two (BLOCK_M, BLOCK_K) fp32 accumulators: keep them at <= 4096 values (32 registers per thread
    # at 4 warps) when K is large.
    while block_m > 16 and block_m * block_k > 2048:
        block_m //= 2
    return dict(
        fwd=dict(BLOCK_B=_pow2_clamp(B, 16, 32), BLOCK_M=_pow2_clamp(M, 16, block_m),
                 BLOCK_D=_pow2_clamp(D, 16, 64), BLOCK_K=block_k),
        bwd=dict(BLOCK_B=_pow2_clamp(B, 16, 32), BLOCK_M=_pow2_clamp(M, 16, 64),
                 BLOCK_D=_pow2_clamp(D, 16, 64)),
        num_warps=4,
    )


def _check_dot_dims(blocks: dict) -> None:
    for name in ("BLOCK_B", "BLOCK_M", "BLOCK_D"):
        assert blocks[name] >= 16, f"tl.dot needs every tile dim >= 16, got {name}={blocks[name]}"


def _compute_dtype(z: torch.Tensor, directions: torch.Tensor) -> torch.dtype:
    """float64 for float64 embeddings (gradcheck), float32 for everything else: lewm's rule."""
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _use_native_dot(z: torch.Tensor, directions: torch.Tensor) -> bool:
    """tl.dot in the input dtype (fp32 accumulation) only when both operands share a 16-bit dtype;
    never bf16 in the interpreter (its bf16 dot gives wrong results)."""
    if z.dtype != directions.dtype or z.dtype not in (torch.float16, torch.bfloat16):
        return False
    return not (_INTERPRETED and z.dtype == torch.bfloat16)


def _unit_inner_stride(x: torch.Tensor) -> torch.Tensor:
    """Strided views are read through their strides (e.g. the (T, B, D) transpose of (B, T, D)
    embeddings costs no copy); only a non-unit innermost stride is copied, for coalesced loads."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _validate(z, directions, t) -> None:
    """Clear errors for everything a caller can get wrong (never a crash deep inside Triton)."""
    for name, x in (("z", z), ("directions", directions), ("t", t)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"fused_ecf_sums: {name} must be a torch.Tensor, got {type(x).__name__}")
    if z.dim() != 3:
        raise ValueError(f"fused_ecf_sums: z must be (T, B, D), got shape {tuple(z.shape)}")
    if directions.dim() != 2 or directions.shape[0] != z.shape[-1]:
        raise ValueError(f"fused_ecf_sums: directions must be (D={z.shape[-1]}, M), "
                         f"got shape {tuple(directions.shape)}")
    if t.dim() != 1:
        raise ValueError(f"fused_ecf_sums: knots t must be 1-D (K,), got shape {tuple(t.shape)}")
    for name, x in (("z", z), ("directions", directions), ("t", t)):
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"fused_ecf_sums: {name} must be float16, bfloat16, float32 or float64, "
                            f"got {x.dtype}")
    T, B, D = z.shape
    M, K = directions.shape[1], t.shape[0]
    if min(T, B, D, M, K) == 0:
        raise ValueError(f"fused_ecf_sums: empty input (T={T}, B={B}, D={D}, M={M}, K={K})")
    if K > _MAX_KNOTS:
        raise ValueError(f"fused_ecf_sums: at most {_MAX_KNOTS} knots are supported, got K={K}; "
                         "use sigreg impl='eager'")
    if not (z.device == directions.device == t.device):
        raise ValueError(f"fused_ecf_sums: inputs must be on one device, got z on {z.device}, "
                         f"directions on {directions.device}, t on {t.device}")
    if z.device.type == "cuda":
        return
    if z.device.type == "cpu":
        if not _INTERPRETED:
            raise ValueError("fused_ecf_sums: the fused SIGReg kernel needs a CUDA device, got CPU "
                             "tensors; use sigreg impl='eager' (or 'auto'), or set TRITON_INTERPRET=1 "
                             "before importing lewm_kernels to run the kernel in the Triton interpreter")
        return
    raise ValueError(f"fused_ecf_sums: unsupported device {z.device} (CUDA, or CPU under "
                     "TRITON_INTERPRET=1); use sigreg impl='eager'")


# ----------------------------------------------------------------------------------------------------
# autograd.Function and functional API
# ----------------------------------------------------------------------------------------------------


class FusedECFSums(torch.autograd.Function):
    """(z (T, B, D), directions (D, M), t (K,)) -> cos_sum, sin_sum (T, M, K).

    Differentiable w.r.t. z and directions; the knots are constants (no gradient)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, directions: torch.Tensor, t: torch.Tensor, fast_trig: bool = False):
        T, B, D = z.shape
        M, K = directions.shape[1], t.shape[0]
        cdtype = _compute_dtype(z, directions)
        ieee = not _use_native_dot(z, directions)
        # fast_trig: range reduction always (so the interpreter tests it), hardware approximations
        # only where they exist (fp32 on the GPU).
        reduce = bool(fast_trig) and cdtype == torch.float32
        fast = reduce and not _INTERPRETED and _cuda_libdevice is not None
        z_k, a_k = z, directions
        if ieee:  # one operand dtype for tl.dot; a no-op when both already are cdtype
            z_k, a_k = z.to(cdtype), directions.to(cdtype)
        # Strides are passed, so views cost no copy; A's rows are short, it is read as it is.
        z_k = _unit_inner_stride(z_k)
        t_k = t.to(cdtype).contiguous()
        cfg = _block_sizes(T, B, D, M, K, _INTERPRETED)
        blocks = cfg["fwd"]
        _check_dot_dims(blocks)

        cos_sum = torch.empty((T, M, K), device=z.device, dtype=cdtype)
        sin_sum = torch.empty((T, M, K), device=z.device, dtype=cdtype)
        grid = (T * triton.cdiv(M, blocks["BLOCK_M"]),)
        _ecf_sums_fwd_kernel[grid](
            z_k, a_k, t_k, cos_sum, sin_sum,
            B, D, M, K,
            z_k.stride(0), z_k.stride(1), z_k.stride(2),
            a_k.stride(0), a_k.stride(1),
            IEEE=ieee,
            REDUCE=reduce,
            FAST_TRIG=fast,
            COMPUTE_DTYPE=_tl_dtype(cdtype),
            num_warps=cfg["num_warps"],
            **blocks,
        )
        ctx.save_for_backward(z_k, a_k, t_k)
        ctx.in_dtypes = (z.dtype, directions.dtype)
        ctx.ieee, ctx.reduce, ctx.fast = ieee, reduce, fast
        return cos_sum, sin_sum

    @staticmethod
    def backward(ctx, grad_cos: torch.Tensor, grad_sin: torch.Tensor):
        z, a, t = ctx.saved_tensors
        need_z, need_a = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_z or need_a):
            return None, None, None, None
        T, B, D = z.shape
        M, K = a.shape[1], t.shape[0]
        cdtype = t.dtype
        grad_cos = torch.zeros((T, M, K), device=z.device, dtype=cdtype) if grad_cos is None \
            else grad_cos.to(cdtype)
        grad_sin = torch.zeros((T, M, K), device=z.device, dtype=cdtype) if grad_sin is None \
            else grad_sin.to(cdtype)
        cfg = _block_sizes(T, B, D, M, K, _INTERPRETED)
        blocks = cfg["bwd"]
        _check_dot_dims(blocks)

        dh = torch.empty((T, B, M), device=z.device, dtype=cdtype)
        grid = (T * triton.cdiv(B, blocks["BLOCK_B"]) * triton.cdiv(M, blocks["BLOCK_M"]),)
        _ecf_sums_bwd_kernel[grid](
            z, a, t, grad_cos, grad_sin, dh,
            B, D, M, K,
            z.stride(0), z.stride(1), z.stride(2),
            a.stride(0), a.stride(1),
            grad_cos.stride(0), grad_cos.stride(1), grad_cos.stride(2),
            grad_sin.stride(0), grad_sin.stride(1), grad_sin.stride(2),
            IEEE=ctx.ieee,
            REDUCE=ctx.reduce,
            FAST_TRIG=ctx.fast,
            COMPUTE_DTYPE=_tl_dtype(cdtype),
            num_warps=cfg["num_warps"],
            **blocks,
        )
        # h = z @ A  =>  dz = dh @ A^T (per t),  dA = sum_t z[t]^T dh[t] = z_flat^T dh_flat.
        # Both in the compute dtype (fp32 accumulation, matching the eager reference), then cast back.
        dz = torch.matmul(dh, a.to(cdtype).t()).to(ctx.in_dtypes[0]) if need_z else None
        da = (z.to(cdtype).reshape(T * B, D).t() @ dh.reshape(T * B, M)).to(ctx.in_dtypes[1]) \
            if need_a else None
        return dz, da, None, None


def fused_ecf_sums(z: torch.Tensor, directions: torch.Tensor, t: torch.Tensor, *,
                   fast_trig: bool = False):
    """Fused per-(T, M, K) sums over the batch of cos(t_k h) and sin(t_k h), h = z[t] @ directions.

    z (T, B, D) fp16 / bf16 / fp32 (fp64 for gradcheck), directions (D, M) unit columns, t (K,) knots.
    Returns cos_sum, sin_sum, each (T, M, K) float32 (float64 when z is float64):

        cos_sum[t, m, k] = sum_b cos(t_k * h[t, b, m]),   sin_sum likewise.

    Differentiable w.r.t. z and directions (gradients come back in their dtypes). Needs CUDA tensors,
    or CPU tensors with TRITON_INTERPRET=1 set before import; raises ValueError / TypeError otherwise.

    fast_trig: use the GPU's hardware sin/cos approximations after an explicit range reduction
    (fp32 compute only; ~1e-6 absolute error per term instead of ~1 ulp). Off by default: the
    default path is the eager maths. In the interpreter only the range reduction applies."""
    _validate(z, directions, t)
    if z.is_cuda:  # Triton launches on the current device, whatever the tensors' device
        with torch.cuda.device(z.device):
            return FusedECFSums.apply(z, directions, t, bool(fast_trig))
    return FusedECFSums.apply(z, directions, t, bool(fast_trig))


# ----------------------------------------------------------------------------------------------------
# Plain PyTorch reference (the oracle in tests; same maths as lewm.sigreg)
# ----------------------------------------------------------------------------------------------------


def ecf_sums_reference(z: torch.Tensor, directions: torch.Tensor, t: torch.Tensor):
    """Eager oracle: materialises (T, B, M, K). Same maths as lewm.sigreg.ecf_sums: computed in fp32,
    or fp64 when z is fp64 (so that a float64 reference can be built from the same quantised inputs).
    Returns cos_sum, sin_sum (T, M, K)."""
    cdtype = _compute_dtype(z, directions)
    h = torch.matmul(z.to(cdtype), directions.to(cdtype))  # (T, B, M)
    x = h.unsqueeze(-1) * t.to(cdtype)  # (T, B, M, K)
    return torch.cos(x).sum(dim=1), torch.sin(x).sum(dim=1)


def knots_and_weights(knots: int = 17, t_max: float = 3.0, device=None, dtype=torch.float32):
    """(K,) knots on [0, t_max], (K,) weights (trapezoid doubled times the N(0,1) window), (K,) target
    exp(-t^2/2). Duplicates lewm.sigreg.knots_and_weights (kernels never import lewm)."""
    if knots < 2:
        raise ValueError(f"knots must be >= 2, got {knots}")
    t = torch.linspace(0.0, t_max, knots, device=device, dtype=torch.float64)
    dt = t_max / (knots - 1)
    c = torch.full((knots,), 2.0, dtype=torch.float64, device=device)
    c[0] = c[-1] = 1.0
    phi = torch.exp(-0.5 * t * t)
    return t.to(dtype), (c * dt * phi).to(dtype), phi.to(dtype)


def statistic_from_sums(cos_sum, sin_sum, n, w, phi) -> torch.Tensor:
    """Epps-Pulley statistic averaged over (T, M) from the (T, M, K) sums over n samples:
    mean_{t,m} n * sum_k w_k [(cos_sum/n - phi_k)^2 + (sin_sum/n)^2]."""
    re = cos_sum / n
    im = sin_sum / n
    err = (re - phi) ** 2 + im ** 2
    return ((err * w).sum(-1) * n).mean()


# ----------------------------------------------------------------------------------------------------
# Module wrapper
# ----------------------------------------------------------------------------------------------------


class SIGRegFused(nn.Module):
    """SIGReg statistic of (T, B, D) embeddings on given (D, M) directions, sums from the fused kernel.

    forward(z (T, B, D), directions (D, M)) -> float32 scalar (float64 for float64 inputs); equal to
    lewm.sigreg.sigreg_tbd(z, directions, knots, t_max) on one process. The knots, weights and target
    are non-persistent buffers (they follow .to(device) and stay out of state_dicts)."""

    def __init__(self, knots: int = 17, t_max: float = 3.0, fast_trig: bool = False):
        super().__init__()
        self.knots, self.t_max, self.fast_trig = knots, t_max, fast_trig
        t, w, phi = knots_and_weights(knots, t_max)
        self.register_buffer("t", t, persistent=False)
        self.register_buffer("w", w, persistent=False)
        self.register_buffer("phi", phi, persistent=False)

    def forward(self, z: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        cos_sum, sin_sum = fused_ecf_sums(z, directions, self.t, fast_trig=self.fast_trig)
        return statistic_from_sums(cos_sum, sin_sum, z.shape[1], self.w, self.phi)

    def extra_repr(self) -> str:
        return f"knots={self.knots}, t_max={self.t_max}, fast_trig={self.fast_trig}"
