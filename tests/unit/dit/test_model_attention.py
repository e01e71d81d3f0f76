"""The local packed attention against softmax(q k^T / sqrt(d)) v written out sample by sample (values and
gradients), however it groups the samples; and its memory, which must not hold L x L scores."""

import math

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType

from dit.model.attention import PackedAttention, attention_params
from tests.model_setup import tiny_config

HEADS, HEAD_DIM = 3, 8


def _cu(lengths):
    return torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)


def _brute_force(q, k, v, q_rows, q_real, k_starts, k_real):
    """Each sample's queries attend to its own real keys; pad queries output zero. ``[t, np*hn]``."""
    out, start = [], 0
    for rows, real, k0, kn in zip(q_rows, q_real, k_starts, k_real):
        qs, ks, vs = (x.transpose(0, 1) for x in (q[start : start + rows], k[k0 : k0 + kn], v[k0 : k0 + kn]))
        weights = torch.softmax(qs @ ks.transpose(1, 2) / math.sqrt(HEAD_DIM), dim=-1)  # [np, rows, kn]
        o = (weights @ vs).transpose(0, 1)  # [rows, np, hn]
        out.append(torch.cat([o[:real], torch.zeros_like(o[real:])]))
        start += rows
    return torch.cat(out).flatten(1)


CASES = {
    # self-attention with pads: a group of two equal samples, a lone one, a repeat that is not adjacent
    "self": dict(q_real=[6, 6, 2, 8, 6], q_padded=[8, 8, 4, 8, 8], k_real=None, k_padded=None),
    # equal padded rows, different real lengths: a group each
    "self, ragged run": dict(q_real=[5, 8, 7], q_padded=[8, 8, 8], k_real=None, k_padded=None),
    # cross-attention: text of different lengths, the tail padded (SP / FP8)
    "cross, ragged text": dict(q_real=[8, 8, 8, 4], q_padded=[8, 8, 8, 4], k_real=[3, 5, 4, 2], k_padded=[3, 5, 4, 6]),
    # cross-attention: text of equal lengths (one view)
    "cross, equal text": dict(q_real=[8, 8, 8], q_padded=[8, 8, 8], k_real=[4, 4, 4], k_padded=[4, 4, 4]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_grouped_attention_equals_per_sample_softmax(single_process, case):
    c = CASES[case]
    k_real, k_padded = c["k_real"] or c["q_real"], c["k_padded"] or c["q_padded"]
    g = torch.Generator().manual_seed(3)
    q = torch.randn(sum(c["q_padded"]), HEADS, HEAD_DIM, generator=g, requires_grad=True)
    k, v = (torch.randn(sum(k_padded), HEADS, HEAD_DIM, generator=g, requires_grad=True) for _ in range(2))
    params = attention_params(
        PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=_cu(c["q_real"]),
            cu_seqlens_q_padded=_cu(c["q_padded"]),
            cu_seqlens_kv=_cu(k_real),
            cu_seqlens_kv_padded=_cu(k_padded),
        ),
        cp=1,
        cp_rank=0,
    )
    attention = PackedAttention(
        tiny_config(), 1, AttnMaskType.no_mask, "self", pg_collection=ProcessGroupCollection.use_mpu_process_groups()
    )
    out = attention(q, k, v, None, packed_seq_params=params)
    expected = _brute_force(q, k, v, c["q_padded"], c["q_real"], _cu(k_padded).tolist(), k_real)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)  # fp32, only summation order differs

    upstream = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    expected_grads = torch.autograd.grad(expected, (q, k, v), upstream)
    for grad, ref in zip(grads, expected_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6)


def test_attention_memory_is_linear_in_the_sample_length(single_process):
    """No L x L scores: the forward's peak allocation is far below one fp32 score matrix per head, and grows
    about linearly (the 3-D SDPA call this replaced fell back to the math kernel: 3.4 GB at 8k tokens)."""
    from benchmarks.bench_model import attention_peak_bytes

    peaks = {n: attention_peak_bytes(n, heads=6, head_dim=64) for n in (2048, 4096)}
    assert peaks[4096] < 0.05 * 4096**2 * 6 * 4, peaks
    assert peaks[4096] < 3 * peaks[2048], peaks  # quadratic would be 4x


def _te_217_infers_padding(params: PackedSeqParams) -> bool:
    """How Transformer Engine 2.9 to 2.17 decides ``pad_between_seqs`` when it is not given
    (``dot_product_attention.py``: the offsets of all samples but the last compared)."""
    return not (
        torch.equal(params.cu_seqlens_q_padded[:-1], params.cu_seqlens_q[:-1])
        and torch.equal(params.cu_seqlens_kv_padded[:-1], params.cu_seqlens_kv[:-1])
    )


@pytest.mark.parametrize(
    "real, padded, expected, te_217",
    [
        ([30], [32], True, False),  # one sample padded at its end (a long video under CP): TE 2.17 misses it
        ([8, 6], [8, 8], True, False),  # the pack's last sample padded
        ([6, 8], [8, 8], True, True),
        ([8, 8], [8, 8], False, False),
    ],
)
def test_pad_between_seqs_is_set_from_the_pack(real, padded, expected, te_217):
    """The flag ``dit.model.te_attention.PackedTEAttention`` hands TE: padding anywhere, the tail included."""
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=_cu(real),
        cu_seqlens_kv=_cu(real),
        cu_seqlens_q_padded=_cu(padded),
        cu_seqlens_kv_padded=_cu(padded),
        max_seqlen_q=max(padded),
        max_seqlen_kv=max(padded),
    )
    assert attention_params(params, cp=2, cp_rank=0).pad_between_seqs is expected
    assert _te_217_infers_padding(params) is te_217
