"""Sequence packing: per-sample padding, first-fit-decreasing bins, and samples -> :class:`PackedBatch`.

Each sample is padded only to the multiple the parallel layout needs (see
:func:`data.loader.rank_split.pad_multiple`), then whole samples are bin-packed into sequences of at
most ``max_seq_length`` tokens. Packing efficiency is real tokens / (packs x max_seq_length).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from data.loader.sample import EncodedSample
from dit.model.packed import PackedBatch


def padded_length(length: int, multiple: int) -> int:
    """``length`` rounded up to a multiple of ``multiple``."""
    return -(-length // multiple) * multiple


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of indices into ``lengths``, each summing to at most ``capacity``.

    Longest first (ties by index, so the result depends only on the input order); each item goes
    into the first bin it fits. Every item must fit on its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        if lengths[i] > capacity:
            raise ValueError(f"item {i} of length {lengths[i]} exceeds the capacity {capacity}")
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def _cumulative(lengths: list[int]) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return cu


def build_pack(samples: Sequence[EncodedSample]) -> PackedBatch:
    """Concatenate samples, each zero-padded to its ``padded_len``, into one THD micro-batch."""
    cu_seqlens = _cumulative([s.seq_len for s in samples])  # [N+1]
    cu_padded = _cumulative([s.padded_len for s in samples])  # [N+1]
    total = int(cu_padded[-1])
    tokens = samples[0].tokens.new_zeros(total, samples[0].tokens.shape[1])  # [S, pt*ph*pw*C]
    positions = torch.zeros(total, 3, dtype=torch.int64)  # [S, 3]
    loss_mask = torch.zeros(total, dtype=torch.bool)  # [S]
    for s, start in zip(samples, cu_padded.tolist()):
        tokens[start : start + s.seq_len] = s.tokens
        positions[start : start + s.seq_len] = s.positions
        loss_mask[start : start + s.seq_len] = True
    labels = [s.label for s in samples]
    if len({label is None for label in labels}) > 1:
        raise ValueError(f"a pack mixes samples with and without a class label: {[s.__key__ for s in samples]}")
    return PackedBatch(
        tokens=tokens,
        positions=positions,
        loss_mask=loss_mask,
        cu_seqlens=cu_seqlens,
        cu_seqlens_padded=cu_padded,
        text=torch.cat([s.text for s in samples]),  # [K, D]
        cu_seqlens_text=_cumulative([s.text.shape[0] for s in samples]),
        grid_sizes=torch.tensor([s.grid for s in samples], dtype=torch.int64),  # [N, 3]
        keys=[s.__key__ for s in samples],
        # always [N]: images get fps 0, one conditioning value for "not a video" (packs of only images too)
        fps=torch.tensor([s.fps or 0.0 for s in samples], dtype=torch.float32),
        # [N] under class conditioning, where the cooker skips samples without a label; else None
        labels=None if labels[0] is None else torch.tensor(labels, dtype=torch.int64),
    )
