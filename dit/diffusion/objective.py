"""What every objective provides, in terms of one network call ``F(x_in; timestep)``.

Both objectives draw a sample's noise level from one standard-normal number ``z`` (EDM: log-normal
sigma; flow: logit-normal t), so training and the stratified validation levels share one map
(:meth:`Objective.level`). Training regresses the raw network output onto
:meth:`Objective.training_target` with a per-sample weight, which is the paper's loss rewritten in
terms of ``F`` (for EDM: lambda * |D - x0|^2 = lambda * c_out^2 * |F - (x0 - c_skip x) / c_out|^2).
Samplers call the network the same way (:meth:`Objective.network_input`, :meth:`Objective.timestep`) and
integrate :meth:`Objective.prediction` on the objective's own grid (:meth:`Objective.sample`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor

from dit.diffusion.samplers import Predict, SamplingOptions


class Objective(ABC):
    """A diffusion objective. Levels are per sample ``[N]``; ``*_tok`` arguments are per token ``[s, 1]``."""

    name: str

    @abstractmethod
    def level(self, z: Tensor, num_tokens: Tensor) -> Tensor:
        """Noise level (sigma or t) ``[N]`` of standard-normal draws ``z`` ``[N]`` for samples of
        ``num_tokens`` real tokens ``[N]`` (the flow's resolution shift reads them)."""

    @abstractmethod
    def noisy(self, x0: Tensor, noise: Tensor, level_tok: Tensor) -> Tensor:
        """The corrupted tokens x at each token's level."""

    @abstractmethod
    def network_input(self, x: Tensor, level_tok: Tensor) -> Tensor:
        """What the patch embedding sees ``[s, D]``."""

    @abstractmethod
    def timestep(self, level: Tensor) -> Tensor:
        """What the timestep embedder sees ``[N]``."""

    @abstractmethod
    def training_target(
        self, x0: Tensor, noise: Tensor, x: Tensor, level_tok: Tensor, level: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(regression target of the raw network output ``[s, D]``, loss weight per sample ``[N]``)."""

    @abstractmethod
    def prediction(self, output: Tensor, x: Tensor, level_tok: Tensor) -> Tensor:
        """What the sampler integrates, from the raw network output at ``x``."""

    @abstractmethod
    def sample(self, predict: Predict, noise: Tensor, options: SamplingOptions, num_tokens: int) -> Tensor:
        """Data from standard-normal ``noise`` (float64) by ``predict`` (:meth:`prediction` of the network) on
        this objective's grid, for samples of ``num_tokens`` tokens."""
