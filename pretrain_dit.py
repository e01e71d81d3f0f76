"""Pretrain a DiT with Megatron-Core on energon data.

    torchrun --nproc-per-node 2 pretrain_dit.py --config examples/digits.yaml

Like Megatron-LM's pretrain_gpt.py this file holds only the hooks (model provider, forward step,
loss function, data provider) and a short main; the loop lives in dit/training/, the diffusion
objectives in dit/diffusion/, the data path in data/.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING

from dit.runtime.console import quiet_library_warnings
from dit.training.hooks import Hooks
from dit.training.main import main

if TYPE_CHECKING:
    from torch import Tensor

    from data.loader.dataloader import DiTDataLoader
    from data.loader.launch_check import Launch
    from dit.diffusion.microbatch import DiffusionMicroBatch
    from dit.model.config import DiTConfig
    from dit.model.model import DiTModel
    from dit.training.run_config import RunConfig

quiet_library_warnings()


def launch_check(run: RunConfig) -> Launch:
    """The checked run against its layout and the dataset itself, before any process group
    (data/loader/launch_check.py)."""
    from data.loader.launch_check import check_launch

    return check_launch(run)


def model_provider(config: DiTConfig, pre_process: bool = True, post_process: bool = True) -> DiTModel:
    """This pipeline stage's DiTModel."""
    from dit.model.model import DiTModel

    return DiTModel(config, pre_process=pre_process, post_process=post_process)


def loss_func(microbatch: DiffusionMicroBatch, output: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-sample mean over real tokens, weighted, normalised by the step's samples (dit/diffusion/loss.py)."""
    from megatron.core import parallel_state

    from dit.diffusion.loss import microbatch_loss

    return microbatch_loss(
        output,
        target=microbatch.target,
        batch=microbatch.batch,
        weights=microbatch.weights,
        cp_group=parallel_state.get_context_parallel_group(),
        samples_per_microbatch=microbatch.samples_per_microbatch,
    )


def forward_step(data_iterator: Iterator[DiffusionMicroBatch], model: DiTModel):
    """One micro-batch through this stage: noisy tokens and one timestep per sample in, prediction out."""
    microbatch = next(data_iterator)
    output = model(microbatch.inputs, microbatch.timesteps, microbatch.batch)
    return output, partial(loss_func, microbatch)


def train_data_provider(run: RunConfig) -> DiTDataLoader:
    """The energon loader of packed micro-batches, already cut to this rank."""
    from data.loader.dataloader import build_train_loader

    return build_train_loader(run)


def valid_data_provider(run: RunConfig) -> DiTDataLoader:
    """The validation packs, the same ones in the same order at every call."""
    from data.loader.dataloader import build_valid_loader

    return build_valid_loader(run)


HOOKS = Hooks(
    launch_check=launch_check,
    model_provider=model_provider,
    forward_step=forward_step,
    train_data_provider=train_data_provider,
    valid_data_provider=valid_data_provider,
)

if __name__ == "__main__":  # spawn-safe: dist checkpointing's writer re-imports __main__
    sys.exit(main(HOOKS))
