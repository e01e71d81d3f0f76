"""PP=2 through Megatron's 1F1B schedule: same loss and gradients as the single-process model, and the
conditioning embedders' cross-stage gradient reduction (``has_cond_embedder``) is what makes it so."""

from megatron.core import parallel_state

from dit.runtime import ParallelLayout
from tests.distributed import run_distributed
from tests.model_setup import assert_matches_reference, make_microbatch, parallel_run, reference_run, single_process  # noqa: F401

FIELDS = dict(conditioning="text", fps_conditioning=True, position_embedding="sincos3d")
CONDITIONING = ("t_embedder.", "fps_embedder.", "text_projection.")


def _pp2(microbatches, state):
    with_reduction = parallel_run(FIELDS, ParallelLayout(pipeline=2), microbatches, state)
    parallel_state.destroy_model_parallel()
    without = parallel_run(FIELDS, ParallelLayout(pipeline=2), microbatches, state,
                           set_config={"has_cond_embedder": False})
    return with_reduction, without


def test_pp2_matches_single_process_and_needs_the_conditioning_reduction(single_process):
    # three micro-batches with 3, 2 and 1 samples: the loss is the mean over all 6 samples
    microbatches = [make_microbatch(3, [(1, 4, 6), (1, 2, 4), (1, 6, 2)]),
                    make_microbatch(4, [(1, 4, 4), (1, 2, 2)]),
                    make_microbatch(5, [(1, 6, 6)])]
    ref_loss, ref_grads, state = reference_run(FIELDS, microbatches)
    per_rank = run_distributed(_pp2, 2, microbatches, state)
    assert_matches_reference([r[0] for r in per_rank], ref_loss, ref_grads)

    # Without has_cond_embedder each stage keeps only its own layers' share of the conditioning gradient.
    for stage, (_, grads) in enumerate(r[1] for r in per_rank):
        for name, grad in grads.items():
            if name.startswith(CONDITIONING):
                assert not (abs(grad - ref_grads[name].numpy()).max() <= 1e-3 * abs(grad).max()), (stage, name)
