"""Validation is deterministic: two evaluations of the same checkpoint agree to the last digit (EMA and raw
weights differ), and TP=2 and CP=2 give the same value to fp32 tolerance."""

import pytest

import pretrain_dit
from data import shards
from dit.training.arguments import load_run_config
from dit.training.pretrain import pretrain
from tests.distributed import run_distributed
from tests.tiny_data import TINY_RUN, payloads

pytestmark = pytest.mark.slow

# token counts (patch 2) that are multiples of 4, so every layout pads them alike
SHAPES = [(4, 4, 4), (4, 2, 4, 4), (4, 8, 8), (4, 3, 4, 4), (4, 4, 8), (4, 8, 4), (4, 2, 8, 4)]
FLAGS = TINY_RUN + ["--lr", "1e-3", "--global-batch-size", "2", "--eval-iters", "2"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("valid")
    entries = [(f"s_{i:03d}", payloads(SHAPES[i % len(SHAPES)], seed=i, text_len=1 + i % 5)) for i in range(48)]
    shards.write_dataset(root, entries, 8, split_ratio="0.5,0.5,0")
    return str(root)


def _run(data_path: str, extra: list[str]) -> dict:
    import torch.distributed as dist

    run = load_run_config(FLAGS + ["--data-path", data_path] + extra, dist.get_world_size())
    result = pretrain(run, pretrain_dit.HOOKS)
    return {it: (v.loss, v.per_level, v.samples) for it, v in result.validations}


@pytest.fixture(scope="module")
def checkpoint(dataset, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt")
    during = run_distributed(_run, 1, dataset, ["--train-iters", "3", "--save", str(ckpt), "--eval-interval", "3"])[0]
    return str(ckpt), during


def test_two_validations_of_one_checkpoint_agree_exactly(dataset, checkpoint):
    ckpt, during = checkpoint
    again = run_distributed(_run, 1, dataset, ["--load", ckpt, "--skip-train", "--train-iters", "3"])[0]
    assert again == during  # to the last digit: the same packs, noise and levels, the EMA weights
    loss, per_level, samples = again[3]
    assert samples > 8 and len(per_level) == 8 and len(set(per_level)) == 8
    raw = run_distributed(_run, 1, dataset, ["--load", ckpt, "--skip-train", "--train-iters", "3", "--no-ema"])[0]
    assert raw[3][0] != loss  # the EMA after 3 warm-up steps is not the raw weights


@pytest.mark.dist
@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"], ["--context-parallel-size", "2"]])
def test_another_layout_gives_the_same_validation(dataset, checkpoint, layout):
    ckpt, during = checkpoint
    other = run_distributed(_run, 2, dataset, ["--load", ckpt, "--skip-train", "--train-iters", "3"] + layout)
    for result in other:
        loss, per_level, samples = result[3]
        assert samples == during[3][2]
        assert loss == pytest.approx(during[3][0], rel=1e-5)  # fp32, summation order only
        assert per_level == pytest.approx(during[3][1], rel=1e-5)
