"""The EMA: its closed form over the weights the real loop produced, DP-sharded (distributed optimizer)
equal to unsharded, and restored exactly from a checkpoint."""

from dataclasses import replace

import pytest
import torch

import pretrain_dit
from dit.arguments import parse_args, validate_args
from dit.training.ema import ema_decay
from dit.training.pretrain import pretrain
from tests.distributed import run_distributed
from tests.model_setup import full_weights
from tests.tiny_data import good_entries, write_dataset

FLAGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--latent-channels", "4",
         "--patch-size", "2", "--text-embed-dim", "8", "--max-seq-length", "32", "--packing-buffer-size", "8",
         "--num-workers", "0", "--transformer-impl", "local", "--lr", "1e-2", "--lr-decay-style", "constant",
         "--log-interval", "1", "--ema-decay", "0.8"]

_seen = []


def _recording_forward_step(data_iterator, model):
    _seen.append({n: p.detach().clone() for n, p in model.module.named_parameters()})  # each step's weights
    return pretrain_dit.forward_step(data_iterator, model)


def _run(data_path: str, extra: list[str], record: bool = False) -> dict:
    import torch.distributed as dist

    args = validate_args(parse_args(FLAGS + ["--data-path", data_path] + extra), dist.get_world_size())
    hooks = replace(pretrain_dit.HOOKS, forward_step=_recording_forward_step) if record else pretrain_dit.HOOKS
    result = pretrain(args, hooks)
    model = result.setup.model[0].module
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    with result.ema.applied():
        ema = full_weights(model, result.setup.config)
    return {"ema": ema, "final": final, "seen": _seen, "updates": result.ema.updates}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return str(write_dataset(tmp_path_factory.mktemp("ema"), good_entries(32, seed=4)))


@pytest.mark.parametrize("warmup", ["--ema-warmup", "--no-ema-warmup"])
def test_ema_is_its_closed_form(dataset, warmup):
    """ema_k = prod_j d_j w_0 + sum_i (1 - d_i) prod_{j > i} d_j w_i over the weights w_i after step i."""
    r = run_distributed(_run, 1, dataset, ["--train-iters", "5", warmup], True)[0]
    weights = r["seen"] + [r["final"]]  # w_0 (initial) .. w_5
    decays = [ema_decay(0.8, i, warmup == "--ema-warmup") for i in range(5)]  # d of updates 1..5
    assert r["updates"] == 5
    for name, ema in r["ema"].items():
        closed = torch.prod(torch.tensor(decays)) * weights[0][name]
        for i in range(1, 6):
            closed = closed + (1 - decays[i - 1]) * torch.prod(torch.tensor(decays[i:])) * weights[i][name]
        assert torch.allclose(torch.from_numpy(ema), closed, atol=1e-6), name
    if warmup == "--ema-warmup":
        assert decays[:3] == pytest.approx([0.1, 2 / 11, 0.25])  # (1 + n) / (10 + n), below 0.8


@pytest.mark.slow
def test_the_dp_sharded_ema_equals_the_unsharded_one(dataset):
    sharded = run_distributed(_run, 2, dataset, ["--train-iters", "4", "--use-distributed-optimizer"])
    whole = run_distributed(_run, 2, dataset, ["--train-iters", "4"])
    for name, ema in whole[0]["ema"].items():
        assert torch.allclose(torch.from_numpy(sharded[0]["ema"][name]), torch.from_numpy(ema), atol=1e-6), name


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", [[], ["--use-distributed-optimizer"]])
def test_ema_restores_exactly(dataset, tmp_path, optimizer):
    straight = run_distributed(_run, 2, dataset, ["--train-iters", "4"] + optimizer)[0]
    ckpt = ["--save", str(tmp_path), "--save-interval", "2"]
    run_distributed(_run, 2, dataset, ["--train-iters", "2"] + optimizer + ckpt)
    resumed = run_distributed(_run, 2, dataset, ["--train-iters", "4"] + optimizer + ckpt)[0]
    assert resumed["updates"] == 4
    for name, ema in straight["ema"].items():
        assert (resumed["ema"][name] == ema).all(), name  # bit-identical
