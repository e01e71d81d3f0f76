"""What a checkpoint says of its model, in the three forms on disk: today's ``model_config`` and ``objective``,
the flags (``args``) training saved before 2026-12, and an old import's ``dit_config.json`` beside it."""

import json

import pytest

from dit.checkpoint.description import model_description, saved_architecture, saved_objective
from dit.diffusion.config import ObjectiveConfig
from dit.errors import ConfigError
from dit.model.config import ARCHITECTURE_FIELDS, DiTConfig


def _config() -> DiTConfig:
    return DiTConfig(num_layers=2, hidden_size=48, num_attention_heads=4, transformer_impl="local")


def test_todays_checkpoint_round_trips_the_architecture_and_the_objective(tmp_path):
    objective = ObjectiveConfig(objective="edm", sigma_data=0.7)
    common = model_description(_config(), objective)
    assert set(common["model_config"]) == set(ARCHITECTURE_FIELDS)
    assert saved_architecture(common, tmp_path) == common["model_config"]
    assert saved_objective(common) == objective
    assert saved_objective(model_description(_config())) is None  # an import: trained elsewhere


def test_old_training_checkpoints_answer_from_their_flags(tmp_path):
    args = {"num_layers": 2, "hidden_size": 48, "objective": "flow", "flow_shift": 3.0, "lr": 1e-4}
    assert saved_architecture({"args": args}, tmp_path) is args
    assert saved_objective({"args": args}) == ObjectiveConfig(objective="flow", flow_shift=3.0)


def test_an_old_import_answers_from_its_json_and_names_no_objective(tmp_path):
    (tmp_path / "dit_config.json").write_text(json.dumps({"num_layers": 2}))
    assert saved_architecture({}, tmp_path) == {"num_layers": 2}
    assert saved_objective({}) is None


def test_a_folder_with_no_architecture_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="stores no model architecture"):
        saved_architecture({}, tmp_path)
