"""Checkpoints under Megatron-FSDP, in gloo processes running the real loop: a DP=2 FSDP run saved at step 2
and resumed under FSDP, or under DDP with the distributed optimizer, gives the uninterrupted FSDP run's next
losses, weights and EMA; a DDP checkpoint resumed under FSDP gives the DDP run's. Beside TP and CP too, and
across a change of TP: the weights, the Adam state and the EMA travel in model space (the distributed
optimizer's ``fully_reshardable`` format), which every layout reads."""

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
PARALLEL = {  # ranks and flags, DP = 2 in each
    "dp2": (2, []),
    "tp2": (4, ["--tensor-model-parallel-size", "2"]),
    "cp2": (4, ["--context-parallel-size", "2"]),
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
    """``straight(layout, parallel)``: that run's 4 iterations, saved at 2 and 4 (each trained once)."""
    runs: dict[tuple[str, str], dict] = {}

    def run(layout: str, parallel: str) -> dict:
        if (layout, parallel) not in runs:
            ranks, flags = PARALLEL[parallel]
            ckpt = tmp_path_factory.mktemp(f"{layout}_{parallel}") / "ckpt"
            extra = LAYOUTS[layout] + flags + ["--save", str(ckpt), "--save-interval", "2"]
            runs[layout, parallel] = {"ckpt": str(ckpt), **run_distributed(_train, ranks, dataset, extra)[0]}
        return runs[layout, parallel]

    return run


def _assert_close(got: dict, expected: dict, atol: float) -> None:
    assert got.keys() == expected.keys()
    for name, w in expected.items():
        assert torch.allclose(torch.from_numpy(got[name]), torch.from_numpy(w), atol=atol), name


@pytest.mark.parametrize(
    "source, target",
    [
        (("fsdp", "dp2"), ("fsdp", "dp2")),
        (("fsdp", "dp2"), ("ddp", "dp2")),
        (("ddp", "dp2"), ("fsdp", "dp2")),
        (("fsdp", "tp2"), ("fsdp", "tp2")),  # saved and loaded beside TP
        (("fsdp", "tp2"), ("ddp", "dp2")),  # TP 2 -> 1
        (("ddp", "dp2"), ("fsdp", "tp2")),  # TP 1 -> 2
        (("fsdp", "cp2"), ("ddp", "cp2")),  # beside CP
    ],
    ids=lambda case: "-".join(case),
)
def test_a_checkpoint_resumes_under_fsdp_and_ddp(dataset, straight, tmp_path, source, target):
    """Iteration 2 of the source, continued under the target, gives the source's steps 3 and 4: the weights, the
    Adam state, the EMA, the schedule and the data position all arrived whole (and the resumed run saves again)."""
    reference = straight(*source)
    ranks, flags = PARALLEL[target[1]]
    results = run_distributed(
        _train,
        ranks,
        dataset,
        LAYOUTS[target[0]]
        + flags
        + ["--load", reference["ckpt"], "--ckpt-step", "2", "--save", str(tmp_path), "--save-interval", "2"],
    )
    for r in results:
        assert sorted(r["losses"]) == [3, 4]
        # fp32 on both sides; the layouts differ only in summation order
        assert [r["losses"][i] for i in (3, 4)] == pytest.approx([reference["losses"][i] for i in (3, 4)], rel=1e-5)
        assert r["ema_updates"] == reference["ema_updates"] == 4
        _assert_close(r["weights"], reference["weights"], atol=1e-6)
        _assert_close(r["ema"], reference["ema"], atol=1e-6)
