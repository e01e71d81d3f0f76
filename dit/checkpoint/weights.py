"""The model's weights out of a checkpoint, for sampling and export: its EMA or the trained weights, into a
bare model of any parallel layout. Reads what training saved without importing training."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

from dit.errors import ConfigError

if TYPE_CHECKING:
    from megatron.core.transformer.module import MegatronModule

# How a checkpoint keeps the EMA (its common state's ``ema.layout``), chosen with the optimizer's format
# (dit.training.checkpointing.ema_layout):
MODEL_SPACE = "model"  # "ema.<model key>", each tensor as the model's: loads under any layout (and in dit.generate)
DP_SHARDS = "dp_shards"  # each DP rank's flat shard as it is: fully parallel, only DP may change (dp_reshardable)


def saved_ema_layout(common: dict, path: Path, flag: str) -> str | None:
    """The layout of the EMA saved in ``path`` (None: it holds none)."""
    if common.get("ema") is None:
        return None
    if "layout" not in common["ema"]:
        raise ConfigError(
            flag,
            f"the checkpoint {path} keeps its EMA in the optimizer state, as this recipe did "
            "before 2026-12; pass --no-load-optim (training) or --no-ema (sampling, export)",
        )
    return common["ema"]["layout"]


def load_model_weights(model: MegatronModule, path: Path, use_ema: bool) -> str:
    """Only the weights of ``path`` into a bare model of any layout (sampling, export): its EMA, saved under
    ``ema.<key>`` in the model's layout, or the trained weights. Returns which."""
    common = dist_checkpointing.load_common_state_dict(str(path))
    layout = saved_ema_layout(common, path, "--no-ema") if use_ema else None
    use_ema = layout is not None  # an imported model or a run without an EMA: raw
    sharded = model.sharded_state_dict(metadata=ensure_metadata_has_dp_cp_group(None))
    if use_ema:
        if layout == DP_SHARDS:
            raise ConfigError(
                "--no-ema",
                f"the EMA of {path} is sharded like the distributed optimizer's "
                "dp_reshardable state, which only a training run of its layout reads; pass "
                "--no-ema, or train with --dist-ckpt-optim-fully-reshardable",
            )
        sharded = {
            k: replace(v, key="ema." + v.key) if isinstance(v, ShardedTensor) else v for k, v in sharded.items()
        }  # not the _extra_state objects, which stay the model's
    model.load_state_dict(dist_checkpointing.load({"model": sharded}, str(path))["model"])
    return "EMA" if use_ema else "raw"
