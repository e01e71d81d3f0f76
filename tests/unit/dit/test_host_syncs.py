"""Device-to-host syncs of real training steps of the tiny model, counted on the CPU (``dit.training.host_syncs``).

The DiT layers read no device tensor on the host, forward, backward or recomputed, and a training step makes
only the reads named in ``STEP_READS``. The count can fail: ``test_a_read_in_a_layer_is_caught`` puts a
``.tolist()`` of a device tensor back into ``DiTLayer.forward`` (as Megatron's THD RoPE did, per sample, before
``dit.model.attention.RowRoPESelfAttention``) and the counter finds it there.
"""

from collections import Counter

import pytest

from tests.distributed import run_distributed
from tests.tiny_data import TINY_RUN, good_entries, write_dataset

# Every host read of a device tensor a training step may make, and why it stays (site: our frame <- library's).
STEP_READS = {
    # the step's samples over DP: each micro-batch's loss is divided by them before the backward
    "tolist at dit/training/step.py (count_step)",
    # the logged loss (and the non-finite check that skips the update)
    "item at dit/training/step.py (_step_loss)",
    # the gradient norm: Megatron's clip_grads reads it for the log, the non-finite check and clipping
    "item at dit/training/step.py (apply_gradients) <- clip_grads.py (get_grad_norm_fp32)",
}
# Without TE or apex (here) Megatron's gradient norm falls back to per-parameter norms gathered on the host
# (megatron.core.utils.local_multi_tensor_l2_norm); with TE, as on the GPU, multi_tensor_l2norm is one kernel.
CPU_FALLBACK_READS = {
    "torch.tensor of device tensors at dit/training/step.py (apply_gradients) <- utils.py (local_multi_tensor_l2_norm)",
    "float at dit/training/step.py (apply_gradients) <- utils.py (local_multi_tensor_l2_norm)",
}
COUNTED_STEPS = 2


def _count(data_path: str, extra: list[str], plant_read: bool) -> dict:
    import torch.distributed as dist

    import pretrain_dit
    from dit.training.arguments import load_run_config
    from dit.training.host_syncs import count_iterations
    from dit.training.pretrain import TrainingLoop, setup_training
    from dit.training.state import TrainState

    run = load_run_config(
        TINY_RUN + ["--data-path", data_path, "--train-iters", "10", "--log-interval", "100"] + extra,
        dist.get_world_size(),
    )
    setup = setup_training(run, pretrain_dit.HOOKS)
    loop = TrainingLoop(setup, pretrain_dit.train_data_provider(run), pretrain_dit.forward_step, TrainState())
    loop.iterate()  # warm-up: the optimizer's state exists from here on
    if plant_read:
        import dit.model.layer_spec

        residual = dit.model.layer_spec.gated_residual

        def reading_residual(x, update, gate, runs):
            gate.sum(-1).tolist()  # a host read of a device tensor, inside DiTLayer.forward
            return residual(x, update, gate, runs)

        dit.model.layer_spec.gated_residual = reading_residual
    counter = count_iterations(loop, COUNTED_STEPS)
    return {
        "inside": counter.by_site(inside=True),
        "backward": counter.by_site(backward=True),
        "all": counter.by_site(),
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return str(write_dataset(tmp_path_factory.mktemp("syncs"), good_entries(24, seed=6)))


@pytest.mark.parametrize(
    "world, extra",
    [
        (1, []),
        (1, ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]),
        pytest.param(2, ["--context-parallel-size", "2"], marks=pytest.mark.dist),
    ],
    ids=["single", "recompute", "cp2"],
)
@pytest.mark.slow
def test_layers_read_nothing_and_a_step_only_the_named_reads(dataset, world, extra):
    for reads in run_distributed(_count, world, dataset, extra, False):
        assert reads["inside"] == Counter() and reads["backward"] == Counter(), reads
        assert reads["all"] == Counter({site: COUNTED_STEPS for site in STEP_READS | CPU_FALLBACK_READS})


def test_a_read_in_a_layer_is_caught(dataset):
    reads = run_distributed(_count, 1, dataset, [], True)[0]
    planted = 2 * 3 * COUNTED_STEPS  # 2 layers x 3 gated residuals a step
    assert reads["inside"] == Counter({"tolist at tests/unit/dit/test_host_syncs.py (reading_residual)": planted})
