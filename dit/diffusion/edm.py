"""EDM (Karras et al. 2022, "Elucidating the design space of diffusion-based generative models").

The network F is preconditioned: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), with
c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2),
c_noise = ln(sigma) / 4 (sd = sigma_data), ln(sigma) ~ N(P_mean, P_std^2) in training, and the loss weight
lambda = (sigma^2 + sd^2) / (sigma sd)^2 (Table 1 of the paper).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dit.diffusion.objective import Objective
from dit.diffusion.samplers import Predict, SamplingOptions, edm_heun


def edm_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """Karras et al. eq. 5: ``steps`` levels from sigma_max to sigma_min, then 0 (float64)."""
    i = torch.arange(steps, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + i / max(steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


class Preconditioning(NamedTuple):
    c_skip: Tensor
    c_out: Tensor
    c_in: Tensor
    c_noise: Tensor


class EDM(Objective):
    name = "edm"

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5):
        self.p_mean, self.p_std, self.sigma_data = p_mean, p_std, sigma_data

    def level(self, z: Tensor, num_tokens: Tensor) -> Tensor:
        return torch.exp(self.p_mean + self.p_std * z)

    def preconditioning(self, sigma: Tensor) -> Preconditioning:
        sd2 = self.sigma_data**2
        total = sigma**2 + sd2
        return Preconditioning(
            c_skip=sd2 / total,
            c_out=sigma * self.sigma_data / total.sqrt(),
            c_in=1 / total.sqrt(),
            c_noise=sigma.log() / 4,
        )

    def loss_weight(self, sigma: Tensor) -> Tensor:
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def noisy(self, x0: Tensor, noise: Tensor, level_tok: Tensor) -> Tensor:
        return x0 + level_tok * noise

    def network_input(self, x: Tensor, level_tok: Tensor) -> Tensor:
        return self.preconditioning(level_tok).c_in * x

    def timestep(self, level: Tensor) -> Tensor:
        return self.preconditioning(level).c_noise

    def denoised(self, output: Tensor, x: Tensor, level_tok: Tensor) -> Tensor:
        """D(x; sigma) from the raw network output F."""
        c = self.preconditioning(level_tok)
        return c.c_skip * x + c.c_out * output

    def training_target(
        self, x0: Tensor, noise: Tensor, x: Tensor, level_tok: Tensor, level: Tensor
    ) -> tuple[Tensor, Tensor]:
        c = self.preconditioning(level_tok)
        weight = self.loss_weight(level) * self.preconditioning(level).c_out ** 2  # = 1 up to rounding
        return (x0 - c.c_skip * x) / c.c_out, weight

    def prediction(self, output: Tensor, x: Tensor, level_tok: Tensor) -> Tensor:
        return self.denoised(output, x, level_tok)

    def sample(self, predict: Predict, noise: Tensor, options: SamplingOptions, num_tokens: int) -> Tensor:
        """Heun (Algorithm 2) down Karras' levels; the size of a sample changes nothing."""
        return edm_heun(predict, noise, edm_sigmas(options.steps, options.sigma_min, options.sigma_max, options.rho))
