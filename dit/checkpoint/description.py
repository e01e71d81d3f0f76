"""What a checkpoint stores about its model, written the same by training and by ``dit.convert import``, and
read back by resumed runs, ``dit.generate`` and ``dit.convert export``: the architecture
(``DiTConfig.architecture``) and the objective's parameters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dit.diffusion.config import ObjectiveConfig
from dit.errors import ConfigError
from dit.model.config import DiTConfig


def model_description(config: DiTConfig, objective: ObjectiveConfig | None = None) -> dict[str, Any]:
    """What every checkpoint stores about its model, training's and ``dit.convert import``'s alike: the
    architecture, and the objective where one trained it."""
    return {"model_config": config.architecture(), "objective": None if objective is None else objective.to_dict()}


LEGACY_IMPORT_CONFIG = "dit_config.json"
"""Where ``dit.convert import`` wrote the architecture before 2026-12, beside the checkpoint."""


def saved_architecture(common: dict[str, Any], path: Path) -> dict[str, Any]:
    """The model architecture of the checkpoint ``path`` with common state ``common``: its ``model_config``;
    in checkpoints written before 2026-12, the training run's flags (``args``, named like the fields) or an
    import's :data:`LEGACY_IMPORT_CONFIG`."""
    if "model_config" in common:
        return common["model_config"]
    if "args" in common:
        return common["args"]
    legacy = path / LEGACY_IMPORT_CONFIG
    if legacy.is_file():
        return json.loads(legacy.read_text())
    raise ConfigError(
        "--load",
        f"{path} stores no model architecture: it was not written by pretrain_dit.py or python -m dit.convert import",
    )


def saved_objective(common: dict[str, Any]) -> ObjectiveConfig | None:
    """The objective a checkpoint was trained with (None: an imported model, trained elsewhere)."""
    saved = common.get("objective") if "model_config" in common else common.get("args")  # None: an old import
    return None if saved is None else ObjectiveConfig.from_dict(saved)
