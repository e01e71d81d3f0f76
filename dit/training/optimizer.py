"""Megatron's DDP wrapper, AdamW (``get_megatron_optimizer``) and ``OptimizerParamScheduler`` for a DiT.

bf16 runs keep fp32 main weights and reduce gradients in fp32. No weight decay on biases and norms
(Megatron's standard rule: every 1-D parameter and every bias) nor on embedding tables.
"""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import (
    ChainedOptimizer,
    MegatronOptimizer,
    OptimizerConfig,
    ParamKey,
    get_megatron_optimizer,
    get_standard_config_overrides,
)
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, ParamGroupOverride

from dit.model.config import DiTConfig
from dit.model.model import DiTModel
from dit.training import run_config

EMBEDDING_TABLES = ("*class_embedder.table.weight",)


def wrap_model(model: DiTModel, config: DiTConfig, optim: run_config.OptimizerConfig) -> DistributedDataParallel:
    """Megatron DDP (or Megatron-FSDP) over ``model``; the schedule finalises (reduces) gradients through
    ``config``."""
    if optim.use_megatron_fsdp:
        from dit.training.fsdp import wrap_model_fsdp  # megatron-core 0.17+ only (dit.runtime.mcore019)

        return wrap_model_fsdp(model, config, optim)
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=optim.overlap_grad_reduce,
            use_distributed_optimizer=optim.use_distributed_optimizer,
        ),
        model,
    )
    config.finalize_model_grads_func = finalize_model_grads
    if optim.overlap_grad_reduce:  # the schedule starts each bucket's reduction when its last grad is ready
        config.no_sync_func = ddp.no_sync
        config.grad_sync_func = ddp.start_grad_sync
    return ddp


def build_optimizer(optim: run_config.OptimizerConfig, model: list[DistributedDataParallel]) -> MegatronOptimizer:
    """Megatron's AdamW over the DDP-wrapped ``model``, in the model config's precision."""
    config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=model[0].config.bf16,
        params_dtype=model[0].config.params_dtype,
        use_distributed_optimizer=optim.use_distributed_optimizer,
    )
    overrides = get_standard_config_overrides(config)
    overrides[ParamKey(name=EMBEDDING_TABLES)] = ParamGroupOverride(wd_mult=0.0)
    optimizer = get_megatron_optimizer(config, model, config_overrides=overrides)
    # one model chunk under Megatron-FSDP comes back unchained; the loop and the EMA walk chained_optimizers
    return optimizer if isinstance(optimizer, ChainedOptimizer) else ChainedOptimizer([optimizer])


def build_scheduler(
    optim: run_config.OptimizerConfig, optimizer: MegatronOptimizer, train_iters: int
) -> OptimizerParamScheduler:
    """Linear warm-up from 0, then constant, linear or cosine decay to ``--min-lr``; one step per iteration."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.lr_warmup_iters,
        lr_decay_steps=optim.lr_decay_iters,
        lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=train_iters,
        wd_incr_style="constant",
    )


def allocate_state(optimizer: MegatronOptimizer) -> None:
    """Create the Adam state of every main parameter that has none yet (same values as the first step would).

    Megatron's checkpoint requests are built from that state: without TE or apex,
    ``DistributedOptimizer.state_dict`` also reads each state's ``step``, which only torch's Adam keeps.
    """
    for chained in optimizer.chained_optimizers:
        chained.init_state_fn(chained.optimizer, chained.config)
        if isinstance(chained.optimizer, torch.optim.Adam):  # torch's AdamW is a subclass
            for state in chained.optimizer.state.values():
                state.setdefault("step", torch.tensor(0.0))


def publish_main_params(optimizer: MegatronOptimizer, model: list[DistributedDataParallel]) -> None:
    """Copy the main weights into the model (and all-gather them under the distributed optimizer), as
    Megatron's ``step_with_ready_grads`` does after the inner step; fp32 runs without it share the tensors."""
    for chained in optimizer.chained_optimizers:
        if hasattr(chained, "_copy_main_params_to_model_params"):
            chained._copy_main_params_to_model_params()
    if optimizer.config.use_distributed_optimizer:
        for chunk in model:
            chunk.start_param_sync(force_sync=True)
