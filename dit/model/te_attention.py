"""Megatron-Core's ``TEDotProductAttention`` with TE's ``pad_between_seqs`` passed explicitly (needs TE).

Transformer Engine up to 2.17 infers whether a packed (THD) batch has padding between its sequences by
comparing ``cu_seqlens_padded[:-1]`` with ``cu_seqlens[:-1]``: padding after the last sample only (always
so for a one-sample pack, the usual long video under context parallelism) looks like none, and its
context-parallel ring path then divides the unpadded ``cu_seqlens`` by cp and silently drops real keys
(TE issue 3331; 2.18 infers it from the padded offsets being present). The comparison is also a
device-to-host sync per call. Megatron-Core's wrapper forwards only the ``PackedSeqParams`` fields it keeps;
0.16's has no ``pad_between_seqs``, so this subclass keeps that one too (0.17 and later keep it themselves on
TE 2.2+, where the line below changes nothing). :func:`dit.model.attention.attention_params` sets it from the pack
on the host. TE's ``DotProductAttention`` takes the argument from 2.2 on (:data:`MIN_TE_VERSION`, as
Megatron-Core 0.19 reads it; checked at launch).
"""

from __future__ import annotations

from megatron.core.extensions.transformer_engine import TEDotProductAttention

MIN_TE_VERSION = "2.2.0"


class PackedTEAttention(TEDotProductAttention):
    """TE's attention for packed samples, told whether the pack holds padding."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kept_packed_seq_params.add("pad_between_seqs")
