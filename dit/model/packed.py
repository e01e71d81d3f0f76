"""The packed (THD) micro-batch that flows from the data path into the model and the loss.

A pack holds N samples of different lengths one after another. Sample i owns the padded token
range ``cu_seqlens_padded[i]:cu_seqlens_padded[i+1]`` of which the first ``seqlen_i`` tokens are
real. Under context parallelism every CP rank holds only its load-balanced share of each sample
(:func:`thd_partition_indices`), while the ``cu_seqlens`` stay those of the whole pack, as in
Transformer Engine's THD convention. The text side (cross-attention keys) is never split.

Per-sample work on a pack goes by runs of consecutive samples with equal row counts (:class:`SampleRun`):
samples of a run share one reshaped view ``[count, rows, ...]``, one fused call per run instead of a Python
step and a kernel launch per sample. First-fit-decreasing packing puts equal lengths side by side, so a
pack of same-size images is a single run.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

# The pack's layout: read on the host (sizes, offsets, Python loops); kernels get device copies of what they need.
LAYOUT = frozenset({"cu_seqlens", "cu_seqlens_padded", "cu_seqlens_text", "grid_sizes"})


@dataclass
class PackedBatch:
    """One micro-batch. S = tokens this rank holds, N = samples in the pack, K = text tokens."""

    tokens: torch.Tensor | None  # [S, pt*ph*pw*C] patchified latent (clean, x0); None on middle PP stages
    positions: torch.Tensor  # [S, 3] int64 (t, h, w) patch coordinates; 0 on pad tokens
    loss_mask: torch.Tensor | None  # [S] bool, True on real tokens; None on middle PP stages
    cu_seqlens: torch.Tensor  # [N+1] int32, real latent tokens of each sample
    cu_seqlens_padded: torch.Tensor  # [N+1] int32, padded latent tokens of each sample
    text: torch.Tensor  # [K, D] text embeddings of the N samples, concatenated
    cu_seqlens_text: torch.Tensor  # [N+1] int32
    grid_sizes: torch.Tensor  # [N, 3] int64 latent grid (T, H, W) in patches, for unpatchify
    keys: list[str] = field(default_factory=list)  # per-sample keys: logging and reproducible draws
    fps: torch.Tensor | None = None  # [N] float frame rate, 0 for images (the data path always fills it)
    labels: torch.Tensor | None = None  # [N] int64, class conditioning (None: text conditioning)

    @property
    def num_samples(self) -> int:
        return self.cu_seqlens.numel() - 1

    def to(self, device: torch.device | str) -> PackedBatch:
        """This host pack's per-token and per-sample data on ``device``; the layout (``LAYOUT``) stays on the
        host, where the attention parameters, the draws and the loss read it without a device-to-host sync."""
        moved = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in LAYOUT}
        tensors: dict[str, Any] = {
            k: v.to(device, non_blocking=True) for k, v in moved.items() if isinstance(v, torch.Tensor)
        }
        return replace(self, **tensors)


def thd_partition_indices(cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Indices (into the whole pack) of the tokens CP rank ``cp_rank`` holds.

    Each sample's padded range is cut into ``2*cp_size`` equal chunks and rank r keeps chunks r and
    ``2*cp_size-1-r``, which balances causal and non-causal attention work. This is the scheme of
    Transformer Engine's ``thd_get_partitioned_indices``; with CP, lengths must be multiples of 2*cp_size.
    """
    if cp_size == 1:  # the whole pack, whatever its lengths (without CP, samples need no alignment)
        return torch.arange(int(cu_seqlens_padded[-1]))
    bounds = cu_seqlens_padded.tolist()
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        length = end - start
        if length % (2 * cp_size):
            raise ValueError(f"padded sample length {length} is not a multiple of 2*cp = {2 * cp_size}")
        chunk = length // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            parts.append(torch.arange(start + c * chunk, start + (c + 1) * chunk))
    if not parts:
        return torch.empty(0, dtype=torch.long)
    return torch.cat(parts)


def gather_cp_shares(rows: torch.Tensor, cu_seqlens_padded: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Every CP rank's share ``[S/cp, ...]`` of a pack (no gradient) -> the whole pack ``[S, ...]`` in pack order."""
    cp = dist.get_world_size(group)
    parts = [torch.empty_like(rows) for _ in range(cp)]
    dist.all_gather(parts, rows.contiguous(), group=group)
    order = torch.cat([thd_partition_indices(cu_seqlens_padded, cp, r) for r in range(cp)])
    whole = torch.empty(int(cu_seqlens_padded[-1]), *rows.shape[1:], dtype=rows.dtype, device=rows.device)
    whole[order.to(rows.device)] = torch.cat(parts)
    return whole


def cp_token_samples(cu_seqlens_padded: Tensor, cp_size: int) -> Tensor:
    """Sample index of each token of this rank's CP share, ``[S/cp]`` int64, on the host (the pack's layout)."""
    lengths = (cu_seqlens_padded[1:] - cu_seqlens_padded[:-1]).long() // cp_size
    return torch.repeat_interleave(
        torch.arange(lengths.numel()), lengths, output_size=int(cu_seqlens_padded[-1]) // cp_size
    )


class SampleRun(NamedTuple):
    """``count`` consecutive samples from sample ``first`` on, each with ``rows`` rows of a tensor."""

    first: int
    count: int  # type: ignore[assignment]  # a field named as tuple.count, which it shadows (as intended)
    rows: int


def sample_runs(rows: list[int]) -> list[SampleRun]:
    """Group the samples (with ``rows[i]`` rows each, in order) into maximal runs of equal row counts."""
    runs: list[SampleRun] = []
    for i, n in enumerate(rows):
        if runs and runs[-1].rows == n:
            runs[-1] = runs[-1]._replace(count=runs[-1].count + 1)
        else:
            runs.append(SampleRun(i, 1, n))
    return runs


def split_rows(x: Tensor, sizes: list[int]) -> tuple[Tensor, ...]:
    """``x.split(sizes)`` along rows, ``(x,)`` for a single size. Splitting, not slicing: its backward is one
    concatenation, while each slice's backward would fill a zero tensor the size of ``x``."""
    return x.split(sizes) if len(sizes) > 1 else (x,)
