"""The optimizer's checkpoint format under each optimizer, and the Megatron-FSDP run's refusal of a format it
cannot split, as one line naming the flag."""

from pathlib import Path

import pytest

from dit.errors import ConfigError
from dit.runtime.distributed import ParallelLayout
from dit.training.checkpointing import check_optimizer_format, optimizer_format


def test_megatron_fsdp_saves_the_format_ddp_runs_read():
    assert optimizer_format(True, False, megatron_fsdp=True) == "fully_reshardable"
    assert optimizer_format(True, False) == "dp_reshardable"
    assert optimizer_format(False, False) == "regular"


def test_megatron_fsdp_refuses_a_dp_reshardable_optimizer_state():
    layout = ParallelLayout(data=2)
    check_optimizer_format({"optimizer_format": "fully_reshardable"}, True, layout, layout, Path("c"), True)
    with pytest.raises(ConfigError, match="--use-megatron-fsdp.*dp_reshardable.*--dist-ckpt-optim-fully-reshardable"):
        check_optimizer_format({"optimizer_format": "dp_reshardable"}, True, layout, layout, Path("c"), True)
