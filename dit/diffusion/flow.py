"""Rectified flow (Liu et al. 2022; Esser et al. 2024, "Scaling rectified flow transformers", SD3).

x_t = (1 - t) x0 + t * noise, the network predicts the velocity dx_t/dt = noise - x0, and t is
logit-normal: t = sigmoid(m + s z). Larger samples need more noise for the same visual
uncertainty, so t is shifted as t' = a t / (1 + (a - 1) t); SD3 (section 5.3.2) derives
a = sqrt(m / n) for m tokens against a base of n, here n = 256 tokens (256 px at 8x VAE and patch 2).
The timestep embedder sees 1000 t' (as DiT and SD3): its sinusoid spans frequencies down to 1/10000,
which a t in [0, 1] would hardly move.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dit.diffusion.objective import Objective
from dit.diffusion.samplers import Predict, SamplingOptions, flow_euler, flow_heun

SHIFT_BASE_TOKENS = 256
TIMESTEP_SCALE = 1000.0


def shift_time(t: Tensor, shift: Tensor | float) -> Tensor:
    """t' = s t / (1 + (s - 1) t): s > 1 moves samples towards noise, s = 1 leaves t as it is."""
    return shift * t / (1 + (shift - 1) * t)


def flow_times(steps: int, shift: float = 1.0) -> Tensor:
    """``steps + 1`` times from 1 to 0, uniform before the resolution shift (float64)."""
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


class RectifiedFlow(Objective):
    name = "flow"

    def __init__(self, logit_mean: float = 0.0, logit_std: float = 1.0, shift: float | str = "auto"):
        self.logit_mean, self.logit_std, self.shift = logit_mean, logit_std, shift

    def resolution_shift(self, num_tokens: Tensor) -> Tensor | float:
        """The shift of samples of ``num_tokens`` tokens: ``--flow-shift``, or SD3's sqrt(tokens / 256)."""
        if self.shift == "auto":
            return (num_tokens.double() / SHIFT_BASE_TOKENS).sqrt().float()
        return float(self.shift)

    def level(self, z: Tensor, num_tokens: Tensor) -> Tensor:
        return shift_time(torch.sigmoid(self.logit_mean + self.logit_std * z), self.resolution_shift(num_tokens))

    def noisy(self, x0: Tensor, noise: Tensor, level_tok: Tensor) -> Tensor:
        return (1 - level_tok) * x0 + level_tok * noise

    def network_input(self, x: Tensor, level_tok: Tensor) -> Tensor:
        return x

    def timestep(self, level: Tensor) -> Tensor:
        return TIMESTEP_SCALE * level

    def training_target(
        self, x0: Tensor, noise: Tensor, x: Tensor, level_tok: Tensor, level: Tensor
    ) -> tuple[Tensor, Tensor]:
        return noise - x0, torch.ones_like(level)

    def prediction(self, output: Tensor, x: Tensor, level_tok: Tensor) -> Tensor:
        return output  # the velocity

    def sample(self, predict: Predict, noise: Tensor, options: SamplingOptions, num_tokens: int) -> Tensor:
        """Heun or Euler from t = 1 to 0 on the time grid of the training shift for ``num_tokens`` tokens."""
        solvers = {"heun": flow_heun, "euler": flow_euler}
        if options.solver not in solvers:
            raise ValueError(f"unknown flow solver {options.solver!r}: use {' or '.join(solvers)}")
        shift = float(self.resolution_shift(torch.tensor([num_tokens])))
        return solvers[options.solver](predict, noise, flow_times(options.steps, shift))
