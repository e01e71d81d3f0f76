"""The real training loop is layout-independent: the same global batch gives the same losses and the same
weights after two optimizer steps under one process and under DP, TP (with and without SP), PP = 2 and 4
(middle stages carry packed sequences), CP, the distributed optimizer and Megatron-FSDP (beside TP and CP), on
a real energon dataset.

Every layout starts from the same random weights (no zero-initialised adaLN, so that every weight gets a
gradient at the first step), drawn per parameter from its global name and sliced to this rank's shard.
The packing buffer (9) makes the DP ranks' packs of a step hold different numbers of samples (2 and 3,
then 2 and 4), which a loss normalised per rank instead of over the step would get wrong.
DP changes who reads what: energon splits the shards over DP ranks x loader workers, so the reference
process reads with 2 workers and the DP=2 runs with 1 each: the same 2 slices, the same packs per step.
"""

import hashlib
from dataclasses import replace

import pytest
import torch

import pretrain_dit
from dit.runtime.mcore019 import megatron_fsdp_missing
from dit.training.arguments import load_run_config
from dit.training.pretrain import pretrain
from tests.distributed import run_distributed
from tests.model_setup import fsdp_main_weights, full_weights, global_name, tp_slice
from tests.tiny_data import TINY_RUN, payloads, write_dataset

pytestmark = [pytest.mark.slow, pytest.mark.dist]

# token counts (patch 2) that are multiples of 4, so every layout pads them alike (2*cp = 4, tp under SP)
SHAPES = [(4, 4, 4), (4, 2, 4, 4), (4, 8, 8), (4, 3, 4, 4), (4, 4, 8), (4, 8, 4), (4, 2, 8, 4)]
FLAGS = TINY_RUN + [
    "--num-layers",
    "4",
    "--packing-buffer-size",
    "9",
    "--seed",
    "11",
    "--train-iters",
    "2",
    "--global-batch-size",
    "2",
    "--lr",
    "1e-2",
    "--lr-decay-style",
    "constant",
    "--adam-eps",
    "1e-4",
    "--text-drop-prob",
    "0.3",
]  # --num-workers: per layout, see the module docstring


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    entries = [(f"s_{i:03d}", payloads(SHAPES[i % len(SHAPES)], seed=i, text_len=1 + i % 5)) for i in range(40)]
    return str(write_dataset(tmp_path_factory.mktemp("layouts"), entries))


def _random_model(config, pre_process: bool, post_process: bool):
    """pretrain_dit's model with weights that depend on the parameter's global name only."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    model = pretrain_dit.model_provider(config, pre_process, post_process)
    offset, tp = get_transformer_layer_offset(config), ps.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        for name, p in model.named_parameters():
            full_name = global_name(name, offset)
            shape = list(p.shape)
            if getattr(p, "tensor_model_parallel", False):
                shape[p.partition_dim] *= tp
            seed = int.from_bytes(hashlib.blake2b(full_name.encode(), digest_size=8).digest(), "little") % 2**63
            full = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.1
            p.copy_(tp_slice(full + (1.0 if "layernorm.weight" in name else 0.0), p))
    return model


def _train(data_path: str, extra: list[str]) -> dict:
    import torch.distributed as dist

    run = load_run_config(FLAGS + ["--data-path", data_path] + extra, dist.get_world_size())
    result = pretrain(run, replace(pretrain_dit.HOOKS, model_provider=_random_model))
    return {
        "losses": [r.loss for r in result.history],
        "grad_norms": [r.grad_norm for r in result.history],
        "samples": result.state.consumed_samples,
        "keys": [r.keys for r in result.history],
        "weights": (
            fsdp_main_weights(result.setup.model[0], result.setup.config)
            if run.optimizer.use_megatron_fsdp
            else full_weights(result.setup.model[0].module, result.setup.config)
        ),
    }


def _merged_weights(results: list[dict]) -> dict:
    """One full tensor per name; copies held by several ranks (TP-gathered, CP, DP, PP-replicated) agree."""
    merged = {}
    for r in results:
        for name, w in r["weights"].items():
            if name in merged:
                assert (merged[name] == w).all(), f"ranks disagree on {name}"
            merged[name] = w
    return merged


@pytest.fixture(scope="module")
def reference(dataset):
    return {
        objective: run_distributed(_train, 1, dataset, ["--num-workers", "2", "--objective", objective])[0]
        for objective in ("flow", "edm")
    }


FSDP = ["--use-megatron-fsdp"]
LAYOUTS = {  # world size, flags
    "dp2": (2, ["--num-workers", "1"]),
    "dp2-distributed-optimizer-overlap": (
        2,
        ["--num-workers", "1", "--use-distributed-optimizer", "--overlap-grad-reduce"],
    ),
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "tp2-sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "pp4": (4, ["--pipeline-model-parallel-size", "4"]),
    "cp2": (2, ["--context-parallel-size", "2"]),
    "cp2-edm": (2, ["--context-parallel-size", "2", "--objective", "edm"]),
    # Megatron-FSDP (megatron-core 0.17+): weights, gradients and Adam state sharded over DP (x CP)
    "dp2-megatron-fsdp": (2, ["--num-workers", "1", *FSDP]),
    "dp2-tp2-megatron-fsdp": (4, ["--num-workers", "1", "--tensor-model-parallel-size", "2", *FSDP]),
    "dp2-cp2-megatron-fsdp": (4, ["--num-workers", "1", "--context-parallel-size", "2", *FSDP]),
    # sharded over the 2 CP ranks of one replica, which runs both packs: FSDP's no_sync over micro-batches
    "cp2-megatron-fsdp": (2, ["--context-parallel-size", "2", *FSDP]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_steps_match_the_single_process_run(dataset, reference, layout):
    world, extra = LAYOUTS[layout]
    if "--use-megatron-fsdp" in extra and megatron_fsdp_missing():
        pytest.skip(megatron_fsdp_missing())
    if "--num-workers" not in extra:
        extra = extra + ["--num-workers", "2"]
    ref = reference["edm" if "edm" in extra else "flow"]
    results = run_distributed(_train, world, dataset, extra)
    # the same samples (the ranks of one replica read the same packs)
    assert {k for r in results for step in r["keys"] for k in step} == {k for step in ref["keys"] for k in step}
    for r in results:
        assert r["samples"] == ref["samples"]
        # fp32 on both sides; the layouts differ only in summation order (see tests/model_setup.py)
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5)
        assert r["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)
    weights = _merged_weights(results)
    assert weights.keys() == ref["weights"].keys()
    for name, expected in ref["weights"].items():
        expected, got = torch.from_numpy(expected), torch.from_numpy(weights[name])
        # Two Adam steps of lr 1e-2 moved the weights by up to 2e-2. Adam turns rounding noise in a near-zero
        # gradient element into a step (d/dg of lr g / (|g| + eps) is lr / eps at 0), so eps is 1e-4, not 1e-8:
        # the layouts' rounding differences (~1e-8 in a gradient element) then move a weight by up to lr / eps
        # times that, ~1e-6 (measured: 1.4e-6 at CP=2 with EDM). A wrong loss scale or a missed reduction
        # fails the loss and grad-norm checks above and moves weights by ~1e-2.
        assert (got - expected).abs().max() <= 3e-6, name
