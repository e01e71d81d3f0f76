"""This rank's view of a packed micro-batch: what every DiT layer needs besides the hidden states.

Three layouts of the same pack appear in a step (S = padded tokens of the whole pack):
- the pack: ``cu_seqlens_padded`` over S tokens, as the data path builds it;
- the CP share: this CP rank's S/cp tokens, sample by sample (chunks r and 2cp-1-r of each sample,
  see :func:`dit.model.packed.thd_partition_indices`), so sample i owns local rows
  ``cu_seqlens_padded[i]/cp : cu_seqlens_padded[i+1]/cp``;
- the SP share: with sequence parallelism each TP rank holds a contiguous 1/tp slice of the CP share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams

from dit.model.attention import PackedAttentionParams, attention_params
from dit.model.fp8 import fp8_rows
from dit.model.packed import PackedBatch, SampleRun, sample_runs


@dataclass
class PackedSequence:
    """Passed to the transformer block as ``packed_seq_params``; each layer takes what it needs."""

    self_attention: PackedAttentionParams  # the whole pack's cu_seqlens (TE's THD + context-parallel convention)
    cross_attention: PackedAttentionParams  # this rank's latent tokens (all of them) -> each sample's text
    token_runs: list[SampleRun]  # the tokens this rank holds after CP and SP splits, run by run (adaLN)

    def to(self, device: torch.device) -> PackedSequence:
        """Built on the host from the pack's layout; the attention kernels' tensors go to ``device``."""
        return PackedSequence(self.self_attention.to(device), self.cross_attention.to(device), self.token_runs)


def text_padding(num_text_tokens: int, sequence_parallel: bool, fp8_recipe: str | None = None) -> int:
    """Zero rows appended to the text so that each TP rank's slice under sequence parallelism is whole and,
    under FP8, a multiple of TE's row rule (:func:`dit.model.fp8.fp8_rows`: cross-attention's key/value linear
    reads that slice); they are padding of the pack's last sample (``cu_seqlens_kv_padded``)."""
    slices = parallel_state.get_tensor_model_parallel_world_size() if sequence_parallel else 1
    return -num_text_tokens % (slices * fp8_rows(fp8_recipe))


def packed_sequence(batch: PackedBatch, sequence_parallel: bool, fp8_recipe: str | None = None) -> PackedSequence:
    """Build the attention parameters and token->sample map of ``batch`` for this rank, on the host from the
    pack's layout (``dit.model.packed.LAYOUT``); :meth:`PackedSequence.to` moves what the kernels read."""
    cp = parallel_state.get_context_parallel_world_size()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    cu, cu_padded = batch.cu_seqlens.int(), batch.cu_seqlens_padded.int()
    rows, slices = fp8_rows(fp8_recipe), tp if sequence_parallel else 1
    if fp8_recipe and int(cu_padded[-1]) // cp % (rows * slices):  # the linears read S/cp rows, S/cp/tp under SP
        raise ValueError(
            f"FP8 needs the tokens of each rank's linear inputs in multiples of {rows}; this pack "
            f"gives {int(cu_padded[-1])} tokens over cp={cp} (and tp={slices} under sequence "
            f"parallelism): pad each sample to a multiple of {rows * cp * slices} tokens"
        )
    cu_text = batch.cu_seqlens_text.int()
    cu_text_padded = cu_text.clone()
    cu_text_padded[-1] += text_padding(batch.text.shape[0], sequence_parallel, fp8_recipe)
    max_len = int((cu_padded[1:] - cu_padded[:-1]).max())
    max_text = int((cu_text_padded[1:] - cu_text_padded[:-1]).max())
    cu_local = cu_padded // cp
    bounds: list[int] = cu_local.tolist()  # each sample's rows of this rank's CP share [S/cp]
    if sequence_parallel:
        if bounds[-1] % tp:
            raise ValueError(
                f"{bounds[-1]} tokens per CP rank do not split over tp={tp}: sequence "
                "parallelism needs every sample padded to a multiple of 2*cp*tp"
            )
        share = bounds[-1] // tp
        offset = parallel_state.get_tensor_model_parallel_rank() * share
        bounds = [min(max(b - offset, 0), share) for b in bounds]  # this TP rank's slice [S/cp/tp]
    sample_rows = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    cp_rank = parallel_state.get_context_parallel_rank()
    return PackedSequence(
        self_attention=attention_params(
            PackedSeqParams(
                qkv_format="thd",
                cu_seqlens_q=cu,
                cu_seqlens_kv=cu,
                cu_seqlens_q_padded=cu_padded,
                cu_seqlens_kv_padded=cu_padded,
                max_seqlen_q=max_len,
                max_seqlen_kv=max_len,
            ),
            cp,
            cp_rank,
        ),
        cross_attention=attention_params(
            PackedSeqParams(
                qkv_format="thd",
                cu_seqlens_q=cu_local,
                cu_seqlens_kv=cu_text,
                cu_seqlens_q_padded=cu_local,
                cu_seqlens_kv_padded=cu_text_padded,
                max_seqlen_q=max_len // cp,
                max_seqlen_kv=max_text,
            ),
            1,
            0,
        ),
        token_runs=[run for run in sample_runs(sample_rows) if run.rows],
    )
