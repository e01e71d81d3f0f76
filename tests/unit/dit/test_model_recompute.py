"""Activation recomputation through Megatron's mechanism gives the loss and gradients of no recompute."""

import pytest
import torch

from tests.model_setup import RTOL, make_microbatch, reference_run

FIELDS = dict(conditioning="text", fps_conditioning=True, num_layers=3)


@pytest.mark.parametrize(
    "recompute",
    [
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
        dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
        dict(recompute_granularity="selective"),
    ],
)
def test_recompute_matches_no_recompute(single_process, recompute):
    microbatches = [make_microbatch(41, [(1, 4, 6), (1, 2, 2)]), make_microbatch(42, [(1, 4, 4)])]
    loss, grads, _ = reference_run(FIELDS, microbatches)
    loss_r, grads_r, _ = reference_run({**FIELDS, **recompute}, microbatches)
    assert loss_r == pytest.approx(loss, rel=RTOL)
    for name, grad in grads.items():
        # the conditioning reaches the layers through the checkpointed arguments: its grads must survive
        assert torch.count_nonzero(grad) > 0, name
        assert ((grads_r[name] - grad).norm() / grad.norm()) < RTOL, name
