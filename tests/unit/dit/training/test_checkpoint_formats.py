"""The optimizer's checkpoint format under each optimizer, and the Megatron-FSDP run's refusal of a format it
cannot split, as one line naming the flag."""

from pathlib import Path

import pytest

from dit.errors import ConfigError
from dit.runtime.mcore019 import megatron_fsdp_missing
from dit.training.checkpointing import Layout, check_optimizer_format, optimizer_format


def test_megatron_fsdp_saves_the_format_ddp_runs_read():
    assert optimizer_format(True, False, megatron_fsdp=True) == "fully_reshardable"
    assert optimizer_format(True, False) == "dp_reshardable"
    assert optimizer_format(False, False) == "regular"


def test_megatron_fsdp_refuses_a_dp_reshardable_optimizer_state():
    layout = Layout(1, 1, 1, 2)
    check_optimizer_format({"optimizer_format": "fully_reshardable"}, True, layout, layout, Path("c"), True)
    with pytest.raises(ConfigError, match="--use-megatron-fsdp.*dp_reshardable.*--dist-ckpt-optim-fully-reshardable"):
        check_optimizer_format({"optimizer_format": "dp_reshardable"}, True, layout, layout, Path("c"), True)


@pytest.mark.skipif(megatron_fsdp_missing() is not None, reason="Megatron-FSDP needs megatron-core 0.17+")
def test_megatron_fsdp_checkpoints_beside_tp_are_refused_in_one_line(tiny_dataset):
    from dit.training.arguments import load_run_config
    from tests.tiny_data import TINY_RUN

    with pytest.raises(ConfigError, match="--use-megatron-fsdp.*checkpoints"):
        load_run_config(
            TINY_RUN
            + [
                "--data-path",
                tiny_dataset,
                "--use-megatron-fsdp",
                "--save",
                "/tmp/x",
                "--tensor-model-parallel-size",
                "2",
            ],
            4,
        )
