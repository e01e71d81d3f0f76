"""TP=2, with and without sequence parallelism: loss and every full gradient equal the single-process model."""

import pytest

from dit.runtime.distributed import ParallelLayout
from tests.distributed import run_distributed
from tests.model_setup import assert_matches_reference, make_microbatch, parallel_run, reference_run

pytestmark = pytest.mark.dist

FIELDS = dict(conditioning="text", fps_conditioning=True, adaln_lora_rank=8)


def _tp2(microbatches, state):
    # one process pair runs both variants: plain TP, then TP with sequence parallelism
    results = {}
    for sp in (False, True):
        results[sp] = parallel_run(FIELDS, ParallelLayout(tensor=2), microbatches, state, sequence_parallel=sp)
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    return results


def test_tp2_with_and_without_sequence_parallel_match_single_process(single_process):
    # pads are multiples of 2*cp*tp = 4; odd text lengths exercise the SP text padding
    microbatches = [
        make_microbatch(1, [(1, 4, 6), (1, 2, 4), (1, 6, 2)], pad_multiple=4),
        make_microbatch(2, [(1, 4, 4), (1, 2, 2)], pad_multiple=4),
    ]
    ref_loss, ref_grads, state = reference_run(FIELDS, microbatches)
    per_rank = run_distributed(_tp2, 2, microbatches, state)
    for sp in (False, True):
        assert_matches_reference([r[sp] for r in per_rank], ref_loss, ref_grads)
