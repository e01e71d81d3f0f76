"""Megatron-FSDP (``--use-megatron-fsdp``): Megatron-Core's own fully sharded data parallel around a DiT.

Parameters, gradients and optimizer state are sharded over the data-parallel (x context-parallel) ranks,
strategy ``optim_grads_params`` (ZeRO-3), with TP and CP beside it: the layout Megatron-Bridge trains Wan 14B
with on Blackwell. Each DiT layer (a ``TransformerLayer``) is one FSDP unit: its weights are all-gathered
before its forward and its backward and its gradients reduce-scattered after its backward, so a GPU holds
1/DP of the weights, gradients and Adam state plus the layers in flight. Megatron's ``DistributedOptimizer``
steps FSDP's fp32 main-weight shards (``get_megatron_optimizer`` picks that path from the DDP config).
Wrapped as Megatron-LM's ``training.get_model`` wraps with ``--use-megatron-fsdp``.
"""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
from megatron.core.distributed.fsdp.mcore_fsdp_adapter import FullyShardedDataParallel

from dit.model.config import DiTConfig
from dit.model.model import DiTModel
from dit.runtime import cpu_backend
from dit.training.run_config import OptimizerConfig


def wrap_model_fsdp(model: DiTModel, config: DiTConfig, optim: OptimizerConfig) -> FullyShardedDataParallel:
    """Megatron-FSDP over ``model``; the schedule finalises gradients through ``config`` as under DDP."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=True,
        use_megatron_fsdp=True,
        data_parallel_sharding_strategy="optim_grads_params",
        # the layer-by-layer gathers and reductions run beside compute (FSDP's own prefetch)
        overlap_grad_reduce=True,
        overlap_param_gather=True,
        # gloo has no PREMUL_SUM (scale inside the reduction): on CPU the gradients are scaled, then summed
        gradient_reduce_div_fusion=not cpu_backend.is_active(),
    )
    device = None if torch.cuda.is_available() else torch.device("cpu")  # None: the current GPU, as Megatron-LM
    with cpu_backend.cuda_ordinal_device():
        fsdp = FullyShardedDataParallel(config, ddp_config, model, device=device)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = fsdp.no_sync  # micro-batches before the last accumulate without reducing
    config.grad_sync_func = fsdp.start_grad_sync
    return fsdp
