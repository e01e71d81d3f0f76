"""PP=2 through Megatron's 1F1B schedule: same loss, gradients and gradient norm as the single-process model,
and the conditioning embedders' cross-stage gradient reduction (``has_cond_embedder``) is what makes it so.
PP=2 x DP=2 with the distributed optimizer takes the same step as the single-process model."""

import math

import pytest
from megatron.core import parallel_state

from dit.runtime.distributed import ParallelLayout
from tests.distributed import run_distributed
from tests.model_setup import RTOL, assert_matches_reference, make_microbatch, parallel_run, reference_run

pytestmark = pytest.mark.dist

FIELDS = dict(conditioning="text", fps_conditioning=True, position_embedding="sincos3d")
CONDITIONING = ("t_embedder.", "fps_embedder.", "text_projection.")


def _pp2(microbatches, state):
    with_reduction = parallel_run(FIELDS, ParallelLayout(pipeline=2), microbatches, state, optimizer={})
    parallel_state.destroy_model_parallel()
    without = parallel_run(
        FIELDS, ParallelLayout(pipeline=2), microbatches, state, set_config={"has_cond_embedder": False}
    )
    return with_reduction, without


def _norm(grads: dict) -> float:
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))


def test_pp2_matches_single_process_and_needs_the_conditioning_reduction(single_process):
    # three micro-batches with 3, 2 and 1 samples: the loss is the mean over all 6 samples
    microbatches = [
        make_microbatch(3, [(1, 4, 6), (1, 2, 4), (1, 6, 2)]),
        make_microbatch(4, [(1, 4, 4), (1, 2, 2)]),
        make_microbatch(5, [(1, 6, 6)]),
    ]
    ref_loss, ref_grads, state = reference_run(FIELDS, microbatches)
    per_rank = run_distributed(_pp2, 2, microbatches, state)
    # the step Megatron's optimizer took, and the norm it clips by: the conditioning, present on both
    # stages, counts once
    assert_matches_reference([r[0] for r in per_rank], ref_loss, ref_grads)
    for _, _, grad_norm in (r[0] for r in per_rank):
        assert grad_norm == pytest.approx(_norm(ref_grads), rel=RTOL)

    # Without has_cond_embedder each stage keeps only its own layers' share of the conditioning gradient.
    for stage, (_, grads) in enumerate(r[1] for r in per_rank):
        for name, grad in grads.items():
            if name.startswith(CONDITIONING):
                assert not (abs(grad - ref_grads[name].numpy()).max() <= 1e-3 * abs(grad).max()), (stage, name)


# A wide text embedding (2048) makes the conditioning more than half of each stage's gradient buffer, so
# that without buckets of their own its parameters straddle the distributed optimizer's DP shard boundary
# at different offsets on the two stages (then text_projection's step was 4% off).
WIDE_TEXT = dict(FIELDS, text_embed_dim=2048)


def _pp2_dp2(microbatches, state):
    return parallel_run(
        WIDE_TEXT, ParallelLayout(pipeline=2), microbatches, state, optimizer={"use_distributed_optimizer": True}
    )


def test_pp2_dp2_distributed_optimizer_step_matches_single_process(single_process):
    # two micro-batches per DP rank (DP rank r takes micro-batches r and r + 2)
    microbatches = [
        make_microbatch(6 + i, grids, text_dim=2048)
        for i, grids in enumerate([[(1, 4, 6), (1, 2, 4)], [(1, 4, 4)], [(1, 2, 2), (1, 6, 2)], [(1, 6, 6)]])
    ]
    ref_loss, ref_grads, state = reference_run(WIDE_TEXT, microbatches)
    results = run_distributed(_pp2_dp2, 4, microbatches, state)
    assert_matches_reference(results, ref_loss, ref_grads)
    for _, _, grad_norm in results:
        assert grad_norm == pytest.approx(_norm(ref_grads), rel=RTOL)
