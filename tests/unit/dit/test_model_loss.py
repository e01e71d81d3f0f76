"""The masked loss: per-sample mean over real tokens, then the mean over samples, whatever the pad rows hold."""

import pytest
import torch
from megatron.core import parallel_state

from dit.diffusion.loss import microbatch_loss, per_sample_loss
from tests.model_setup import hand_loss, make_microbatch


def test_per_sample_loss_ignores_pads_even_when_they_are_nan(single_process):
    mb = make_microbatch(61, [(1, 4, 6), (1, 2, 2), (1, 2, 6)])
    prediction = torch.randn(mb.target.shape, requires_grad=True)
    with torch.no_grad():
        prediction[~mb.batch.loss_mask] = float("nan")
    group = parallel_state.get_context_parallel_group()
    losses = per_sample_loss(prediction, mb.target, mb.batch, group)
    torch.testing.assert_close(losses, hand_loss(prediction, mb))
    loss, logged = microbatch_loss(
        prediction, target=mb.target, batch=mb.batch, cp_group=group, samples_per_microbatch=1.5
    )
    assert loss.item() == pytest.approx(losses.sum().item() / 1.5)
    assert logged["loss"].tolist() == pytest.approx([losses.sum().item(), 3.0])
    loss.backward()
    assert torch.isfinite(prediction.grad).all() and not prediction.grad[~mb.batch.loss_mask].any()


def test_every_sample_weighs_the_same_whatever_its_length(single_process):
    mb = make_microbatch(62, [(1, 8, 8), (1, 2, 2)])  # 16 tokens and 1 token
    prediction = mb.target.clone()
    prediction[mb.batch.cu_seqlens_padded[1]] += 2.0  # the 1-token sample is off by 2 in every channel
    losses = per_sample_loss(prediction, mb.target, mb.batch, parallel_state.get_context_parallel_group())
    assert losses.tolist() == pytest.approx([0.0, 4.0])
