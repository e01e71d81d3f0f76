"""Checkpoints across layouts and options, in gloo processes running the real loop: a TP=2 or PP=2
checkpoint loads at TP=1 / PP=1 with the same weights and the same next-step loss (and TP=1 at TP=2);
a DP change restarts the data stream with a warning; --finetune and --no-load-optim load weights only."""

import pytest
import torch

import pretrain_dit
from dit.training.arguments import load_run_config
from dit.training.pretrain import pretrain
from tests.distributed import run_distributed
from tests.model_setup import full_weights
from tests.tiny_data import TINY_RUN, good_entries, write_dataset

pytestmark = [pytest.mark.slow, pytest.mark.dist]

FLAGS = TINY_RUN + ["--lr", "1e-3", "--lr-decay-style", "constant", "--global-batch-size", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return str(write_dataset(tmp_path_factory.mktemp("layouts"), good_entries(40, seed=7)))


def _train(data_path: str, extra: list[str]) -> dict:
    import torch.distributed as dist

    run = load_run_config(FLAGS + ["--data-path", data_path] + extra, dist.get_world_size())
    result = pretrain(run, pretrain_dit.HOOKS)
    adam = result.setup.optimizer.chained_optimizers[0].optimizer
    return {
        "losses": {r.iteration: r.loss for r in result.history},
        "keys": {r.iteration: r.keys for r in result.history},
        "iteration": result.state.iteration,
        "adam_steps": {int(s["step"]) for s in adam.state.values()},
        "weights": full_weights(result.setup.model[0].module, result.setup.config),
    }


def _weights(results: list[dict]) -> dict:
    return {name: w for r in results for name, w in r["weights"].items()}


STRAIGHT = {
    "tp1": (1, []),
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
}


@pytest.fixture(scope="module")
def straight(dataset, tmp_path_factory):
    """Each layout trains 3 iterations, saving at 2 and 3: its checkpoints, its losses and final weights."""
    runs = {}
    for name, (world, extra) in STRAIGHT.items():
        ckpt = tmp_path_factory.mktemp(name) / "ckpt"
        results = run_distributed(
            _train, world, dataset, extra + ["--save", str(ckpt), "--save-interval", "2", "--train-iters", "3"]
        )
        runs[name] = {
            "ckpt": str(ckpt),
            "loss": results[-1]["losses"],
            "keys": results[0]["keys"],
            "weights": _weights(results),
        }
    return runs


@pytest.mark.parametrize("source, target", [("tp2", "tp1"), ("tp1", "tp2"), ("pp2", "tp1")])
def test_a_checkpoint_loads_under_another_layout(dataset, straight, source, target):
    """Iteration 2 of one layout, continued under another, gives the source's step 3: the weights, the
    optimizer state and the data position all arrived whole."""
    world, extra = STRAIGHT[target]
    results = run_distributed(
        _train, world, dataset, extra + ["--load", straight[source]["ckpt"], "--ckpt-step", "2", "--train-iters", "3"]
    )
    reference = straight[source]
    for r in results:
        assert r["iteration"] == 3 and r["keys"][3] == reference["keys"][3]
        assert r["losses"][3] == pytest.approx(reference["loss"][3], rel=1e-5)  # fp32, summation order only
    weights = _weights(results)
    assert weights.keys() == reference["weights"].keys()
    for name, w in reference["weights"].items():
        assert torch.allclose(torch.from_numpy(weights[name]), torch.from_numpy(w), atol=1e-6), name


def test_a_dp_change_restarts_the_data_with_a_warning(tmp_path, dataset, straight, capfd):
    run_distributed(_train, 2, dataset, ["--save", str(tmp_path / "ckpt"), "--train-iters", "2"])
    resumed = run_distributed(_train, 1, dataset, ["--load", str(tmp_path / "ckpt"), "--train-iters", "3"])[0]
    # the one replica starts its stream from the beginning: as a fresh DP=1 run's first step
    assert sorted(resumed["keys"]) == [3] and resumed["keys"][3] == straight["tp1"]["keys"][1]
    assert (
        "WARNING: the checkpoint was saved with 2 data-parallel replicas and this run has 1; their loader states "
        "cannot be split differently, so the data stream restarts from the beginning of the epoch"
    ) in capfd.readouterr().out


@pytest.mark.parametrize("flag", ["--finetune", "--no-load-optim"])
def test_weights_only(dataset, straight, flag):
    trained = straight["tp1"]
    loaded = run_distributed(
        _train, 1, dataset, ["--load", trained["ckpt"], "--train-iters", "4", flag, "--lr", "1e-12"]
    )[0]  # steps that barely move the weights
    if flag == "--finetune":  # a fresh run from the weights: iteration, optimizer and data from the start
        assert sorted(loaded["losses"]) == [1, 2, 3, 4] and loaded["adam_steps"] == {4}
        assert loaded["keys"][1] == trained["keys"][1]
    else:  # the run goes on from iteration 3 with a fresh optimizer
        assert sorted(loaded["losses"]) == [4] and loaded["adam_steps"] == {1}
    for name, w in trained["weights"].items():
        assert torch.allclose(torch.from_numpy(loaded["weights"][name]), torch.from_numpy(w), atol=1e-8), name
