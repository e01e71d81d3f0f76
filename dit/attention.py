"""Core attention for packed (THD) sequences on torch SDPA: the local stand-in for TEDotProductAttention.

It takes the same inputs as Megatron's TE core attention with ``qkv_format="thd"``: this rank's queries,
keys and values ``[t, heads, head_dim]`` and the packed-sequence parameters whose ``cu_seqlens_*_padded``
give each sample's rows and ``cu_seqlens_*`` its real (unpadded) length. Each sample attends only to its
own real keys; pad queries output zero. Under context parallelism (self-attention) the rank holds chunks
r and 2cp-1-r of every sample; it all-gathers K/V from the CP group, restores pack order, and attends its
queries to the whole sample, which is exactly the CP=1 result.

Speed and memory: the samples of a pack are attended run by run (:mod:`dit.runs`), each run with one
fused ``scaled_dot_product_attention`` call on 4-D views ``[B, heads, L, head_dim]`` of the pack, so torch
takes its flash / memory-efficient kernels (CPU flash, CUDA flash or efficient) and never materialises
the ``L x L`` scores: memory grows linearly with the sample length. The grouping is computed once per
micro-batch (:func:`attention_params`), not per layer. Keys of a run that are not evenly spaced in the
key tensor (text of different lengths) are gathered into ``[B, K_max]`` with a key mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from dit.packed import thd_partition_indices
from dit.runs import sample_runs, split_rows


@dataclass(frozen=True)
class AttentionGroup:
    """A run of B consecutive samples with as many query rows each: one SDPA call ``[B, np, q_rows, hn]``."""

    samples: int  # B
    q_rows: int  # query rows of each sample (this rank's)
    key_span: int  # rows of the key tensor from this group's first key to the next group's
    k_stride: int  # rows between consecutive samples' keys in the span (0: gathered through k_index)
    k_len: int  # keys per sample handed to SDPA: the real ones, the longest where they differ
    k_index: Tensor | None  # [B*k_len] rows of the span, where the samples' keys are not evenly spaced
    k_mask: Tensor | None  # [B, 1, 1, k_len] bool, True on each sample's real keys; None: all are real


@dataclass
class PackedAttentionParams(PackedSeqParams):
    """Megatron's THD parameters plus what :class:`PackedAttention` derives from them once per micro-batch."""

    groups: list[AttentionGroup] = field(default_factory=list)
    real_rows: Tensor | None = None  # [t] bool, this rank's real query rows; None: no pad rows
    kv_order: Tensor | None = None  # [S] index: all-gathered CP shares -> pack order (self-attention, CP > 1)


def attention_params(params: PackedSeqParams, cp: int, cp_rank: int) -> PackedAttentionParams:
    """``params`` with the attention grouping; queries are CP rank ``cp_rank``'s share of ``cp`` (1 for
    cross-attention, whose ``cu_seqlens_q`` already count this rank's rows), keys the whole pack's."""
    cu_k, cu_kp = params.cu_seqlens_kv.tolist(), params.cu_seqlens_kv_padded.tolist()
    cu_qp = params.cu_seqlens_q_padded.tolist()
    k_lens = [end - start for start, end in zip(cu_k[:-1], cu_k[1:])]
    device = params.cu_seqlens_kv.device
    groups = []
    for first, count, q_rows in sample_runs([(end - start) // cp for start, end in zip(cu_qp[:-1], cu_qp[1:])]):
        starts = [cu_kp[i] - cu_kp[first] for i in range(first, first + count)]  # within the span
        lens = k_lens[first:first + count]
        span, k_len = cu_kp[first + count] - cu_kp[first], max(lens)
        stride = starts[1] if count > 1 else span
        even = k_len <= stride and count * stride <= span and all(s == b * stride for b, s in enumerate(starts))
        lengths, offsets = torch.tensor(lens)[:, None], torch.arange(k_len)  # [B, 1], [k_len]
        k_mask = None if min(lens) == k_len else (offsets < lengths)[:, None, None, :].to(device)
        k_index = None  # past its length a sample repeats its last key (masked): rows stay inside the span
        if not even:
            rows = torch.tensor(starts)[:, None] + torch.minimum(offsets, (lengths - 1).clamp(min=0))
            k_index = rows.clamp(max=max(span - 1, 0)).flatten().to(device)
        groups.append(AttentionGroup(count, q_rows, span, stride if even else 0, k_len, k_index, k_mask))
    real = _real_rows(params.cu_seqlens_q.cpu(), params.cu_seqlens_q_padded.cpu(), cp, cp_rank)
    kv_order = None
    if cp > 1:
        source = torch.cat([thd_partition_indices(params.cu_seqlens_kv_padded.cpu(), cp, r) for r in range(cp)])
        kv_order = torch.argsort(source).to(device)
    fields = {name: getattr(params, name) for name in PackedSeqParams.__dataclass_fields__}
    return PackedAttentionParams(**fields, groups=groups, real_rows=None if bool(real.all()) else real.to(device),
                                 kv_order=kv_order)


class PackedAttention(MegatronModule):
    """softmax(q k^T * scale) v within each packed sample, context-parallel for self-attention."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        cp_comm_type: str | None = None,
        softmax_scale: float | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ):
        super().__init__(config=config)
        # Cross-attention keys (the text) are never split across CP, so only self-attention gathers.
        self.cp_group = pg_collection.cp if attention_type == "self" else None
        self.softmax_scale = softmax_scale

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: PackedAttentionParams | None = None,
    ) -> Tensor:
        """query ``[t, np, hn]`` (this rank's rows), key/value ``[tk, np, hn]`` -> ``[t, np*hn]``.

        Masking comes from ``packed_seq_params`` alone; ``attention_mask`` and ``attention_bias`` are unused.
        """
        p = packed_seq_params
        if self.cp_group is not None and self.cp_group.size() > 1:
            key, value = (self._gather_pack(x, p.kv_order) for x in (key, value))  # [S, np, hn]
        queries = split_rows(query, [g.samples * g.q_rows for g in p.groups])
        keys, values = (split_rows(x, [g.key_span for g in p.groups]) for x in (key, value))
        outputs = []
        for g, q, k, v in zip(p.groups, queries, keys, values):
            q = q.view(g.samples, g.q_rows, *q.shape[1:])  # [B, Lq, np, hn]
            k, v = _group_keys(g, k), _group_keys(g, v)  # [B, Lk, np, hn]
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=g.k_mask, scale=self.softmax_scale)  # [B, np, Lq, hn]
            outputs.append(out.transpose(1, 2).reshape(g.samples * g.q_rows, -1))  # [B*Lq, np*hn]
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)  # [t, np*hn]
        return out if p.real_rows is None else out * p.real_rows[:, None]  # pad queries attend to nothing

    def _gather_pack(self, x: Tensor, order: Tensor) -> Tensor:
        """This rank's CP share ``[t, ...]`` -> the whole pack ``[cp*t, ...]`` in pack order."""
        gathered = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=self.cp_group)
        return gathered[order]


def _group_keys(group: AttentionGroup, span: Tensor) -> Tensor:
    """A group's key rows ``[key_span, np, hn]`` -> ``[B, k_len, np, hn]``: a view where evenly spaced."""
    if group.k_index is not None:
        return span[group.k_index].view(group.samples, group.k_len, *span.shape[1:])
    rows = span[:group.samples * group.k_stride].view(group.samples, group.k_stride, *span.shape[1:])
    return rows[:, :group.k_len]


def _real_rows(cu_seqlens: Tensor, cu_seqlens_padded: Tensor, cp: int, rank: int) -> Tensor:
    """``[t]`` bool: which of this rank's rows are real tokens (not padding)."""
    rows = thd_partition_indices(cu_seqlens_padded, cp, rank)  # index of each local row in the pack
    sample = torch.searchsorted(cu_seqlens_padded.long(), rows, right=True) - 1
    offset = rows - cu_seqlens_padded.long()[sample]
    return offset < (cu_seqlens[1:] - cu_seqlens[:-1]).long()[sample]
