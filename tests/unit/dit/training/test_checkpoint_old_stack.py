"""The checkpoint megatron-core 0.16.1 wrote (tests/old_checkpoint.py) loads on this stack and resumes the run
with the losses the old stack logged: the model, the optimizer, the schedule, the RNG and the loader state
all carry over."""

import json

import pytest

from tests import old_checkpoint

pytestmark = pytest.mark.slow


def test_the_old_stacks_checkpoint_resumes_with_its_losses(tmp_path):
    expected = json.loads((old_checkpoint.ASSET / "losses.json").read_text())["losses"]
    data = old_checkpoint.dataset(tmp_path / "data")
    losses = old_checkpoint.train(data, tmp_path / "run", old_checkpoint.ITERS, "--load", str(old_checkpoint.ASSET))
    assert sorted(losses) == [int(it) for it in sorted(expected)]  # it started after the saved iteration
    for it, loss in expected.items():
        assert losses[int(it)] == pytest.approx(loss, rel=1e-6), it


def test_the_old_checkpoints_flags_give_its_model(tmp_path):
    """Written before checkpoints stored ``model_config``: its saved flags rebuild the model (dit.convert export,
    dit.generate) that its recipe describes, field for field."""
    from dit.convert import checkpoint_config, resolve_checkpoint
    from dit.training.arguments import load_run_config

    config = checkpoint_config(resolve_checkpoint(old_checkpoint.ASSET))
    run = load_run_config([*old_checkpoint.FLAGS, "--save", str(tmp_path)], need_data=False)
    assert config.architecture() == run.model.architecture()
