"""SIGReg (reference path): the formula, its behaviour on Gaussian vs collapsed data, its gradient."""
import math

import numpy as np
import pytest
import torch

import lewm
from lewm.sigreg import SIGReg, draw_directions, knots_and_weights, sigreg_tbd, step_seed


def sigreg_float64_numpy(z, A, knots=17, t_max=3.0):
    """An independent float64 implementation, written from the formula with numpy loops over knots."""
    z, A = np.asarray(z, np.float64), np.asarray(A, np.float64)
    T, B, _ = z.shape
    t = np.linspace(0.0, t_max, knots)
    dt = t_max / (knots - 1)
    total = 0.0
    for tau in range(T):
        h = z[tau] @ A  # (B, M)
        ep = np.zeros(A.shape[1])
        for k in range(knots):
            c = 1.0 if k in (0, knots - 1) else 2.0
            w = c * dt * math.exp(-t[k] ** 2 / 2)
            re = np.cos(t[k] * h).mean(0)
            im = np.sin(t[k] * h).mean(0)
            ep += w * ((re - math.exp(-t[k] ** 2 / 2)) ** 2 + im ** 2)
        total += (B * ep).mean()
    return total / T


def test_weights_are_doubled_trapezoid_times_window():
    t, w, phi = knots_and_weights(17, 3.0, dtype=torch.float64)
    assert t[0] == 0 and t[-1] == 3 and len(t) == 17
    dt = 3 / 16
    assert torch.allclose(w[0], torch.tensor(dt, dtype=torch.float64))
    assert torch.allclose(w[1], 2 * dt * torch.exp(-t[1] ** 2 / 2))
    # the doubled trapezoid integrates exp(-t^2) (even) over [-3, 3] ~ sqrt(pi)
    assert abs(float((w * phi).sum()) - math.sqrt(math.pi)) < 1e-3


@pytest.mark.parametrize("T,B,D,M", [(1, 7, 5, 3), (4, 33, 16, 24), (3, 128, 12, 50)])
def test_matches_independent_float64(T, B, D, M):
    g = torch.Generator().manual_seed(T * 100 + B)
    z = torch.randn(T, B, D, generator=g) * 1.3 + 0.2
    A = draw_directions(D, M, generator=g)
    ours = float(sigreg_tbd(z.double(), A.double()))
    ref = sigreg_float64_numpy(z.numpy(), A.numpy())
    assert abs(ours - ref) <= 1e-6 * abs(ref), (ours, ref)
    ours32 = float(sigreg_tbd(z, A))
    assert abs(ours32 - ref) <= 1e-4 * abs(ref)


def test_public_api_takes_btd_and_optional_directions():
    z = torch.randn(64, 4, 16)
    A = draw_directions(16, 32, seed=1)
    a = lewm.sigreg(z, A)
    b = sigreg_tbd(z.transpose(0, 1), A)
    assert torch.allclose(a, b)
    c1 = lewm.sigreg(z, None, num_proj=32, seed=5)
    c2 = lewm.sigreg(z, None, num_proj=32, seed=5)
    assert torch.equal(c1, c2)  # seeded draws are reproducible
    assert torch.allclose(A.norm(dim=0), torch.ones(32))  # unit columns


def test_near_zero_for_gaussian_large_for_collapse():
    g = torch.Generator().manual_seed(0)
    D, M = 32, 256
    A = draw_directions(D, M, generator=g)
    gauss = torch.randn(2, 4096, D, generator=g)
    s_gauss = float(sigreg_tbd(gauss, A))
    # The statistic is B times a squared distance between characteristic functions. Under H0 that
    # distance is O(1/B), so the statistic tends to its H0 mean sum_k w_k (1 - phi_k^2) (~1.03),
    # while the distance itself (statistic / B) goes to 0.
    _, w, phi = knots_and_weights(17, 3.0, dtype=torch.float64)
    h0_mean = float((w * (1 - phi ** 2)).sum())
    assert abs(s_gauss - h0_mean) < 0.15 * h0_mean, (s_gauss, h0_mean)
    assert s_gauss / 4096 < 1e-3
    collapsed = torch.zeros(2, 4096, D) + 0.3
    lowrank = torch.randn(2, 4096, 2, generator=g) @ torch.randn(2, D, generator=g)
    scaled = gauss * 4.0
    for bad in (collapsed, lowrank, scaled):
        assert float(sigreg_tbd(bad, A)) > 50 * s_gauss


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    A = draw_directions(5, 7, generator=g).double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z, A: sigreg_tbd(z, A), (z, A), eps=1e-6, atol=1e-6)


def test_module_draws_per_step_directions_reproducibly():
    reg = SIGReg(16, num_proj=8, seed=3)
    a0, a0b, a1 = reg.directions(0, "cpu"), reg.directions(0, "cpu"), reg.directions(1, "cpu")
    assert torch.equal(a0, a0b) and not torch.equal(a0, a1)
    assert step_seed(3, 0) != step_seed(3, 1) != step_seed(4, 1)
    z = torch.randn(4, 32, 16)
    assert torch.equal(reg(z, step=2), reg(z, step=2))


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\(T, B, D\)"):
        sigreg_tbd(torch.zeros(4, 5), torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"directions must be \(D=5, M\)"):
        sigreg_tbd(torch.zeros(2, 4, 5), torch.zeros(6, 3))
    with pytest.raises(ValueError, match="unknown sigreg.impl"):
        sigreg_tbd(torch.zeros(2, 4, 5), torch.zeros(5, 3), impl="cuda-magic")


def test_lewm_sigreg_is_the_module_and_callable():
    """`import lewm.sigreg` keeps the submodule reachable (the package once bound the function over it)."""
    import lewm.sigreg
    assert callable(lewm.sigreg) and hasattr(lewm.sigreg, "draw_directions")
    z = torch.randn(16, 2, 8, generator=torch.Generator().manual_seed(0))
    A = lewm.sigreg.draw_directions(8, 32, seed=3)
    assert torch.equal(lewm.sigreg(z, A), lewm.sigreg.sigreg(z, A))
