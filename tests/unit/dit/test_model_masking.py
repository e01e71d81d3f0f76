"""Packed attention masking: samples of a pack do not see each other, and pad tokens change nothing."""

from dataclasses import replace

import pytest
import torch

from dit.model.model import DiTModel
from tests.model_setup import make_microbatch, randomize, tiny_config


def _sample_rows(batch, i, real_only=True):
    start, end = batch.cu_seqlens_padded[i].item(), batch.cu_seqlens_padded[i + 1].item()
    return (
        slice(start, start + (batch.cu_seqlens[i + 1] - batch.cu_seqlens[i]).item()) if real_only else slice(start, end)
    )


def _check_isolation(model, mb):
    b = mb.batch
    before = model(b.tokens, mb.timesteps, b)
    # change everything of sample 1: its latent tokens, its timestep, its text
    tokens, text = b.tokens.clone(), b.text.clone()
    tokens[_sample_rows(b, 1, real_only=False)] = torch.randn_like(tokens[_sample_rows(b, 1, real_only=False)])
    text[b.cu_seqlens_text[1] : b.cu_seqlens_text[2]] += 1.0
    timesteps = mb.timesteps.clone()
    timesteps[1] += 0.5
    after = model(tokens, timesteps, replace(b, tokens=tokens, text=text))
    for i in (0, 2):
        rows = _sample_rows(b, i)
        torch.testing.assert_close(after[rows], before[rows])  # fp32 defaults: only rounding may differ
    rows = _sample_rows(b, 1)
    assert (after[rows] - before[rows]).abs().max() > 1e-2  # the changed sample itself did change

    # junk in every pad row (tokens and positions) changes no real token's output
    pad = ~b.loss_mask
    tokens, positions = b.tokens.clone(), b.positions.clone()
    tokens[pad] = 100 * torch.randn_like(tokens[pad])
    positions[pad] = 3
    padded = model(tokens, mb.timesteps, replace(b, tokens=tokens, positions=positions))
    torch.testing.assert_close(padded[b.loss_mask], before[b.loss_mask])


def test_samples_of_a_pack_are_isolated_and_pads_are_inert(single_process):
    mb = make_microbatch(11, [(1, 4, 6), (1, 2, 4), (1, 6, 2)], pad_multiple=8)
    assert (~mb.batch.loss_mask).sum() > 0, "the pack must contain pad tokens"
    for fields in (
        dict(conditioning="text", position_embedding="rope3d"),
        dict(conditioning="class", position_embedding="sincos3d"),
    ):
        model = DiTModel(tiny_config(**fields))
        randomize(model, seed=5)
        with torch.no_grad():
            _check_isolation(model, mb)


def test_sincos_positions_past_the_table_raise(single_process):
    mb = make_microbatch(12, [(1, 4, 10)])  # a 2 x 5 patch grid
    model = DiTModel(tiny_config(position_embedding="sincos3d", max_latent_grid=(1, 4, 4)))
    with pytest.raises(ValueError, match="exceed the sin-cos table"):
        model(mb.batch.tokens, mb.timesteps, mb.batch)


def test_fp8_pads_the_text_to_16_rows_and_rejects_token_counts_fp8_gemms_cannot_take(single_process):
    """TE's FP8 GEMMs need row counts in multiples of 16 (``dit.model.fp8``). The local backend runs no FP8 GEMM, so
    the model's FP8 padding switched on in a CPU model checks the model's side: text padding that changes
    nothing, a clear error for the tokens."""
    from dit.model.sequence import packed_sequence

    mb = make_microbatch(61, [(1, 4, 6), (1, 2, 4)])  # 8 + 8 tokens; text of 5 + 6 rows
    assert mb.batch.text.shape[0] % 16
    model = DiTModel(tiny_config())
    randomize(model, seed=5)
    with torch.no_grad():
        expected = model(mb.batch.tokens, mb.timesteps, mb.batch)
        model.fp8_recipe = "delayed"
        cross = packed_sequence(mb.batch, False, fp8_recipe="delayed").cross_attention
        assert int(cross.cu_seqlens_kv_padded[-1]) == 16
        torch.testing.assert_close(model(mb.batch.tokens, mb.timesteps, mb.batch), expected, rtol=1e-6, atol=1e-6)

        odd = make_microbatch(62, [(1, 4, 4), (1, 2, 4)], pad_multiple=2)  # 4 + 2 tokens
        with pytest.raises(ValueError, match="FP8 needs the tokens of each rank's linear inputs in multiples of 16"):
            model(odd.batch.tokens, odd.timesteps, odd.batch)
