"""Fused SIGReg: the per-(T, M, K) empirical characteristic-function sums without (T, B, M, K).

SIGReg (see lewm/sigreg.py for the statistic) needs, for embeddings z (T, B, D), unit directions
A (D, M) and knots t (K,),

    h[t, b, m]      = sum_d z[t, b, d] * A[d, m]                     (T, B, M)
    cos_sum[t, m, k] = sum_b cos(t_k * h[t, b, m])                    (T, M, K)
    sin_sum[t, m, k] = sum_b sin(t_k * h[t, b, m])                    (T, M, K)

The eager reference builds the (T, B, M, K) tensor of angles and then reduces it. The kernels here
never do:

- forward, pass 1 (`_ecf_sums_fwd_kernel`): one program per (block of M, block of B, t). It projects its
  (BLOCK_B, BLOCK_M) tile of h with `tl.dot` (loop over D) and writes, for every knot, the column
  sums over its rows of cos / sin: a partial (K, BLOCK_M) slab per B block, into a workspace
  (NB, T, K, M) (NB = number of B blocks). Splitting B across programs is what fills the GPU (the
  grid is T x cdiv(B, BLOCK_B) x cdiv(M, BLOCK_M)); no atomics, so the partials are deterministic.
- forward, pass 2 (`_ecf_sums_reduce_kernel`): sums the NB partials in a fixed order (j = 0, 1, ...) into
  the (T, M, K) outputs: bitwise reproducible run to run. With a single B block pass 1 writes the
  outputs directly and pass 2 is skipped.
- backward (`_ecf_sums_bwd_kernel`): given g_cos, g_sin (T, M, K),
      dL/dh[t, b, m] = sum_k t_k * (-sin(t_k h) * g_cos[t, m, k] + cos(t_k h) * g_sin[t, m, k]).
  One program per (block of M, block of B, t) recomputes its h tile (nothing of size (T, B, M) is
  saved by the forward) and writes dh (T, B, M) once. The two contractions dz = dh @ A^T and
  dA = sum_t z[t]^T dh[t] are then plain cuBLAS matmuls: fusing them would need either atomics
  (non-deterministic dA) or a sequential loop over all of M per program.

Knots. When the knots are equally spaced from zero (t_k = k * dt: what `knots_and_weights` returns,
and what SIGReg uses), cos / sin are evaluated once per (t, b, m), for the angle dt * h, and the
other knots follow by angle addition,
    cos((k+1) x) = cos(kx) cos(x) - sin(kx) sin(x),   sin((k+1) x) = sin(kx) cos(x) + cos(kx) sin(x),
which replaces K - 1 of the K cos/sin evaluations by four multiply-adds each. The rounding error of
the recurrence grows about linearly with k (measured against float64 in tests/test_kernel_sigreg.py
and in /work/notes/sigreg.md): at the last knot it stays within a few fp32 ulps of the value, the
same order as the rounding of the angle t_k * h itself, which eager PyTorch also carries. Any other
knots take the general path (one cos/sin per knot). `knots_and_weights` caches its tensors per
(device, dtype, knots, t_max), and the wrapper recognises those tensors (by identity and version
counter; CPU tensors are also checked by value) as equally spaced; other CUDA knots are never read
back to the host (that would synchronise), so they take the general path.

cos / sin. In fp32 the kernels use their own sincos (`_sincos_poly`: a three-constant Cody-Waite
reduction by pi/2 and minimax polynomials on [-pi/4, pi/4], cephes' sinf/cosf coefficients): about
an ulp wherever the reduction is exact (angles far beyond SIGReg's) and, unlike libdevice's __nv_sinf / __nv_cosf, no Payne-Hanek slow path, whose local-memory
array made every kernel spill. `fast_trig=True` swaps in range reduction + the hardware
approximations (sin.approx / cos.approx) at every knot (no recurrence, so their error does not grow
with k). fp64 embeddings run entirely in fp64 (libdevice's cos / sin, the recurrence in fp64) and
return fp64, so that torch.autograd.gradcheck applies.

Layout (Liger-Kernel style): the Triton kernels, the autograd.Function `FusedECFSums`, the functional
entry point `fused_ecf_sums`, and a module `SIGRegFused` computing the whole statistic. The plain
PyTorch oracle `ecf_sums_reference` sits beside them (the same maths as lewm.sigreg.ecf_sums; this
package depends on torch and triton only, never on lewm).

Precision: every sum is accumulated in fp32. fp32 operands go through an exact ("ieee") tl.dot, a
bf16 or fp16 pair through a 16-bit dot with fp32 accumulation (exact products), a mixed pair (bf16 z,
fp32 directions: the training case) is cast to fp32 first. Every tl.dot names its out_dtype (fp64 for
the fp64 path: triton 3.6 would otherwise accumulate fp64 operands into fp32 and refuse to compile).

Every launch goes through `lewm_kernels._utils.launch` with a cost estimate (see `_cost_fwd` etc.),
so the launches of a training step can be recorded (on meta tensors too) and compiled for sm_90
without a GPU (tests/test_kernel_sigreg.py, bench/sigreg_model.py).

Runs on triton 3.6 (GPU machines) and the registry's triton, and under TRITON_INTERPRET=1 on CPU
tensors: plain pointer arithmetic (no tl.make_block_ptr), no autotuning (block sizes come from
`_block_sizes`). The Triton section of this file (the jit functions and their tl.constexpr globals)
uses nothing but triton and math, so that bench/sigreg_model.py can compile it for sm_90 with
another triton in a venv without torch.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import triton
import triton.language as tl

from . import _utils

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

# Compiled kernels may only read constexpr globals (the interpreter does not check this).
# 2*pi split in two for the fast_trig range reduction (Cody-Waite): the high part has 8 significant
# bits, so n * _TWO_PI_HI is exact in fp32 for every |n| < 2^16, i.e. |angle| < ~4e5.
_TWO_PI_HI = tl.constexpr(6.28125)
_TWO_PI_LO = tl.constexpr(2.0 * math.pi - 6.28125)
_INV_TWO_PI = tl.constexpr(1.0 / (2.0 * math.pi))
# pi/2 in three parts for _sincos_poly (cephes' DP1..DP3, doubled): 8 and 11 significant bits, so
# n * _PIO2_1 and n * _PIO2_2 are exact in fp32 (with or without FMA contraction) for |n| < 2^13.
_TWO_OVER_PI = tl.constexpr(2.0 / math.pi)
_PIO2_1 = tl.constexpr(1.5703125)
_PIO2_2 = tl.constexpr(4.837512969970703125e-4)
_PIO2_3 = tl.constexpr(7.54978995489188216e-8)
# cephes sinf / cosf minimax coefficients on [-pi/4, pi/4]
_SIN_C1 = tl.constexpr(-1.6666654611e-1)
_SIN_C2 = tl.constexpr(8.3321608736e-3)
_SIN_C3 = tl.constexpr(-1.9515295891e-4)
_COS_C1 = tl.constexpr(4.166664568298827e-2)
_COS_C2 = tl.constexpr(-1.388731625493765e-3)
_COS_C3 = tl.constexpr(2.443315711809948e-5)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_KNOTS = 256  # the pass-2 (BLOCK_K, BLOCK_M) tiles live in registers


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _sincos_poly(x):
    """(cos x, sin x) in fp32 without libdevice: x = n * pi/2 + r (three-constant Cody-Waite,
    exact products, see _PIO2_*), r in [-pi/4, pi/4]; minimax polynomials for sin r and cos r; the
    quadrant n mod 4 swaps and negates them. Branch-free and without local memory; NaN / inf give NaN.
    In the interpreter the same operations run in numpy fp32 (without FMA contraction: the
    reduction is exact either way)."""
    n = tl.floor(x * _TWO_OVER_PI + 0.5)
    r = x - n * _PIO2_1
    r = r - n * _PIO2_2
    r = r - n * _PIO2_3
    z = r * r
    ps = ((_SIN_C3 * z + _SIN_C2) * z + _SIN_C1) * z * r + r
    pc = ((_COS_C3 * z + _COS_C2) * z + _COS_C1) * z * z - 0.5 * z + 1.0
    q = n.to(tl.int32) & 3
    odd = (q & 1) == 1
    s = tl.where(odd, pc, ps)
    c = tl.where(odd, ps, pc)
    s = tl.where(q >= 2, -s, s)
    c = tl.where((q == 1) | (q == 2), -c, c)
    return c, s


@triton.jit
def _cos_sin(x, POLY: tl.constexpr, REDUCE: tl.constexpr, FAST_TRIG: tl.constexpr):
    """(cos x, sin x), elementwise.

    POLY (the fp32 default): _sincos_poly.
    Otherwise tl.cos / tl.sin: libdevice's __nv_cos / __nv_sin on NVIDIA (the fp64 path), numpy in
    the interpreter, unless
    REDUCE: first map x to [-pi, pi] (x - 2*pi*round(x / (2*pi)), two-constant Cody-Waite: a mul, a
    floor and two FMAs). Needed by FAST_TRIG, whose error is only small near [-pi, pi].
    FAST_TRIG: the hardware approximations (__nv_fast_cosf / __nv_fast_sinf, i.e. cos.approx.f32 /
    sin.approx.f32), fp32 only, GPU only."""
    if POLY:
        c, s = _sincos_poly(x)
    else:
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
    the GPU uses TF32 (about three decimal digits in h, magnified by t_k). Otherwise z and A share a
    16-bit dtype and the dot runs in it: products of two bf16/fp16 values are exact in fp32 and the
    sum is fp32. The wrapper casts mixed dtypes (bf16 z, fp32 A: the usual training case) to fp32 in
    PyTorch rather than here, because Triton may fold an in-kernel bf16->fp32 cast into a TF32 dot
    despite input_precision="ieee" (triton-lang/triton#10176).
    out_dtype is always explicit: triton 3.6 defaults it to fp32 even for fp64 operands."""
    h = tl.zeros((BLOCK_B, BLOCK_M), dtype=COMPUTE_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        z_tile = tl.load(z_ptrs_base + offs_d[None, :] * stride_zd,
                         mask=mask_b[:, None] & mask_d[None, :], other=0.0)
        a_tile = tl.load(a_ptrs_base + offs_d[:, None] * stride_ad,
                         mask=mask_d[:, None] & mask_m[None, :], other=0.0)
        if IEEE:
            h = tl.dot(z_tile, a_tile, h, input_precision="ieee", out_dtype=COMPUTE_DTYPE)
        else:
            h = tl.dot(z_tile, a_tile, h, out_dtype=tl.float32)
    return h


@triton.jit
def _ecf_sums_fwd_kernel(
    Z,
    A,
    KNOTS,
    P_COS,
    P_SIN,
    B,
    D,
    M,
    K,
    stride_zt,
    stride_zb,
    stride_zd,
    stride_ad,
    stride_am,
    stride_pb,
    stride_pt,
    stride_pk,
    stride_pm,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
    RECUR: tl.constexpr,
    POLY: tl.constexpr,
    REDUCE: tl.constexpr,
    FAST_TRIG: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """Forward pass 1: for one (block of M, block of B, t), the sums over the block's rows of
    cos(t_k h) and sin(t_k h), every knot k, written to P_COS / P_SIN[b_block, t, k, m].

    Grid: (cdiv(M, BLOCK_M), cdiv(B, BLOCK_B), T).

    Args:
        Z: pointer to z (T, B, D), fp16 / bf16 / fp32 / fp64, any strides (read via stride_z*).
        A: pointer to the directions (D, M) (unit columns), the dtype of Z (tl.dot takes one operand
            dtype; the wrapper casts), any strides.
        KNOTS: pointer to the knots t (K,), contiguous, in COMPUTE_DTYPE.
        P_COS, P_SIN: the partial sums, COMPUTE_DTYPE, addressed as
            b_block * stride_pb + t * stride_pt + k * stride_pk + m * stride_pm: the (NB, T, K, M)
            workspace, or with a single B block the (T, M, K) outputs themselves (stride_pb unused).
            Every element is written exactly once (no zero-initialisation needed).
        B, D, M, K: batch size, embedding dim, number of directions, number of knots (runtime ints;
            any values >= 1, tiles are masked; K >= 2 with RECUR).
        stride_zt, stride_zb, stride_zd: strides of z in elements.
        stride_ad, stride_am: strides of A in elements.
        BLOCK_B: rows of z per program (>= 16: tl.dot's minimum).
        BLOCK_M: directions per program (>= 16).
        BLOCK_D: reduction depth per tl.dot (>= 16).
        IEEE: exact fp32/fp64 dot (z and A in COMPUTE_DTYPE) rather than a 16-bit one; see
            _project_tile.
        RECUR: the knots are t_k = k * t_1: one cos/sin of t_1 * h, the rest by angle addition.
        POLY, REDUCE, FAST_TRIG: how cos/sin are evaluated (see _cos_sin).
        COMPUTE_DTYPE: tl.float32, or tl.float64 when z is fp64.
    """
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_t = tl.program_id(2).to(tl.int64)  # int64: t * stride_zt may exceed 2^31 elements

    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_b = offs_b < B
    mask_m = offs_m < M
    z_base = Z + pid_t * stride_zt + offs_b[:, None] * stride_zb
    a_base = A + offs_m[None, :] * stride_am
    h = _project_tile(z_base, a_base, mask_b, mask_m, D, stride_zd, stride_ad,
                      BLOCK_B, BLOCK_M, BLOCK_D, IEEE, COMPUTE_DTYPE)
    valid = mask_b[:, None] & mask_m[None, :]

    p_offs = pid_b * stride_pb + pid_t * stride_pt + offs_m * stride_pm
    # Dynamic loops over the knots (not unrolled static ones): compile time does not grow with K.
    if RECUR:
        c1, s1 = _cos_sin(h * tl.load(KNOTS + 1), POLY, REDUCE, FAST_TRIG)
        # (cos, sin) of 0 * h; padded rows start at (0, 0) and stay there under the rotation, so they
        # add nothing to the sums without a mask per knot.
        c = tl.where(valid, 1.0, 0.0).to(COMPUTE_DTYPE)
        s = tl.zeros((BLOCK_B, BLOCK_M), dtype=COMPUTE_DTYPE)
        for k in range(0, K):
            tl.store(P_COS + p_offs + k * stride_pk, tl.sum(c, axis=0), mask=mask_m)
            tl.store(P_SIN + p_offs + k * stride_pk, tl.sum(s, axis=0), mask=mask_m)
            c_next = c * c1 - s * s1
            s = s * c1 + c * s1
            c = c_next
    else:
        for k in range(0, K):
            cos_x, sin_x = _cos_sin(h * tl.load(KNOTS + k), POLY, REDUCE, FAST_TRIG)
            # Padded rows have h = 0, i.e. cos = 1: they must be masked out of the sum.
            tl.store(P_COS + p_offs + k * stride_pk, tl.sum(tl.where(valid, cos_x, 0.0), axis=0),
                     mask=mask_m)
            tl.store(P_SIN + p_offs + k * stride_pk, tl.sum(tl.where(valid, sin_x, 0.0), axis=0),
                     mask=mask_m)


@triton.jit
def _ecf_sums_reduce_kernel(
    P_COS,
    P_SIN,
    COS_OUT,
    SIN_OUT,
    NB,
    M,
    K,
    stride_pb,
    stride_pt,
    stride_pk,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Forward pass 2: COS_OUT[t, m, k] = sum over j = 0, 1, ..., NB - 1 (in that order) of
    P_COS[j, t, k, m], and likewise for sin: a fixed-order, hence run-to-run reproducible, reduction.

    Grid: (cdiv(M, BLOCK_M), T).

    Args:
        P_COS, P_SIN: the (NB, T, K, M) partials of _ecf_sums_fwd_kernel (unit stride along m).
        COS_OUT, SIN_OUT: the outputs (T, M, K), contiguous, the partials' dtype.
        NB, M, K: number of B blocks, directions, knots.
        stride_pb, stride_pt, stride_pk: strides of the partials in elements.
        BLOCK_M: directions per program; BLOCK_K: K rounded up to a power of two.
    """
    pid_m = tl.program_id(0)
    pid_t = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask = (offs_k[:, None] < K) & (offs_m[None, :] < M)
    p_offs = pid_t * stride_pt + offs_k[:, None] * stride_pk + offs_m[None, :]
    acc_c = tl.load(P_COS + p_offs, mask=mask, other=0.0)
    acc_s = tl.load(P_SIN + p_offs, mask=mask, other=0.0)
    for j in range(1, NB):
        acc_c += tl.load(P_COS + j * stride_pb + p_offs, mask=mask, other=0.0)
        acc_s += tl.load(P_SIN + j * stride_pb + p_offs, mask=mask, other=0.0)
    out_offs = pid_t * M * K + offs_m[None, :] * K + offs_k[:, None]
    tl.store(COS_OUT + out_offs, acc_c, mask=mask)
    tl.store(SIN_OUT + out_offs, acc_s, mask=mask)


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
    RECUR: tl.constexpr,
    POLY: tl.constexpr,
    REDUCE: tl.constexpr,
    FAST_TRIG: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """Backward: dh[t, b, m] = sum_k t_k (-sin(t_k h) g_cos[t, m, k] + cos(t_k h) g_sin[t, m, k]).

    Grid: (cdiv(M, BLOCK_M), cdiv(B, BLOCK_B), T). Each program recomputes its h tile (cheaper than
    saving (T, B, M) in the forward) and writes its dh tile once: deterministic.

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
        IEEE, RECUR, POLY, REDUCE, FAST_TRIG, COMPUTE_DTYPE: as in the forward (the same h and angles
            are recomputed).
    """
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_t = tl.program_id(2).to(tl.int64)

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
    if RECUR:
        c1, s1 = _cos_sin(h * tl.load(KNOTS + 1), POLY, REDUCE, FAST_TRIG)
        c = tl.full((BLOCK_B, BLOCK_M), 1.0, dtype=COMPUTE_DTYPE)
        s = tl.zeros((BLOCK_B, BLOCK_M), dtype=COMPUTE_DTYPE)
        for k in range(0, K):
            t_k = tl.load(KNOTS + k)
            # t_k folded into the (BLOCK_M,) gradient rows once instead of into the tile.
            gc = tl.load(gc_base + k * stride_gck, mask=mask_m, other=0.0).to(COMPUTE_DTYPE) * t_k
            gs = tl.load(gs_base + k * stride_gsk, mask=mask_m, other=0.0).to(COMPUTE_DTYPE) * t_k
            dh += c * gs[None, :] - s * gc[None, :]
            c_next = c * c1 - s * s1
            s = s * c1 + c * s1
            c = c_next
    else:
        for k in range(0, K):
            t_k = tl.load(KNOTS + k)
            gc = tl.load(gc_base + k * stride_gck, mask=mask_m, other=0.0).to(COMPUTE_DTYPE) * t_k
            gs = tl.load(gs_base + k * stride_gsk, mask=mask_m, other=0.0).to(COMPUTE_DTYPE) * t_k
            cos_x, sin_x = _cos_sin(h * t_k, POLY, REDUCE, FAST_TRIG)
            dh += cos_x * gs[None, :] - sin_x * gc[None, :]

    dh_offs = pid_t * B * M + offs_b[:, None] * M + offs_m[None, :]
    tl.store(DH + dh_offs, dh, mask=mask_b[:, None] & mask_m[None, :])


# ----------------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------------


_INTERPRETED = _utils.interpreted(_ecf_sums_fwd_kernel)
p2 = _utils.p2


def _block_sizes(T: int, B: int, D: int, M: int, K: int, interpreted: bool, itemsize: int = 4) -> dict:
    """Tile sizes for the kernels (a heuristic, not autotuning: the interpreter cannot autotune).

    fwd: BLOCK_B / BLOCK_M / BLOCK_D of pass 1 and BLOCK_K of pass 2 (the same BLOCK_M); bwd: the
    backward's tiles. Every tl.dot dim is >= 16 (the hardware minimum, which the interpreter does
    not check).
    In the interpreter each program costs tens of ms of Python whatever its tile size, so tiles are
    as large as the problem (few programs, usually one B block: no pass 2). On the GPU the tiles are
    small (BLOCK_B = BLOCK_M = 32, four warps): the grid T x cdiv(B, 32) x cdiv(M, 32) then holds
    several CTAs per SM at SIGReg's sizes, each with a handful of (BLOCK_B, BLOCK_M) tiles in
    registers (h, the rotation and the running cos / sin) and no spills (see the sm_90 test). fp64
    (itemsize 8, the gradcheck path) halves BLOCK_B and BLOCK_D: its registers are twice as wide."""
    block_k = triton.next_power_of_2(K)
    if interpreted:
        tiles = dict(BLOCK_B=p2(B, 16, 128), BLOCK_M=p2(M, 16, 128), BLOCK_D=p2(D, 16, 128))
    else:
        wide = itemsize > 4
        tiles = dict(BLOCK_B=p2(B, 16, 16 if wide else 32), BLOCK_M=p2(M, 16, 32),
                     BLOCK_D=p2(D, 16, 32 if wide else 64))
    return dict(fwd=dict(tiles, BLOCK_K=block_k), bwd=dict(tiles), num_warps=4)


def _check_dot_dims(blocks: dict) -> None:
    for name in ("BLOCK_B", "BLOCK_M", "BLOCK_D"):
        assert blocks[name] >= 16, f"tl.dot needs every tile dim >= 16, got {name}={blocks[name]}"


def _compute_dtype(z: torch.Tensor, directions: torch.Tensor) -> torch.dtype:
    """float64 for float64 embeddings (gradcheck), float32 for everything else: lewm's rule."""
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _runs_interpreted() -> bool:
    """Whether this launch runs in the interpreter: not while launches are only recorded (the records
    describe the GPU's launch, also in a process where the interpreter is on)."""
    return _INTERPRETED and not _utils.recording()


def _use_native_dot(z: torch.Tensor, directions: torch.Tensor) -> bool:
    """tl.dot in the input dtype (fp32 accumulation) only when both operands share a 16-bit dtype;
    never bf16 in the interpreter (its bf16 dot gives wrong results)."""
    if z.dtype != directions.dtype or z.dtype not in (torch.float16, torch.bfloat16):
        return False
    return not (_runs_interpreted() and z.dtype == torch.bfloat16)


def _unit_inner_stride(x: torch.Tensor) -> torch.Tensor:
    """Strided views are read through their strides (e.g. the (T, B, D) transpose of (B, T, D)
    embeddings costs no copy); only a non-unit innermost stride is copied, for coalesced loads."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _validate(z, directions, t) -> None:
    """Clear errors for everything a caller can get wrong (never a crash deep inside Triton).
    While launches are recorded without running (`_utils.recording()`), the device checks are
    skipped, so that the wrapper can be walked on meta or CPU tensors."""
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
    if z.device.type == "cuda" or _utils.recording():
        return
    if z.device.type == "cpu":
        if not _INTERPRETED:
            raise ValueError("fused_ecf_sums: the fused SIGReg kernel needs a CUDA device, got CPU "
                             "tensors; use sigreg impl='eager' (or 'auto'), or set TRITON_INTERPRET=1 "
                             "before importing lewm_kernels to run the kernel in the Triton interpreter")
        return
    raise ValueError(f"fused_ecf_sums: unsupported device {z.device} (CUDA, or CPU under "
                     "TRITON_INTERPRET=1); use sigreg impl='eager'")


# --- knots: cached per (device, dtype, knots, t_max), recognised as equally spaced -------------------

_KNOTS_CACHE: dict = {}  # (device, dtype, knots, t_max) -> (t, w, phi)
_UNIFORM_KNOTS: dict = {}  # id(t) -> (t, its version counter when cached), for cached knots t


def _device_key(device) -> torch.device:
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def build_knots(knots: int, t_max: float, device, dtype):
    """The quadrature, uncached: (K,) knots t_k = k * t_max / (K - 1), (K,) weights w_k (the trapezoid
    rule's 1, 2, ..., 2, 1 times dt, times the N(0,1) window exp(-t_k^2/2)), (K,) target exp(-t_k^2/2)
    (the N(0,1) characteristic function); computed in float64, returned in `dtype`."""
    t = torch.linspace(0.0, t_max, knots, device=device, dtype=torch.float64)
    dt = t_max / (knots - 1)
    c = torch.full((knots,), 2.0, dtype=torch.float64, device=device)
    c[0] = c[-1] = 1.0
    phi = torch.exp(-0.5 * t * t)
    return t.to(dtype), (c * dt * phi).to(dtype), phi.to(dtype)


def _may_cache(device: torch.device) -> bool:
    """Not while torch.compile traces (a side effect on a global) or a CUDA graph is being captured
    (the tensors would only be filled when the graph is replayed)."""
    if torch.compiler.is_compiling():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def knots_and_weights(knots: int = 17, t_max: float = 3.0, device=None, dtype=torch.float32):
    """(K,) knots on [0, t_max], (K,) weights (trapezoid doubled times the N(0,1) window), (K,) target
    exp(-t^2/2) (`build_knots`; lewm.sigreg uses these, kernels never import lewm).

    Computed in float64 once per (device, dtype, knots, t_max) and cached: the same tensors are
    returned on every call (treat them as read-only; an in-place change only costs the knots their
    fast path). The fused kernels recognise these knots as equally spaced from zero and take the
    angle-addition path."""
    if knots < 2:
        raise ValueError(f"knots must be >= 2, got {knots}")
    dev = _device_key(device)
    key = (dev, dtype, int(knots), float(t_max))
    hit = _KNOTS_CACHE.get(key)
    if hit is not None:
        return hit
    if not _may_cache(dev):
        return build_knots(knots, t_max, dev, dtype)
    with torch.inference_mode(False), torch.no_grad():  # usable later with and without autograd
        out = build_knots(knots, t_max, dev, dtype)
    _KNOTS_CACHE[key] = out
    _UNIFORM_KNOTS[id(out[0])] = (out[0], out[0]._version)
    return out


def _uniform_from_zero(t: torch.Tensor) -> bool:
    """Whether t_k = k * t_1 (to rounding), the condition for the angle-addition path: the cached
    knots (unchanged since), or CPU knots checked by value. Other device tensors are not read back
    (a host synchronisation per call): they take the general path."""
    if t.numel() < 2:
        return False
    hit = _UNIFORM_KNOTS.get(id(t))
    if hit is not None and hit[0] is t and t._version == hit[1]:
        return True
    if t.device.type != "cpu":
        return False
    td = t.detach().double()
    k = torch.arange(t.numel(), dtype=torch.float64)
    tol = 8 * torch.finfo(t.dtype).eps * float(td.abs().max())
    return bool(td[0] == 0) and float((td - k * td[1]).abs().max()) <= tol


def _trig_flags(cdtype: torch.dtype, fast_trig: bool, uniform: bool) -> dict:
    """The kernels' cos/sin constexprs. fast_trig: range reduction always (so that the interpreter
    tests it), the hardware approximations only where they exist (fp32 on the GPU), at every knot."""
    fp32 = cdtype == torch.float32
    reduce = bool(fast_trig) and fp32
    return dict(RECUR=bool(uniform) and not reduce, POLY=fp32 and not reduce, REDUCE=reduce,
                FAST_TRIG=reduce and not _runs_interpreted() and _cuda_libdevice is not None)


# --- cost estimates attached to each launch (see _utils: flops, hbm_bytes, l2_bytes) ----------------
# fp32 operations per element, counted from the kernels' source (an FMA counts 2):
_SINCOS_FLOPS = 30  # _sincos_poly: reduction 3 FMA + floor/mul, two degree-3 polynomials, selects
_ROTATE_FLOPS = 6  # one angle-addition step: 2 FMUL + 2 FFMA
_FAST_SINCOS_FLOPS = 8  # reduction (mul, floor, 2 FMA) + two MUFU approximations


def _trig_flops(K: int, flags: dict) -> int:
    """fp32 flops of the cos/sin work per (t, b, m) element over all K knots."""
    if flags["RECUR"]:
        return _SINCOS_FLOPS + (K - 1) * _ROTATE_FLOPS
    return K * (_FAST_SINCOS_FLOPS if flags["REDUCE"] else _SINCOS_FLOPS)


def _cost_fwd(T, B, D, M, K, blocks, ez, ea, ep, nb, flags) -> dict:
    bb, bm = blocks["BLOCK_B"], blocks["BLOCK_M"]
    ctas = T * nb * triton.cdiv(M, bm)
    elems = ctas * bb * bm  # padded tiles: what the hardware computes
    partial = 2 * nb * T * K * M * ep  # written once (the outputs themselves when nb == 1)
    return {"flops": elems * (2 * D + _trig_flops(K, flags) + 2 * K),
            "hbm_bytes": T * B * D * ez + D * M * ea + K * ep + partial,
            "l2_bytes": ctas * D * (bb * ez + bm * ea) + partial}


def _cost_reduce(T, M, K, ep, nb) -> dict:
    return {"flops": 2 * (nb - 1) * T * M * K, "hbm_bytes": 2 * (nb + 1) * T * M * K * ep,
            "l2_bytes": 2 * (nb + 1) * T * M * K * ep}


def _cost_bwd(T, B, D, M, K, blocks, ez, ea, ep, flags) -> dict:
    bb, bm = blocks["BLOCK_B"], blocks["BLOCK_M"]
    nbb, nbm = triton.cdiv(B, bb), triton.cdiv(M, bm)
    ctas = T * nbb * nbm
    elems = ctas * bb * bm
    grads = 2 * T * M * K * ep
    return {"flops": elems * (2 * D + _trig_flops(K, flags) + 4 * K),
            "hbm_bytes": T * B * D * ez + D * M * ea + K * ep + grads + T * B * M * ep,
            "l2_bytes": ctas * D * (bb * ez + bm * ea) + nbb * grads + T * B * M * ep}


def _esize(x: torch.Tensor) -> int:
    return x.element_size()


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
        flags = _trig_flags(cdtype, fast_trig, _uniform_from_zero(t))
        z_k, a_k = z, directions
        if ieee:  # one operand dtype for tl.dot; a no-op when both already are cdtype
            z_k, a_k = z.to(cdtype), directions.to(cdtype)
        # Strides are passed, so views cost no copy; A's rows are short, it is read as it is.
        z_k = _unit_inner_stride(z_k)
        t_k = t.to(cdtype).contiguous()
        cfg = _block_sizes(T, B, D, M, K, not _utils.gpu_tiles(), torch.finfo(cdtype).bits // 8)
        blocks = cfg["fwd"]
        _check_dot_dims(blocks)
        tiles = {n: blocks[n] for n in ("BLOCK_B", "BLOCK_M", "BLOCK_D")}
        nb = triton.cdiv(B, blocks["BLOCK_B"])
        nm = triton.cdiv(M, blocks["BLOCK_M"])

        cos_sum = torch.empty((T, M, K), device=z.device, dtype=cdtype)
        sin_sum = torch.empty((T, M, K), device=z.device, dtype=cdtype)
        if nb == 1:  # one B block: pass 1 writes the outputs, (t, k, m) -> t * M * K + m * K + k
            p_cos, p_sin = cos_sum, sin_sum
            p_strides = (0, M * K, 1, K)
        else:  # the (NB, T, K, M) workspace, unit stride along m (coalesced stores)
            ws = torch.empty((2, nb, T, K, M), device=z.device, dtype=cdtype)
            p_cos, p_sin = ws[0], ws[1]
            p_strides = (T * K * M, K * M, M, 1)
        es = torch.finfo(cdtype).bits // 8
        _utils.launch(
            _ecf_sums_fwd_kernel, (nm, nb, T),
            z_k, a_k, t_k, p_cos, p_sin,
            B, D, M, K,
            z_k.stride(0), z_k.stride(1), z_k.stride(2),
            a_k.stride(0), a_k.stride(1),
            *p_strides,
            tag="sigreg.fwd",
            cost=_cost_fwd(T, B, D, M, K, blocks, _esize(z_k), _esize(a_k), es, nb, flags),
            IEEE=ieee, COMPUTE_DTYPE=_tl_dtype(cdtype), num_warps=cfg["num_warps"],
            **flags, **tiles,
        )
        if nb > 1:
            _utils.launch(
                _ecf_sums_reduce_kernel, (nm, T),
                p_cos, p_sin, cos_sum, sin_sum,
                nb, M, K,
                *p_strides[:3],
                tag="sigreg.fwd_reduce", cost=_cost_reduce(T, M, K, es, nb),
                BLOCK_M=blocks["BLOCK_M"], BLOCK_K=blocks["BLOCK_K"], num_warps=cfg["num_warps"],
            )
        ctx.save_for_backward(z_k, a_k, t_k)
        ctx.in_dtypes = (z.dtype, directions.dtype)
        ctx.ieee, ctx.flags = ieee, flags
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
        cfg = _block_sizes(T, B, D, M, K, not _utils.gpu_tiles(), torch.finfo(cdtype).bits // 8)
        blocks = cfg["bwd"]
        _check_dot_dims(blocks)

        dh = torch.empty((T, B, M), device=z.device, dtype=cdtype)
        grid = (triton.cdiv(M, blocks["BLOCK_M"]), triton.cdiv(B, blocks["BLOCK_B"]), T)
        _utils.launch(
            _ecf_sums_bwd_kernel, grid,
            z, a, t, grad_cos, grad_sin, dh,
            B, D, M, K,
            z.stride(0), z.stride(1), z.stride(2),
            a.stride(0), a.stride(1),
            grad_cos.stride(0), grad_cos.stride(1), grad_cos.stride(2),
            grad_sin.stride(0), grad_sin.stride(1), grad_sin.stride(2),
            tag="sigreg.bwd",
            cost=_cost_bwd(T, B, D, M, K, blocks, _esize(z), _esize(a), _esize(dh), ctx.flags),
            IEEE=ctx.ieee, COMPUTE_DTYPE=_tl_dtype(cdtype), num_warps=cfg["num_warps"],
            **ctx.flags, **blocks,
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

    z (T, B, D) fp16 / bf16 / fp32 (fp64 for gradcheck), directions (D, M) unit columns, t (K,) knots
    (from `knots_and_weights` for the angle-addition fast path; any knots work).
    Returns cos_sum, sin_sum, each (T, M, K) float32 (float64 when z is float64):

        cos_sum[t, m, k] = sum_b cos(t_k * h[t, b, m]),   sin_sum likewise.

    Deterministic: the same inputs give bitwise the same outputs and gradients (no atomics).
    Differentiable w.r.t. z and directions (gradients come back in their dtypes). Needs CUDA tensors,
    or CPU tensors with TRITON_INTERPRET=1 set before import; raises ValueError / TypeError otherwise.

    fast_trig: the GPU's hardware sin/cos approximations after an explicit range reduction, at every
    knot (fp32 compute only; an absolute error per term of the order of the approximation's instead
    of a few ulps). Off by default. In the interpreter only the range reduction applies."""
    _validate(z, directions, t)
    if z.is_cuda:  # Triton launches on the current device, whatever the tensors' device
        with torch.cuda.device(z.device):
            return FusedECFSums.apply(z, directions, t, bool(fast_trig))
    return FusedECFSums.apply(z, directions, t, bool(fast_trig))


# ----------------------------------------------------------------------------------------------------
# Plain PyTorch reference (the oracle in tests; lewm.sigreg's reference path is this code)
# ----------------------------------------------------------------------------------------------------


def ecf_sums_reference(z: torch.Tensor, directions: torch.Tensor, t: torch.Tensor):
    """Eager oracle: per-(T, M, K) sums over the batch of cos(t_k h) and sin(t_k h), h = z @ A; materialises
    (T, B, M, K) (fine as an oracle, wasteful at scale: `fused_ecf_sums`). Computed in fp32,
    or fp64 when z is fp64 (so that a float64 reference can be built from the same quantised inputs).
    Returns cos_sum, sin_sum (T, M, K)."""
    cdtype = _compute_dtype(z, directions)
    h = torch.matmul(z.to(cdtype), directions.to(cdtype))  # (T, B, M)
    x = h.unsqueeze(-1) * t.to(cdtype)  # (T, B, M, K)
    return torch.cos(x).sum(dim=1), torch.sin(x).sum(dim=1)


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
    come from the `knots_and_weights` cache for z's device and compute dtype (so nothing is held in
    the module or its state_dict, and the kernels take their angle-addition path)."""

    def __init__(self, knots: int = 17, t_max: float = 3.0, fast_trig: bool = False):
        super().__init__()
        if knots < 2:
            raise ValueError(f"knots must be >= 2, got {knots}")
        self.knots, self.t_max, self.fast_trig = knots, t_max, fast_trig

    def forward(self, z: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        t, w, phi = knots_and_weights(self.knots, self.t_max, device=z.device,
                                      dtype=_compute_dtype(z, directions))
        cos_sum, sin_sum = fused_ecf_sums(z, directions, t, fast_trig=self.fast_trig)
        return statistic_from_sums(cos_sum, sin_sum, z.shape[1], w, phi)

    def extra_repr(self) -> str:
        return f"knots={self.knots}, t_max={self.t_max}, fast_trig={self.fast_trig}"
