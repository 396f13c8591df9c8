"""SIGReg: the Sketched Isotropic Gaussian Regulariser (reference path + dispatch).

For embeddings z of shape (T, B, D) and M unit directions u_m (columns of A, (D, M)), project
h = <z_tb, u_m> and compare the empirical characteristic function of h over the batch with the
N(0, 1) one at K knots t_k on [0, t_max] (Epps-Pulley):

    Re_k = mean_b cos(t_k h_b),   Im_k = mean_b sin(t_k h_b)
    EP(t, m) = B * sum_k w_k [(Re_k - exp(-t_k^2 / 2))^2 + Im_k^2]
    w_k = c_k * dt * exp(-t_k^2 / 2),  c = (1, 2, ..., 2, 1)   (trapezoid doubled: the integrand is even)
    SIGReg = mean over t and m of EP(t, m)

The statistic needs only the per-(t, m, k) sums of cos and sin over the batch. That is what makes
the distributed version exact (all-reduce the sums, divide by the global batch) and what the fused
Triton kernel accumulates without materialising (T, B, M, K).
"""
from __future__ import annotations

import math
import sys
import types

import torch
import torch.nn as nn
from lewm_kernels.sigreg import build_knots, ecf_sums_reference, statistic_from_sums
from lewm_kernels.sigreg import knots_and_weights as _cached_knots

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio mixing constant for step seeds


def knots_and_weights(knots: int = 17, t_max: float = 3.0, device=None, dtype=torch.float32):
    """(K,) knots t_k on [0, t_max], (K,) weights w_k (trapezoid doubled times the window),
    (K,) target exp(-t_k^2/2) (the N(0,1) characteristic function): lewm_kernels.sigreg.build_knots."""
    if knots < 2:
        raise ValueError(f"sigreg.knots must be >= 2, got {knots}")
    return build_knots(knots, t_max, device, dtype)


def cached_knots_and_weights(knots: int, t_max: float, device, dtype, impl: str = "eager"):
    """knots_and_weights, computed once per (device, dtype, knots, t_max) instead of at every step (treat
    the tensors as read-only): the kernels' cache, whose tensors the fused kernels recognise as equally
    spaced knots (their fast path). Not cached while torch.compile traces or a CUDA graph is captured."""
    if knots < 2:
        raise ValueError(f"sigreg.knots must be >= 2, got {knots}")
    return _cached_knots(knots, t_max, device=device, dtype=dtype)


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed for step `step`: the same on every rank, computed on the host with no
    device synchronisation (both numbers are Python ints)."""
    return (int(seed) * 1_000_003 + int(step) * _SEED_MIX) % (2**63 - 1)


def draw_directions(dim: int, num_proj: int, *, seed: int | None = None, device=None,
                    dtype=torch.float32, generator: torch.Generator | None = None) -> torch.Tensor:
    """(D, M) matrix of unit-norm Gaussian directions (columns).

    With `seed`, drawn from a private generator on `device` (reproducible, identical on every rank);
    otherwise from `generator` or the global RNG."""
    if seed is not None:
        generator = torch.Generator(device=device if device is not None else "cpu")
        generator.manual_seed(int(seed))
    A = torch.randn(dim, num_proj, device=device, dtype=torch.float32, generator=generator)
    A = A / A.norm(dim=0, keepdim=True)
    return A.to(dtype)


# The reference sums and statistic are the kernels' own PyTorch oracle (lewm_kernels/sigreg.py), one copy:
#   ecf_sums(z (T, B, D), directions (D, M), t (K,)) -> cos_sum, sin_sum (T, M, K): materialises (T, B, M, K)
#   statistic_from_sums(cos_sum, sin_sum, n, w, phi) -> EP averaged over (T, M)
ecf_sums = ecf_sums_reference


def _acc_dtype(z: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (for gradcheck); everything else accumulates in float32."""
    return torch.float64 if z.dtype == torch.float64 else torch.float32


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums the incoming gradients over ranks too.

    Every rank ends with the same global statistic; DDP then averages parameter gradients over
    ranks, and the all-reduced backward makes that average equal to the gradient of the global
    statistic (world * dL/ds_r, averaged over world ranks)."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist
        g = g.clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g


def _distributed() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sigreg_tbd(z: torch.Tensor, directions: torch.Tensor, knots: int = 17, t_max: float = 3.0,
               impl: str = "eager", distributed: bool | None = None) -> torch.Tensor:
    """SIGReg of (T, B, D) embeddings on fixed (D, M) directions. Returns a float32 scalar
    (float64 for float64 inputs).

    impl: "eager" (this file's reference), "triton" (the fused kernel), "auto" (triton on CUDA).
    distributed: all-reduce the sums over the process group (default: when one is initialised)."""
    if z.dim() != 3:
        raise ValueError(f"sigreg expects (T, B, D) embeddings, got shape {tuple(z.shape)}")
    if directions.dim() != 2 or directions.shape[0] != z.shape[-1]:
        raise ValueError(
            f"sigreg directions must be (D={z.shape[-1]}, M), got shape {tuple(directions.shape)}")
    if directions.device != z.device:
        raise ValueError(f"sigreg directions are on {directions.device} but embeddings on {z.device}")
    with torch.autocast(z.device.type, enabled=False):  # the statistic is always computed in fp32
        return _sigreg_tbd(z, directions, knots, t_max, impl, distributed)


def _sigreg_tbd(z, directions, knots, t_max, impl, distributed):
    T, B, D = z.shape
    if impl == "auto":
        impl = "triton" if z.is_cuda else "eager"
    t, w, phi = cached_knots_and_weights(knots, t_max, z.device, _acc_dtype(z), impl)
    if impl == "triton":
        cos_sum, sin_sum = _fused_sums(z, directions, t)
    elif impl == "eager":
        cos_sum, sin_sum = ecf_sums(z, directions, t)
    else:
        raise ValueError(f"unknown sigreg.impl '{impl}' (expected eager, triton or auto)")
    if distributed is None:
        distributed = _distributed()
    n = B
    if distributed:
        import torch.distributed as dist
        sums = _AllReduceSum.apply(torch.stack([cos_sum, sin_sum]))
        cos_sum, sin_sum = sums[0], sums[1]
        n = B * dist.get_world_size()
    return statistic_from_sums(cos_sum, sin_sum, n, w, phi)


@torch.compiler.disable
def _fused_sums(z, directions, t):
    """The fused kernel, called eagerly even inside a torch.compile'd step (a graph break around one
    hand-written kernel pair, rather than asking Dynamo to trace the launcher). Inside a captured CUDA
    graph the launches are recorded like any other kernel."""
    from lewm_kernels.sigreg import fused_ecf_sums
    return fused_ecf_sums(z, directions, t)


def sigreg(z: torch.Tensor, directions: torch.Tensor | None = None, *, num_proj: int = 1024,
           knots: int = 17, t_max: float = 3.0, impl: str = "eager", seed: int | None = None,
           distributed: bool | None = None) -> torch.Tensor:
    """SIGReg of (B, T, D) embeddings (the public API; statistics are per time step, over B).

    directions: (D, M) unit columns, or None to draw `num_proj` fresh ones (from `seed` if given,
    else the global RNG)."""
    if z.dim() == 2:
        z = z.unsqueeze(1)
    if z.dim() != 3:
        raise ValueError(f"sigreg expects (B, T, D) or (B, D) embeddings, got shape {tuple(z.shape)}")
    if directions is None:
        directions = draw_directions(z.shape[-1], num_proj, seed=seed, device=z.device)
    return sigreg_tbd(z.transpose(0, 1), directions, knots, t_max, impl=impl, distributed=distributed)


class SIGReg(nn.Module):
    """The training-time regulariser: fresh directions every step, seeded from (seed, step) so that
    every DDP rank draws the same ones without talking, and a resumed run draws the same ones again.

    forward(z (T, B, D), step) -> scalar."""

    def __init__(self, dim: int, num_proj: int = 1024, knots: int = 17, t_max: float = 3.0,
                 impl: str = "auto", seed: int = 0):
        super().__init__()
        self.dim, self.num_proj, self.knots, self.t_max = dim, num_proj, knots, t_max
        self.impl, self.seed = impl, seed

    def directions(self, step: int, device) -> torch.Tensor:
        return draw_directions(self.dim, self.num_proj, seed=step_seed(self.seed, step), device=device)

    def forward(self, z: torch.Tensor, step: int = 0, directions: torch.Tensor | None = None) -> torch.Tensor:
        if directions is None:
            directions = self.directions(step, z.device)
        return sigreg_tbd(z, directions, self.knots, self.t_max, impl=self.impl)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_proj={self.num_proj}, knots={self.knots}, t_max={self.t_max}, impl={self.impl}"


def effective_rank(z: torch.Tensor, floor: float = 1e-2) -> float:
    """exp(entropy of the normalised singular values) of centred (N, D) embeddings (Roy & Vetterli
    2007): D for an isotropic cloud, 1 for a line.

    The entropy form is scale-invariant, so a collapsed embedding (every z nearly the same point)
    would report the rank of its numerical noise. Principal directions whose standard deviation is
    below `floor` (SIGReg's target scale is 1) therefore count as empty: a point collapse has rank 0."""
    z = z.reshape(-1, z.shape[-1]).double()
    z = z - z.mean(0, keepdim=True)
    s = torch.linalg.svdvals(z)
    s = s[s / math.sqrt(max(1, z.shape[0] - 1)) >= floor]
    if s.numel() == 0 or float(s.sum()) <= 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(math.exp(float(-(p * p.log()).sum())))


class _CallableModule(types.ModuleType):
    """`lewm.sigreg` is this module, and calling it is `sigreg(...)`: `lewm.sigreg(z, directions)` and
    `lewm.sigreg.draw_directions(...)` both work (the package exports the module, not a function that
    would hide it)."""

    def __call__(self, *args, **kwargs):
        return sigreg(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
