"""The samplers on Gaussian data, whose denoiser and ODE solution are known in closed form.

Data x0 ~ N(mu, s^2) per coordinate. EDM: D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu), and the
probability-flow ODE keeps (x - mu) / sqrt(s^2 + sigma^2) fixed, so from sigma_max to 0 it ends at
mu + (x_T - mu) s / sqrt(s^2 + sigma_max^2). Flow: x_t = (1 - t) x0 + t e gives
v(x, t) = -mu + (t - (1 - t) s^2) / ((1 - t)^2 s^2 + t^2) (x - (1 - t) mu), and the ODE keeps
(x - (1 - t) mu) / sqrt((1 - t)^2 s^2 + t^2) fixed: from t = 1 it ends at mu + s x_1.
Heun must converge at second order (the error falls ~4x when the steps double), Euler at first (~2x).
"""

import math

import pytest
import torch

from dit.diffusion.edm import edm_sigmas
from dit.diffusion.flow import flow_times
from dit.diffusion.samplers import edm_heun, flow_euler, flow_heun

MU, S = 0.7, 0.3
NOISE = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def gaussian_denoiser(x, sigma):
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def gaussian_velocity(x, t):
    return -MU + (t - (1 - t) * S**2) / ((1 - t) ** 2 * S**2 + t**2) * (x - (1 - t) * MU)


def _order(errors: list[float]) -> list[float]:
    return [math.log2(a / b) for a, b in zip(errors[:-1], errors[1:])]


def test_edm_heun_is_second_order_and_exact_in_the_limit():
    sigma_max = 80.0
    exact = MU + (NOISE * sigma_max - MU) * S / math.sqrt(S**2 + sigma_max**2)
    errors = [
        (edm_heun(gaussian_denoiser, NOISE, edm_sigmas(n, sigma_min=0.002, sigma_max=sigma_max)) - exact)
        .abs()
        .max()
        .item()
        for n in (16, 32, 64, 128)
    ]
    assert errors[-1] < 1e-3
    assert all(1.9 < p < 2.3 for p in _order(errors)), (errors, _order(errors))


def test_edm_heun_corrects_at_the_next_point():
    """The reference implementations' mistake, the slope re-evaluated at the current point, is first order."""

    def wrong_heun(denoise, noise, sigmas):
        x = noise.double() * sigmas[0]
        for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
            d = (x - denoise(x, sigma)) / sigma
            x = (
                x + (sigma_next - sigma) * (d + (x - denoise(x, sigma)) / sigma) / 2
                if sigma_next > 0
                else x + (sigma_next - sigma) * d
            )
        return x

    exact = MU + (NOISE * 80.0 - MU) * S / math.sqrt(S**2 + 80.0**2)
    ours = [(edm_heun(gaussian_denoiser, NOISE, edm_sigmas(n)) - exact).abs().max().item() for n in (32, 64)]
    theirs = [(wrong_heun(gaussian_denoiser, NOISE, edm_sigmas(n)) - exact).abs().max().item() for n in (32, 64)]
    assert 3 * ours[0] < theirs[0] and _order(theirs)[0] < 1.3  # theirs is Euler twice over: first order


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_samplers_converge_at_their_order(shift):
    exact = MU + S * NOISE
    steps = (32, 64, 128, 256)  # past the few-step regime, where a shift of 3 is not yet asymptotic
    heun = [(flow_heun(gaussian_velocity, NOISE, flow_times(n, shift)) - exact).abs().max().item() for n in steps]
    euler = [(flow_euler(gaussian_velocity, NOISE, flow_times(n, shift)) - exact).abs().max().item() for n in steps]
    assert all(1.5 < p < 2.3 for p in _order(heun)), (heun, _order(heun))
    assert all(0.85 < p < 1.15 for p in _order(euler)), (euler, _order(euler))
    assert heun[-1] < 1e-4


def test_edm_sigmas_follow_karras_eq_5():
    sigmas = edm_sigmas(5, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    assert sigmas[0].item() == pytest.approx(80.0) and sigmas[4].item() == pytest.approx(0.002)
    mid = (80.0 ** (1 / 7) + 0.5 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    assert sigmas[2].item() == pytest.approx(mid) and sigmas[5].item() == 0.0
