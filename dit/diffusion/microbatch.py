"""A training micro-batch: a pack plus its draws, turned into what the network and the loss need."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dit.diffusion.draws import SampleDraws, drop_conditioning
from dit.diffusion.objective import Objective
from dit.model.packed import PackedBatch, cp_token_samples


@dataclass
class DiffusionMicroBatch:
    """One micro-batch of a step; s = tokens this CP rank holds, N = samples in the pack."""

    batch: PackedBatch  # conditioning after guidance dropout; tokens are the clean latents x0
    inputs: Tensor | None  # [s, D] network input (None on stages without tokens)
    timesteps: Tensor  # [N] timestep-embedder input, one per sample
    target: Tensor | None  # [s, D] regression target of the network output
    weights: Tensor  # [N] loss weight of each sample
    level: Tensor  # [N] sigma or t of each sample (for logging and tests)
    samples_per_microbatch: float  # samples of the global batch / (micro-batches x DP), see dit.diffusion.loss


def diffusion_microbatch(
    objective: Objective,
    batch: PackedBatch,
    draws: SampleDraws,
    *,
    cp_size: int,
    null_class: int,
    samples_per_microbatch: float,
) -> DiffusionMicroBatch:
    """Corrupt ``batch``'s latents at each sample's own level and drop its conditioning where drawn."""
    device = batch.positions.device  # the layout (cu_seqlens) stays on the host, see PackedBatch.to
    num_tokens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).to(device, non_blocking=True)  # [N] real tokens
    level = objective.level(draws.z.to(device), num_tokens)  # [N]
    conditioned = drop_conditioning(batch, draws.dropped, null_class)
    inputs = target = None
    weights = torch.ones_like(level)
    if batch.tokens is not None:
        assert draws.noise is not None  # drawn wherever the pack has tokens
        token_sample = cp_token_samples(batch.cu_seqlens_padded, cp_size).to(device, non_blocking=True)  # [s]
        level_tok = level[token_sample][:, None]  # [s, 1]
        x0, noise = batch.tokens.float(), draws.noise.to(device)
        x = objective.noisy(x0, noise, level_tok)
        inputs = objective.network_input(x, level_tok)
        target, weights = objective.training_target(x0, noise, x, level_tok, level)
    return DiffusionMicroBatch(
        batch=conditioned,
        inputs=inputs,
        timesteps=objective.timestep(level),
        target=target,
        weights=weights,
        level=level,
        samples_per_microbatch=samples_per_microbatch,
    )
