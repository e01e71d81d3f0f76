"""Core attention for packed (THD) sequences on torch SDPA: the local stand-in for TEDotProductAttention.

It takes the same inputs as Megatron's TE core attention with ``qkv_format="thd"``: this rank's queries,
keys and values ``[t, heads, head_dim]`` and a ``PackedSeqParams`` whose ``cu_seqlens_*_padded`` give
each sample's rows and ``cu_seqlens_*`` its real (unpadded) length. Each sample attends only to its own
real keys; pad queries output zero. Under context parallelism (self-attention) the rank holds chunks r
and 2cp-1-r of every sample; it all-gathers K/V from the CP group, restores pack order, and attends its
queries to the whole sample, which is exactly the CP=1 result.
"""

from __future__ import annotations

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
        packed_seq_params: PackedSeqParams | None = None,
    ) -> Tensor:
        """query ``[t, np, hn]`` (this rank's rows), key/value ``[tk, np, hn]`` -> ``[t, np*hn]``.

        Masking comes from ``packed_seq_params`` alone; ``attention_mask`` and ``attention_bias`` are unused.
        """
        p = packed_seq_params
        cp = self.cp_group.size() if self.cp_group is not None else 1
        rank = self.cp_group.rank() if self.cp_group is not None else 0
        if cp > 1:
            key, value = (self._gather_pack(x, p.cu_seqlens_kv_padded, cp) for x in (key, value))
        q_bounds = (p.cu_seqlens_q_padded // cp).tolist()
        k_starts, k_lengths = p.cu_seqlens_kv_padded.tolist(), (p.cu_seqlens_kv[1:] - p.cu_seqlens_kv[:-1]).tolist()
        outputs = []
        for i, (q0, q1) in enumerate(zip(q_bounds[:-1], q_bounds[1:])):
            k0, k1 = k_starts[i], k_starts[i] + k_lengths[i]
            q, k, v = (x.transpose(0, 1) for x in (query[q0:q1], key[k0:k1], value[k0:k1]))  # [np, len, hn]
            outputs.append(F.scaled_dot_product_attention(q, k, v, scale=self.softmax_scale).transpose(0, 1))
        out = torch.cat(outputs)  # [t, np, hn]
        real = _real_rows(p.cu_seqlens_q, p.cu_seqlens_q_padded, cp, rank).to(out.device)
        out = out * real[:, None, None]  # pad queries attend to nothing
        return out.reshape(out.shape[0], -1)

    def _gather_pack(self, x: Tensor, cu_seqlens_padded: Tensor, cp: int) -> Tensor:
        """This rank's CP share ``[t, ...]`` -> the whole pack ``[cp*t, ...]`` in pack order."""
        gathered = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=self.cp_group)
        source = torch.cat([thd_partition_indices(cu_seqlens_padded, cp, r) for r in range(cp)])
        return gathered[torch.argsort(source).to(x.device)]


def _real_rows(cu_seqlens: Tensor, cu_seqlens_padded: Tensor, cp: int, rank: int) -> Tensor:
    """``[t]`` bool: which of this rank's rows are real tokens (not padding)."""
    rows = thd_partition_indices(cu_seqlens_padded, cp, rank)  # index of each local row in the pack
    sample = torch.searchsorted(cu_seqlens_padded.long(), rows, right=True) - 1
    offset = rows - cu_seqlens_padded.long()[sample]
    return offset < (cu_seqlens[1:] - cu_seqlens[:-1]).long()[sample]
