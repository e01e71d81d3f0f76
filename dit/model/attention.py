"""Core attention for packed (THD) sequences on torch SDPA: the local stand-in for TEDotProductAttention.

It takes the same inputs as Megatron's TE core attention with ``qkv_format="thd"``: this rank's queries,
keys and values ``[t, heads, head_dim]`` and the packed-sequence parameters whose ``cu_seqlens_*_padded``
give each sample's rows and ``cu_seqlens_*`` its real (unpadded) length. Each sample attends only to its
own real keys; pad queries output zero. Under context parallelism (self-attention) the rank holds chunks
r and 2cp-1-r of every sample; it all-gathers K/V from the CP group, restores pack order, and attends its
queries to the whole sample, which is exactly the CP=1 result.

Speed and memory: consecutive samples with the same query rows, real keys and padded keys (a pack of
same-size images, which first-fit-decreasing packing puts side by side) are attended together, with one
fused ``scaled_dot_product_attention`` call on 4-D views ``[B, heads, L, head_dim]`` of the pack, so torch
takes its flash / memory-efficient kernels (CPU flash, CUDA flash or efficient) and never materialises
the ``L x L`` scores: memory grows linearly with the sample length. Pad keys are cut off the views, not
masked, so no FLOP is spent on them. The grouping is computed once per micro-batch
(:func:`attention_params`), not per layer, on the host from the pack's layout: nothing in a layer reads a
device tensor on the host, and neither does the self-attention's RoPE (:class:`RowRoPESelfAttention`, for
both backends).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from dit.model.packed import split_rows, thd_partition_indices


@dataclass(frozen=True)
class AttentionGroup:
    """B consecutive samples with as many query rows, real keys and padded keys each: one SDPA call."""

    samples: int  # B
    q_rows: int  # query rows of each sample (this rank's)
    k_len: int  # real keys of each sample
    k_stride: int  # rows of each sample in the key tensor (real keys first, then padding)


@dataclass
class PackedAttentionParams(PackedSeqParams):
    """Megatron's THD parameters plus what :class:`PackedAttention` derives from them once per micro-batch."""

    groups: list[AttentionGroup] = field(default_factory=list)
    pad_between_seqs: bool = True  # a sample has padding rows (TE's argument, see dit.model.te_attention)
    real_rows: Tensor | None = None  # [t] bool, this rank's real query rows; None: no pad rows
    kv_order: Tensor | None = None  # [S] index: all-gathered CP shares -> pack order (self-attention, CP > 1)

    def to(self, device: torch.device) -> PackedAttentionParams:
        """The tensors the kernels read (cu_seqlens, row mask, key order) copied from the host to ``device``."""
        moved: dict[str, Any] = {
            f.name: value.to(device, non_blocking=True)
            for f in dataclasses.fields(self)
            if isinstance(value := getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **moved)


def attention_params(params: PackedSeqParams, cp: int, cp_rank: int) -> PackedAttentionParams:
    """``params`` (host tensors: the pack's layout) with the attention grouping; queries are CP rank
    ``cp_rank``'s share of ``cp`` (1 for cross-attention, whose ``cu_seqlens_q`` already count this rank's
    rows), keys the whole pack's. Move the result with :meth:`PackedAttentionParams.to`."""
    q_rows = [rows // cp for rows in _lengths(params.cu_seqlens_q_padded)]
    k_len, k_stride = _lengths(params.cu_seqlens_kv), _lengths(params.cu_seqlens_kv_padded)
    shape = lambda i: (q_rows[i], k_len[i], k_stride[i])  # noqa: E731
    groups = [AttentionGroup(len(list(run)), *key) for key, run in itertools.groupby(range(len(q_rows)), shape)]
    real = _real_rows(params.cu_seqlens_q, params.cu_seqlens_q_padded, cp, cp_rank)
    kv_order = None
    if cp > 1:
        kv_order = torch.argsort(
            torch.cat([thd_partition_indices(params.cu_seqlens_kv_padded, cp, r) for r in range(cp)])
        )
    # megatron-core 0.17+ has a pad_between_seqs field of its own (None): set here, from the pack
    fields = {name: getattr(params, name) for name in PackedSeqParams.__dataclass_fields__} | {
        "pad_between_seqs": k_len != k_stride
    }
    return PackedAttentionParams(
        **fields, groups=groups, real_rows=None if bool(real.all()) else real, kv_order=kv_order
    )


class RowRoPESelfAttention(SelfAttention):
    """Megatron's self-attention, with RoPE angles given per row of this rank ``[s, 1, 1, hn]``.

    Given a RoPE table and THD ``packed_seq_params``, Megatron-Core 0.16 takes ``_apply_rotary_pos_emb_thd``
    (``rope_utils.py``), which reads ``cu_seqlens`` on the host (``.tolist()``, then ``.item()`` per sample)
    for q and for k in every layer: device-to-host syncs on a GPU. The angles here already follow this rank's
    rows (its CP share, gathered over SP as q and k are), so they are applied row by row to q and k right
    after the QKV projection and QK-norm (where Megatron applies them) by ``apply_rotary_pos_emb`` without
    ``cu_seqlens``: the same arithmetic, no host read. Megatron's own RoPE step then gets none.
    """

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None,
        *args,
        rotary_pos_emb: Tensor | None = None,
        **kwargs,
    ) -> tuple[Tensor, Tensor | None]:
        self._rope_rows = rotary_pos_emb  # [s, 1, 1, hn], read by get_query_key_value_tensors below
        try:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        finally:
            self._rope_rows = None

    def get_query_key_value_tensors(self, *args, **kwargs) -> tuple[Tensor, ...]:
        query, key, *rest = super().get_query_key_value_tensors(*args, **kwargs)  # q, k [s, 1, np|ng, hn]
        if self._rope_rows is not None:
            query, key = (
                apply_rotary_pos_emb(x, self._rope_rows, self.config, cp_group=self.pg_collection.cp)
                for x in (query, key)
            )
        return (query, key, *rest)


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
        assert pg_collection is not None, "Megatron passes the layer's process groups"
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
        assert p is not None, "PackedAttention masks from packed_seq_params alone"
        if self.cp_group is not None and self.cp_group.size() > 1:
            assert p.kv_order is not None  # set for self-attention under CP > 1
            key, value = (self._gather_pack(x, p.kv_order) for x in (key, value))  # [S, np, hn]
        queries = split_rows(query, [g.samples * g.q_rows for g in p.groups])
        keys, values = (split_rows(x, [g.samples * g.k_stride for g in p.groups]) for x in (key, value))
        outputs = []
        for g, q, k, v in zip(p.groups, queries, keys, values):
            q = q.view(g.samples, g.q_rows, *q.shape[1:])  # [B, Lq, np, hn]
            k, v = (x.view(g.samples, g.k_stride, *x.shape[1:])[:, : g.k_len] for x in (k, v))  # [B, Lk, np, hn]
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=self.softmax_scale
            )  # [B, np, Lq, hn]
            outputs.append(out.transpose(1, 2).reshape(g.samples * g.q_rows, -1))  # [B*Lq, np*hn]
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)  # [t, np*hn]
        return out if p.real_rows is None else out * p.real_rows[:, None]  # pad queries attend to nothing

    def _gather_pack(self, x: Tensor, order: Tensor) -> Tensor:
        """This rank's CP share ``[t, ...]`` -> the whole pack ``[cp*t, ...]`` in pack order."""
        gathered = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=self.cp_group)
        return gathered[order]


def _lengths(cu_seqlens: Tensor) -> list[int]:
    bounds = cu_seqlens.tolist()
    return [end - start for start, end in zip(bounds[:-1], bounds[1:])]


def _real_rows(cu_seqlens: Tensor, cu_seqlens_padded: Tensor, cp: int, rank: int) -> Tensor:
    """``[t]`` bool: which of this rank's rows are real tokens (not padding)."""
    rows = thd_partition_indices(cu_seqlens_padded, cp, rank)  # index of each local row in the pack
    sample = torch.searchsorted(cu_seqlens_padded.long(), rows, right=True) - 1
    offset = rows - cu_seqlens_padded.long()[sample]
    return offset < (cu_seqlens[1:] - cu_seqlens[:-1]).long()[sample]
