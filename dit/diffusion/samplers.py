"""ODE samplers: EDM's Heun (Karras et al. 2022, Algorithm 2) and Euler / Heun on the rectified-flow ODE.

The noise grids live with their objectives (``edm.edm_sigmas``, ``flow.flow_times``), whose ``sample`` method
picks the integrator. A sampler calls ``model(x, level)`` with the whole batch at one noise level and gets the
objective's prediction: the denoised D(x; sigma) for EDM, the velocity v(x, t) for flow (see
``dit.diffusion.guidance`` for the network behind it, with classifier-free guidance).
The EDM correction is evaluated at (x_next, sigma_next), as in the paper and NVlabs/edm's
``generate.py``, and skipped on the last step, which goes to sigma = 0 (NeMo and DFM evaluate it at
(x_hat, sigma_hat)). The flow samplers walk t from 1 (noise) to 0 on the training shift's grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

Predict = Callable[[Tensor, float], Tensor]  # (x, sigma or t) -> D(x; sigma) or v(x, t)


@dataclass(frozen=True)
class SamplingOptions:
    """How to walk from noise to data: each objective reads its own fields (``dit.generate``'s flags)."""

    steps: int = 32
    solver: str = "heun"  # flow: "heun" or "euler"; EDM always takes Heun
    sigma_min: float = 0.002  # EDM: the last level before 0
    sigma_max: float = 80.0  # EDM: the first level
    rho: float = 7.0  # EDM: the spacing exponent of the levels


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
