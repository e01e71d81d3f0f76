"""A step with a non-finite gradient changes no weight and no optimizer state, is counted, and too many in
a row stop the run with one line (the gradient is poisoned in the backward, the loss stays finite)."""

from dataclasses import replace

import pytest
import torch

import pretrain_dit
from dit.errors import TrainingStopped
from dit.training.arguments import load_run_config
from dit.training.pretrain import pretrain
from tests.distributed import run_distributed
from tests.tiny_data import TINY_RUN, good_entries, write_dataset

FLAGS = TINY_RUN + ["--lr", "1e-3", "--lr-decay-style", "constant"]

_calls = {"n": 0, "weights": []}


def _poisoning_forward_step(poisoned: set[int]):
    def forward_step(data_iterator, model):
        _calls["n"] += 1  # one micro-batch a step: the call count is the iteration
        _calls["weights"].append({n: p.detach().clone() for n, p in model.named_parameters()})
        output, loss_func = pretrain_dit.forward_step(data_iterator, model)
        if _calls["n"] in poisoned:
            output.register_hook(lambda grad: grad * float("nan"))
        return output, loss_func

    return forward_step


def _run(data_path: str, extra: list[str], poisoned: set[int]):
    import torch.distributed as dist

    run = load_run_config(FLAGS + ["--data-path", data_path] + extra, dist.get_world_size())
    try:
        result = pretrain(run, replace(pretrain_dit.HOOKS, forward_step=_poisoning_forward_step(poisoned)))
    except TrainingStopped as e:
        return {"stopped": str(e), "calls": _calls["n"]}
    adam = result.setup.optimizer.chained_optimizers[0].optimizer
    steps = {int(s["step"]) for s in adam.state.values()}
    model = result.setup.model[0].module
    ema = None
    if result.ema is not None:
        with result.ema.applied():
            ema = {
                "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
                "updates": result.ema.updates,
            }
    return {
        "history": [(r.iteration, r.skipped, r.loss, r.grad_norm, r.learning_rate) for r in result.history],
        "skipped": result.state.skipped_steps,
        "adam_steps": steps,
        "weights": _calls["weights"],
        "final": {n: p.detach().clone() for n, p in model.named_parameters()},
        "ema": ema,
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return str(write_dataset(tmp_path_factory.mktemp("nan"), good_entries(24, seed=3)))


@pytest.mark.slow
def test_a_poisoned_step_changes_nothing_and_is_counted(dataset):
    r = run_distributed(_run, 1, dataset, ["--train-iters", "4", "--lr-warmup-iters", "2"], {2})[0]
    skipped = [it for it, was_skipped, *_ in r["history"] if was_skipped]
    assert skipped == [2] and r["skipped"] == 1
    _, _, loss, grad_norm, _ = r["history"][1]
    assert torch.isfinite(torch.tensor(loss)) and not torch.isfinite(torch.tensor(grad_norm))
    before, after = r["weights"][1], r["weights"][2]  # at the start of steps 2 and 3
    assert all(torch.equal(before[n], after[n]) for n in before), "the skipped step changed a weight"
    assert any(not torch.equal(r["weights"][2][n], r["weights"][3][n]) for n in before)  # step 3 trained
    assert r["adam_steps"] == {3}  # Adam stepped for iterations 1, 3 and 4 only
    # the schedule did not advance on the skipped step: warm-up reaches the peak one step late
    assert [lr for *_, lr in r["history"]] == pytest.approx([5e-4, 5e-4, 1e-3, 1e-3])


def test_consecutive_poisoned_steps_stop_the_run(dataset):
    r = run_distributed(_run, 1, dataset, ["--train-iters", "20", "--max-skipped-steps", "3"], set(range(2, 21)))[0]
    assert r["calls"] == 4  # steps 2, 3 and 4 were skipped, then it stopped
    assert "3 consecutive steps had a non-finite loss or gradient norm (iteration 4" in r["stopped"]
    assert "--max-skipped-steps 3" in r["stopped"]


def test_a_poisoned_step_leaves_the_ema_and_its_update_count_alone(dataset):
    """Steps 1, 3 and 4 update the EMA, step 2 (poisoned) does not: with w_i the weights after step i,
    ema = d^3 w_0 + (1 - d) (d^2 w_1 + d w_3 + w_4) (updating on step 2 too would add a term and a count)."""
    d = 0.8
    r = run_distributed(_run, 1, dataset, ["--train-iters", "4", "--ema-decay", str(d), "--no-ema-warmup"], {2})[0]
    assert [it for it, was_skipped, *_ in r["history"] if was_skipped] == [2]
    # w_0 .. w_4: the weights at the start of steps 1 to 4 (recorded through DDP: "module." names), then the end
    w = [{n.removeprefix("module."): p for n, p in step.items()} for step in r["weights"]] + [r["final"]]
    assert r["ema"]["updates"] == 3
    for name, ema in r["ema"]["weights"].items():
        closed = d**3 * w[0][name] + (1 - d) * (d**2 * w[1][name] + d * w[3][name] + w[4][name])
        assert torch.allclose(ema, closed, atol=1e-6), name
