"""The masked loss that is the same under any parallel layout and any split into micro-batches.

Loss of a global batch = mean over its samples of (mean over the sample's real tokens of the per-token
error). Samples of very different lengths therefore weigh the same, and neither packing, context
parallelism nor the micro-batch split changes the value or the gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from dit.model.packed import PackedBatch, cp_token_samples


def per_sample_loss(prediction: Tensor, target: Tensor, batch: PackedBatch, cp_group: dist.ProcessGroup) -> Tensor:
    """``[N]`` mean squared error of each sample over its real tokens, whole samples under CP.

    prediction, target: ``[s, D]``, this CP rank's tokens. Each rank's per-sample sums are all-reduced over
    CP for the value, while the gradient flows through this rank's tokens only: Megatron's schedule scales
    the loss by the CP size and its DDP averages gradients over CP, which together give the exact gradient.
    """
    # Mask the difference itself: pad rows may hold anything, even NaN, and neither their value nor a
    # 0 * NaN in the backward may reach the real tokens.
    assert batch.loss_mask is not None  # the last stage's pack has its tokens
    diff = torch.where(batch.loss_mask[:, None], prediction.float() - target.float(), 0.0)  # [s, D]
    per_token = diff.square().mean(dim=-1)  # [s]
    sample = cp_token_samples(batch.cu_seqlens_padded, cp_group.size())  # [s], host
    sample = sample.to(per_token.device, non_blocking=True)
    sums = per_token.new_zeros(batch.num_samples).index_add(0, sample, per_token)  # [N], this rank's share
    if cp_group.size() > 1:
        whole = sums.detach().clone()
        dist.all_reduce(whole, group=cp_group)
        sums = sums + (whole - sums.detach())
    counts = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).to(sums, non_blocking=True)  # real tokens of each sample
    return sums / counts


def microbatch_loss(
    prediction: Tensor,
    *,
    target: Tensor,
    batch: PackedBatch,
    cp_group: dist.ProcessGroup,
    samples_per_microbatch: float,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Megatron's ``loss_func`` (bind all but ``prediction`` with ``functools.partial``).

    ``samples_per_microbatch`` = samples in the global batch / (micro-batches x DP size). Megatron's
    schedule divides each micro-batch loss by the number of micro-batches and DDP averages over DP, so
    the step's gradient is that of the mean over all samples of the global batch. The logged value is
    ``[sum of sample losses, samples]`` so that summing it over micro-batches and DP gives that mean.
    ``weights`` ``[N]`` scale each sample's loss (the objective's loss weight).
    """
    losses = per_sample_loss(prediction, target, batch, cp_group)  # [N]
    if weights is not None:
        losses = losses * weights
    logged = torch.stack([losses.sum().detach(), losses.new_tensor(float(batch.num_samples))])
    return losses.sum() / samples_per_microbatch, {"loss": logged}
