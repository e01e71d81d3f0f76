"""Checkpoints under Megatron-FSDP, in gloo processes running the real loop: a DP=2 FSDP run saved at step 2
and resumed under FSDP, or under DDP with the distributed optimizer, gives the uninterrupted FSDP run's next
losses, weights and EMA; a DDP checkpoint resumed under FSDP gives the DDP run's. The weights, the Adam state
and the EMA travel in model space (the distributed optimizer's ``fully_reshardable`` format), which both read."""

import pytest
import torch

import pretrain_dit
from dit.runtime.mcore019 import megatron_fsdp_missing
from dit.training.arguments import load_run_config
from dit.training.pretrain import pretrain
from tests.distributed import run_distributed
from tests.model_setup import fsdp_main_weights, full_weights
from tests.tiny_data import TINY_RUN, good_entries, write_dataset

pytestmark = [
    pytest.mark.slow,
    pytest.mark.dist,
    pytest.mark.skipif(megatron_fsdp_missing() is not None, reason=str(megatron_fsdp_missing())),
]

FLAGS = TINY_RUN + [
    "--lr",
    "1e-3",
    "--lr-decay-style",
    "constant",
    "--global-batch-size",
    "4",
    "--seed",
    "3",
    "--ema-decay",
    "0.5",
    "--train-iters",
    "4",
]
LAYOUTS = {
    "fsdp": ["--use-megatron-fsdp"],
    "ddp": ["--use-distributed-optimizer", "--dist-ckpt-optim-fully-reshardable"],
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return str(write_dataset(tmp_path_factory.mktemp("fsdp_ckpt"), good_entries(40, seed=7)))


def _train(data_path: str, extra: list[str]) -> dict:
    import torch.distributed as dist

    run = load_run_config(FLAGS + ["--data-path", data_path] + extra, dist.get_world_size())
    result = pretrain(run, pretrain_dit.HOOKS)
    setup = result.setup

    def weights() -> dict:
        return (
            fsdp_main_weights(setup.model[0], setup.config)
            if run.optimizer.use_megatron_fsdp
            else full_weights(setup.model[0].module, setup.config)
        )

    trained = weights()
    with result.ema.applied():
        ema = weights()
    return {
        "losses": {r.iteration: r.loss for r in result.history},
        "weights": trained,
        "ema": ema,
        "ema_updates": result.ema.updates,
    }


@pytest.fixture(scope="module")
def straight(dataset, tmp_path_factory):
    """Each layout trains 4 iterations at DP=2, saving at 2 and 4."""
    runs = {}
    for name, extra in LAYOUTS.items():
        ckpt = tmp_path_factory.mktemp(name) / "ckpt"
        runs[name] = {
            "ckpt": str(ckpt),
            **run_distributed(_train, 2, dataset, extra + ["--save", str(ckpt), "--save-interval", "2"])[0],
        }
    return runs


def _assert_close(got: dict, expected: dict, atol: float) -> None:
    assert got.keys() == expected.keys()
    for name, w in expected.items():
        assert torch.allclose(torch.from_numpy(got[name]), torch.from_numpy(w), atol=atol), name


@pytest.mark.parametrize("source, target", [("fsdp", "fsdp"), ("fsdp", "ddp"), ("ddp", "fsdp")])
def test_a_checkpoint_resumes_under_fsdp_and_ddp(dataset, straight, tmp_path, source, target):
    """Iteration 2 of the source, continued under the target, gives the source's steps 3 and 4: the weights, the
    Adam state, the EMA, the schedule and the data position all arrived whole (and the resumed run saves again)."""
    reference = straight[source]
    results = run_distributed(
        _train,
        2,
        dataset,
        LAYOUTS[target]
        + ["--load", reference["ckpt"], "--ckpt-step", "2", "--save", str(tmp_path), "--save-interval", "2"],
    )
    for r in results:
        assert sorted(r["losses"]) == [3, 4]
        # fp32 on both sides; FSDP and DDP differ only in summation order
        assert [r["losses"][i] for i in (3, 4)] == pytest.approx([reference["losses"][i] for i in (3, 4)], rel=1e-5)
        assert r["ema_updates"] == reference["ema_updates"] == 4
        _assert_close(r["weights"], reference["weights"], atol=1e-6)
        _assert_close(r["ema"], reference["ema"], atol=1e-6)
