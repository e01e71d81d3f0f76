"""Per-sample draws: every sample of a pack gets its own noise level, noise and guidance dropout.

Each sample's numbers come from :func:`sample_generator` ``(seed, iteration, key)`` in one fixed
order: z (the noise level, through ``Objective.level``), u (guidance dropout), then the noise of
the sample's real tokens, drawn for the whole sample. Every TP, PP and CP rank of a replica, any
parallel layout and a resumed run therefore draw the same numbers; a CP rank keeps the rows it
holds. (NeMo and DFM draw one level per pack: 32 images of a pack would share one timestep.)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from dit.model.packed import PackedBatch, thd_partition_indices


def sample_generator(seed: int, iteration: int, key: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator for one sample's diffusion draws (sigma or t, noise, text drop).

    It depends only on (seed, iteration, sample key), so a resumed run or another parallel layout
    draws exactly the same numbers for the same sample.
    """
    digest = hashlib.blake2b(f"{seed}/{iteration}/{key}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


@dataclass
class SampleDraws:
    z: Tensor  # [N] standard normal, the noise level of each sample
    dropped: Tensor  # [N] bool, the sample trains unconditionally (guidance dropout)
    noise: Tensor | None  # [s, D] this CP rank's rows of each sample's noise (0 on pads); None without tokens


def draw(
    batch: PackedBatch, *, seed: int, iteration: int, drop_prob: float, cp_size: int = 1, cp_rank: int = 0
) -> SampleDraws:
    """The draws of ``batch`` (this rank's share of a pack) at ``iteration``, on the CPU."""
    n = batch.num_samples
    z, u = torch.empty(n), torch.empty(n)
    cu, cu_padded = batch.cu_seqlens.tolist(), batch.cu_seqlens_padded.tolist()
    whole = None if batch.tokens is None else torch.zeros(cu_padded[-1], batch.tokens.shape[1])  # [S, D]
    for i, key in enumerate(batch.keys):
        g = sample_generator(seed, iteration, key)
        z[i] = torch.randn((), generator=g)
        u[i] = torch.rand((), generator=g)
        if whole is not None:
            start = cu_padded[i]
            whole[start : start + cu[i + 1] - cu[i]] = torch.randn(cu[i + 1] - cu[i], whole.shape[1], generator=g)
    noise = whole
    if whole is not None and cp_size > 1:
        noise = whole[thd_partition_indices(batch.cu_seqlens_padded, cp_size, cp_rank)]  # [S/cp, D]
    return SampleDraws(z=z, dropped=u < drop_prob, noise=noise)


def drop_conditioning(batch: PackedBatch, dropped: Tensor, null_class: int) -> PackedBatch:
    """The batch with the dropped samples' conditioning (``dropped`` ``[N]`` bool, on the host as drawn)
    replaced by the null conditioning.

    Text becomes zeros: every key and value of cross-attention is then the projection's bias, so the
    output does not depend on the text's length, and the sampler's one-row zero text is the same
    condition. A class label becomes ``null_class`` (= num_classes, the embedding's extra row).
    """
    if not bool(dropped.any()):  # host: the draws
        return batch
    text_lengths = (batch.cu_seqlens_text[1:] - batch.cu_seqlens_text[:-1]).long()  # [N], host (the layout)
    text_sample = torch.repeat_interleave(
        torch.arange(batch.num_samples), text_lengths, output_size=batch.text.shape[0]
    )  # [K]
    text = batch.text.masked_fill(dropped[text_sample][:, None].to(batch.text.device), 0.0)  # [K, D_text]
    labels = None if batch.labels is None else batch.labels.masked_fill(dropped.to(batch.labels.device), null_class)
    return replace(batch, text=text, labels=labels)
