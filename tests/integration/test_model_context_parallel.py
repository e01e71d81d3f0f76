"""CP=2 (local packed attention, K/V all-gathered) and TP=2 x CP=2 on 4 processes: loss and every full
gradient equal the single-process model; samples are split into load-balanced chunks across CP ranks."""

import pytest
from megatron.core import parallel_state

from dit.runtime.distributed import ParallelLayout
from tests.distributed import run_distributed
from tests.model_setup import assert_matches_reference, make_microbatch, parallel_run, reference_run

pytestmark = pytest.mark.dist

TEXT = dict(conditioning="text", position_embedding="rope3d")
CLASS = dict(conditioning="class", position_embedding="rope3d", adaln_lora_rank=4)


def _microbatches(pad_multiple):
    # padded lengths are multiples of 2*cp (*tp under SP); pads land in the last chunk, i.e. on CP rank 0
    return [
        make_microbatch(6, [(1, 4, 6), (1, 2, 2), (1, 6, 2)], pad_multiple=pad_multiple),
        make_microbatch(7, [(1, 2, 6), (1, 4, 4)], pad_multiple=pad_multiple),
    ]


def _cp(fields, layout, microbatches, state, sequence_parallel):
    out = parallel_run(fields, layout, microbatches, state, sequence_parallel=sequence_parallel)
    parallel_state.destroy_model_parallel()
    return out


def _both(microbatches, state_text, state_class, layout, text_sequence_parallel):
    return (
        _cp(TEXT, layout, microbatches, state_text, text_sequence_parallel),
        _cp(CLASS, layout, microbatches, state_class, False),
    )


def test_cp2_matches_single_process(single_process):
    microbatches = _microbatches(pad_multiple=4)
    text, klass = reference_run(TEXT, microbatches), reference_run(CLASS, microbatches)
    per_rank = run_distributed(_both, 2, microbatches, text[2], klass[2], ParallelLayout(context=2), False)
    assert_matches_reference([r[0] for r in per_rank], *text[:2])
    assert_matches_reference([r[1] for r in per_rank], *klass[:2])


def test_tp2_cp2_with_and_without_sequence_parallel_matches_single_process(single_process):
    # text-conditioned with sequence parallelism, class-conditioned without
    microbatches = _microbatches(pad_multiple=8)
    text, klass = reference_run(TEXT, microbatches), reference_run(CLASS, microbatches)
    per_rank = run_distributed(_both, 4, microbatches, text[2], klass[2], ParallelLayout(tensor=2, context=2), True)
    assert_matches_reference([r[0] for r in per_rank], *text[:2])
    assert_matches_reference([r[1] for r in per_rank], *klass[:2])
