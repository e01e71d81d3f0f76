"""The EMA: its closed form over the weights the real loop produced, DP-sharded (distributed optimizer)
equal to unsharded, restored exactly from a checkpoint, and kept out of the optimizer's state, so that
an optimizer with Transformer Engine's FusedAdam state contract saves and resumes."""

from dataclasses import replace

import pytest
import torch

import pretrain_dit
from dit.runtime.mcore019 import megatron_fsdp_missing
from dit.training.arguments import load_run_config
from dit.training.ema import ema_decay
from dit.training.pretrain import pretrain
from tests.distributed import run_distributed
from tests.model_setup import fsdp_main_weights, full_weights
from tests.tiny_data import TINY_RUN, good_entries, write_dataset

FLAGS = TINY_RUN + ["--lr", "1e-2", "--lr-decay-style", "constant", "--ema-decay", "0.8"]

_seen = []


def _recording_forward_step(data_iterator, model):
    _seen.append({n: p.detach().clone() for n, p in model.module.named_parameters()})  # each step's weights
    return pretrain_dit.forward_step(data_iterator, model)


class FusedAdamContract(torch.optim.AdamW):
    """torch's AdamW held to the state contract of Transformer Engine's ``FusedAdam``, which Megatron-Core
    picks whenever TE imports (written from TE's ``transformer_engine/pytorch/optimizers/fused_adam.py``,
    2.9 to 2.18): ``state_dict`` calls ``get_unscaled_state`` and ``load_state_dict`` calls
    ``set_scaled_state`` for every per-parameter state name; both look it up in ``name_to_dtype_map`` (a
    KeyError for any other name) and assert fp32 for fp32 states. ``step`` is let through: TE keeps it in
    the param groups, but Megatron-Core reads it from torch's per-parameter state where TE and apex are absent.
    """

    name_to_dtype_map = {"exp_avg": torch.float32, "exp_avg_sq": torch.float32, "master_param": torch.float32}

    def _check(self, state: dict) -> None:
        for per_param in state.values():
            for name, value in per_param.items():
                if name != "step":
                    assert value.dtype == self.name_to_dtype_map[name], name

    def state_dict(self) -> dict:
        state = super().state_dict()
        self._check(state["state"])
        return state

    def load_state_dict(self, state: dict) -> None:
        self._check(state["state"])
        super().load_state_dict(state)


def test_the_stand_in_enforces_fused_adams_contract():
    param = torch.nn.Parameter(torch.ones(3))
    opt = FusedAdamContract([param])
    param.grad = torch.ones(3)
    opt.step()
    opt.load_state_dict(opt.state_dict())  # its own keys pass
    opt.state[param]["ema"] = param.detach().clone()
    with pytest.raises(KeyError, match="ema"):
        opt.state_dict()


def _run(data_path: str, extra: list[str], record: bool = False, fused_adam_contract: bool = False) -> dict:
    import torch.distributed as dist

    run = load_run_config(FLAGS + ["--data-path", data_path] + extra, dist.get_world_size())
    hooks = replace(pretrain_dit.HOOKS, forward_step=_recording_forward_step) if record else pretrain_dit.HOOKS
    if fused_adam_contract:  # read by Megatron-Core's get_megatron_optimizer when it builds the optimizer
        torch.optim.AdamW = FusedAdamContract  # this rank's process only
    result = pretrain(run, hooks)
    model = result.setup.model[0].module
    final = {} if run.optimizer.use_megatron_fsdp else {n: p.detach().clone() for n, p in model.named_parameters()}
    state_keys = {
        name
        for chained in result.setup.optimizer.chained_optimizers
        for per_param in chained.optimizer.state.values()
        for name in per_param
    }
    optimizers = {type(chained.optimizer).__name__ for chained in result.setup.optimizer.chained_optimizers}
    with result.ema.applied():
        ema = (
            fsdp_main_weights(result.setup.model[0], result.setup.config)
            if run.optimizer.use_megatron_fsdp
            else full_weights(model, result.setup.config)
        )
    return {
        "ema": ema,
        "final": final,
        "seen": _seen,
        "updates": result.ema.updates,
        "state_keys": state_keys,
        "optimizers": optimizers,
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return str(write_dataset(tmp_path_factory.mktemp("ema"), good_entries(32, seed=4)))


@pytest.mark.slow
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


@pytest.mark.dist
@pytest.mark.slow
def test_the_dp_sharded_ema_equals_the_unsharded_one(dataset):
    sharded = run_distributed(_run, 2, dataset, ["--train-iters", "4", "--use-distributed-optimizer"])
    whole = run_distributed(_run, 2, dataset, ["--train-iters", "4"])
    for name, ema in whole[0]["ema"].items():
        assert torch.allclose(torch.from_numpy(sharded[0]["ema"][name]), torch.from_numpy(ema), atol=1e-6), name


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.skipif(megatron_fsdp_missing() is not None, reason="Megatron-FSDP needs megatron-core 0.17+")
def test_the_megatron_fsdp_ema_equals_the_unsharded_one(dataset):
    """Under Megatron-FSDP each DP rank keeps the EMA of its own main-weight shard, put in place by applied()."""
    sharded = run_distributed(_run, 2, dataset, ["--train-iters", "4", "--use-megatron-fsdp"])
    whole = run_distributed(_run, 2, dataset, ["--train-iters", "4"])
    assert sharded[0]["updates"] == whole[0]["updates"] == 4
    for name, ema in whole[0]["ema"].items():
        assert torch.allclose(torch.from_numpy(sharded[0]["ema"][name]), torch.from_numpy(ema), atol=1e-6), name


@pytest.mark.dist
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


@pytest.mark.dist
@pytest.mark.slow
def test_ema_resumes_beside_an_optimizer_with_fused_adams_contract(dataset, tmp_path):
    """The 2-process run with --save and the EMA saves (under ema.* keys, none in the optimizer's state) and
    resumes bit-exactly with FusedAdam's state contract in force."""
    from torch.distributed.checkpoint import FileSystemReader

    flags = ["--use-distributed-optimizer"]  # the EMA sharded as the optimizer: DP shards as they are
    straight = run_distributed(_run, 2, dataset, ["--train-iters", "4"] + flags, False, True)[0]
    ckpt = ["--save", str(tmp_path), "--save-interval", "2"]
    first = run_distributed(_run, 2, dataset, ["--train-iters", "2"] + flags + ckpt, False, True)[0]
    resumed = run_distributed(_run, 2, dataset, ["--train-iters", "4"] + flags + ckpt, False, True)[0]
    assert straight["optimizers"] == {"FusedAdamContract"}
    assert first["state_keys"] == {"exp_avg", "exp_avg_sq", "step"}  # the optimizer's own, no "ema"
    keys = FileSystemReader(str(tmp_path / "iter_0000002")).read_metadata().state_dict_metadata
    assert any(k.startswith("ema.dp_shards.decoder.layers.") for k in keys)
    assert not any("ema" in k for k in keys if k.startswith("optimizer."))
    for name, ema in straight["ema"].items():
        assert (resumed["ema"][name] == ema).all(), name
        assert (resumed["final"][name] == straight["final"][name]).all(), name


@pytest.mark.dist
@pytest.mark.slow
def test_a_dp_sharded_ema_is_saved_whole_for_a_fully_reshardable_checkpoint(dataset, tmp_path):
    """Beside --dist-ckpt-optim-fully-reshardable the DP shards of the EMA are put together into the model's
    layout, which one process loads (dit.generate's loader) equal to the run's EMA."""
    from tests.unit.dit.test_generate import _loaded

    flags = [
        "--train-iters",
        "3",
        "--use-distributed-optimizer",
        "--dist-ckpt-optim-fully-reshardable",
        "--save",
        str(tmp_path),
    ]
    ema = run_distributed(_run, 2, dataset, flags)[0]["ema"]
    loaded = run_distributed(_loaded, 1, str(tmp_path), False)[0]
    assert loaded.keys() == ema.keys()
    for name, weights in ema.items():
        assert (loaded[name] == weights).all(), name
