"""Transformer Engine on one GPU: the TE spec (Megatron-Core's own TE classes, which ``dit.model.layer_spec`` selects
when TE imports) computes what the local spec computes with the same weights, forward and backward; and FP8
through Megatron-Core's ``fp8`` / ``fp8_recipe`` config fields trains a few steps with finite values near bf16."""

import pytest
import torch

from data.loader.rank_split import pad_multiple
from dit.model.fp8 import MIN_CAPABILITY
from dit.model.te import have_transformer_engine
from dit.model.te_attention import PackedTEAttention
from tests.gpu.gpu_setup import (
    assert_matches_reference,
    device_pack,
    forward_backward,
    model_like,
    reference_model,
    relative_error,
)

_MISSING = [
    what
    for what, present in (
        ("Transformer Engine is not importable (it ships in the NGC PyTorch container)", have_transformer_engine()),
        ("no CUDA GPU", torch.cuda.is_available()),
    )
    if not present
]

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_MISSING), reason="TE on a GPU: " + "; ".join(_MISSING))]

TE_BF16 = dict(bf16=True, params_dtype=torch.bfloat16, transformer_impl="transformer_engine")

# FP8 (e4m3 forward: 3 mantissa bits, relative step 1/16) in every linear of both blocks, against bf16
FP8_TOL = 0.25


def test_te_spec_matches_local_spec_forward_and_backward(single_process, device):
    mb = device_pack(device)
    reference = reference_model(device)
    te = model_like(reference, device, **TE_BF16)  # TE's THD attention runs in bf16 only
    assert_matches_reference(forward_backward(te, mb), forward_backward(reference, mb))
    attention = te.decoder.layers[0].self_attention.core_attention
    assert isinstance(attention, PackedTEAttention) and "pad_between_seqs" in attention.kept_packed_seq_params


@pytest.mark.parametrize("recipe", sorted(MIN_CAPABILITY))
def test_fp8_training_steps_are_finite_and_near_bf16(single_process, device, recipe):
    needed, gpus = MIN_CAPABILITY[recipe]
    if torch.cuda.get_device_capability(device) < needed:
        pytest.skip(f"{recipe} needs {gpus}")
    mb = device_pack(device, pad_multiple=pad_multiple(1, 1, False, recipe))  # TE's FP8 rows (dit.model.fp8)
    reference = reference_model(device)
    bf16 = model_like(reference, device, **TE_BF16)
    fp8 = model_like(reference, device, **TE_BF16, fp8="hybrid", fp8_recipe=recipe)
    expected, _, _ = forward_backward(bf16, mb)
    optimizer = torch.optim.AdamW(fp8.parameters(), lr=1e-4)
    for step in range(3):  # delayed scaling starts from the amax history of the steps before
        out, loss, grads = forward_backward(fp8, mb)
        assert torch.isfinite(loss) and torch.isfinite(out).all(), f"step {step}: loss {loss}"
        assert all(torch.isfinite(g).all() for g in grads.values()), f"step {step}: a non-finite gradient"
        if step == 0:
            assert relative_error(out, expected) < FP8_TOL
        optimizer.step()
