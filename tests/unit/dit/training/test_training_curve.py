"""A short run of the tiny model (tests/loss_curve.py): its loss curve is the stored one, and a run resumed
from its checkpoint halfway continues on exactly the next samples with the same losses, in one process."""

import json

import pytest

from tests import loss_curve

RESUMED_AT = 4
# The stored curve was made on this stack (its "stack" entry) and reproduces to the last bit here. 1e-5 leaves room
# for another CPU's or BLAS build's summation order (a few ulps per operation), and no more: the timestep scale
# changed by 0.1% (1000 -> 999) moves the grad norm of iteration 4 by 1.3e-4 relative; a change of the model, the
# objective, the draws, the data order or the optimizer moves the curve by far more.
CURVE_RTOL = 1e-5


@pytest.fixture(scope="module")
def straight(tiny_dataset: str, tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    return loss_curve.train(tiny_dataset, tmp_path_factory.mktemp("straight"), loss_curve.ITERS)


def test_the_tiny_runs_loss_curve_is_the_stored_one(straight: dict[int, dict]):
    stored = {int(it): r for it, r in json.loads(loss_curve.ASSET.read_text())["iterations"].items()}
    assert sorted(straight) == sorted(stored) == list(range(1, loss_curve.ITERS + 1))
    for it, expected in stored.items():
        assert straight[it]["keys"] == expected["keys"], it
        assert straight[it]["loss"] == pytest.approx(expected["loss"], rel=CURVE_RTOL), it
        assert straight[it]["grad_norm"] == pytest.approx(expected["grad_norm"], rel=CURVE_RTOL), it


def test_a_resumed_run_continues_on_exactly_the_next_samples(straight: dict[int, dict], tiny_dataset: str, tmp_path):
    ckpt = ["--save", str(tmp_path / "ckpt"), "--save-interval", str(RESUMED_AT)]
    loss_curve.train(tiny_dataset, tmp_path / "first", RESUMED_AT, *ckpt)
    resumed = loss_curve.train(tiny_dataset, tmp_path / "resumed", loss_curve.ITERS, *ckpt)
    assert sorted(resumed) == list(range(RESUMED_AT + 1, loss_curve.ITERS + 1))  # it started after the checkpoint
    for it, record in resumed.items():
        assert record["keys"] == straight[it]["keys"], it  # the same samples in the same order
        assert (record["loss"], record["grad_norm"]) == (straight[it]["loss"], straight[it]["grad_norm"]), (
            it
        )  # bit-exact
