"""ODE samplers: EDM's Heun (Karras et al. 2022, Algorithm 2) and Euler / Heun on the rectified-flow ODE.

A sampler calls ``model(x, level)`` with the whole batch at one noise level and gets the objective's
prediction: the denoised D(x; sigma) for EDM, the velocity v(x, t) for flow (see
``dit.diffusion.guidance`` for the network behind it, with classifier-free guidance).
The EDM correction is evaluated at (x_next, sigma_next), as in the paper and NVlabs/edm's
``generate.py``, and skipped on the last step, which goes to sigma = 0 (NeMo and DFM evaluate it at
(x_hat, sigma_hat)). The flow samplers walk t from 1 (noise) to 0 on the training shift's grid.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dit.diffusion.flow import shift_time

Predict = Callable[[Tensor, float], Tensor]  # (x, sigma or t) -> D(x; sigma) or v(x, t)


def edm_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """Karras et al. eq. 5: ``steps`` levels from sigma_max to sigma_min, then 0 (float64)."""
    i = torch.arange(steps, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + i / max(steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def edm_heun(denoise: Predict, noise: Tensor, sigmas: Tensor) -> Tensor:
    """Deterministic Heun from x = noise * sigma_0 down the ``sigmas`` (ending at 0)."""
    x = noise.double() * sigmas[0]
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        d = (x - denoise(x, sigma)) / sigma
        x_next = x + (sigma_next - sigma) * d
        if sigma_next > 0:  # second order: the slope at (x_next, sigma_next)
            d_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
            x_next = x + (sigma_next - sigma) * (d + d_next) / 2
        x = x_next
    return x


def flow_times(steps: int, shift: float = 1.0) -> Tensor:
    """``steps + 1`` times from 1 to 0, uniform before the resolution shift (float64)."""
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def flow_euler(velocity: Predict, noise: Tensor, times: Tensor) -> Tensor:
    x = noise.double()
    for t, t_next in zip(times[:-1].tolist(), times[1:].tolist()):
        x = x + (t_next - t) * velocity(x, t)
    return x


def flow_heun(velocity: Predict, noise: Tensor, times: Tensor) -> Tensor:
    """Heun on dx/dt = v: the mean of the slopes at both ends of each step (v is defined at t = 0 too)."""
    x = noise.double()
    for t, t_next in zip(times[:-1].tolist(), times[1:].tolist()):
        v = velocity(x, t)
        x_euler = x + (t_next - t) * v
        x = x + (t_next - t) * (v + velocity(x_euler, t_next)) / 2
    return x
