"""Megatron-FSDP (``--use-megatron-fsdp``): Megatron-Core's own fully sharded data parallel around a DiT.

Parameters, gradients and optimizer state are sharded over the data-parallel (x context-parallel) ranks,
strategy ``optim_grads_params`` (ZeRO-3), with TP and CP beside it: the layout Megatron-Bridge trains Wan 14B
with on Blackwell. Each DiT layer (a ``TransformerLayer``) is one FSDP unit: its weights are all-gathered
before its forward and its backward and its gradients reduce-scattered after its backward, so a GPU holds
1/DP of the weights, gradients and Adam state plus the layers in flight. Megatron's ``DistributedOptimizer``
steps FSDP's fp32 main-weight shards (``get_megatron_optimizer`` picks that path from the DDP config).
Wrapped as Megatron-LM's ``training.get_model`` wraps with ``--use-megatron-fsdp``.

Checkpoints: Megatron-Core 0.19 saves the FSDP optimizer only in its ``fsdp_dtensor`` format
(``DistributedOptimizer.sharded_state_dict`` raises NotImplementedError for any other), which no DDP run reads.
So the weights, the fp32 main weights and the Adam moments are saved here as the distributed optimizer's
``fully_reshardable`` format saves them: whole (TP-local) tensors under the model's keys, put together from the
DP slices (:func:`whole`; on every DP rank, one parameter at a time, as that format gathers them), and on load
each rank takes its slice of them. A DDP run loads such a checkpoint and FSDP loads a DDP run's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
from megatron.core.distributed.fsdp.mcore_fsdp_adapter import FullyShardedDataParallel
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer.optimizer import param_group_identifier_keys
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
from torch.distributed.tensor import DTensor

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


@dataclass
class Shard:
    """One parameter under Megatron-FSDP: this rank's flat slice of it in FSDP's buffers."""

    name: str  # the parameter's name in the model
    param: torch.nn.Parameter  # the model's own parameter (its shape; FSDP frees its storage between uses)
    main: torch.Tensor  # this rank's slice of the fp32 main weight (the optimizer's DTensor's local part), flat
    dist_param: DTensor  # the optimizer's parameter, which keys its Adam state
    start: int  # the slice's range in ``param.view(-1)``
    end: int
    group: dist.ProcessGroup  # the DP (x CP) group the slices of ``param`` are spread over


def shards(fsdp: FullyShardedDataParallel) -> list[Shard]:
    """Every parameter's slice on this rank, in FSDP's buffer order (the same on every DP rank, as the gathers of
    :func:`whole` need)."""
    buffer = fsdp.module.param_and_grad_buffer
    dist_params = dict(buffer.optimizer_named_parameters)
    out = []
    for group in buffer.parameter_groups:
        main_buffer = group.main_weight_buffer or group.model_weight_buffer  # the one the optimizer steps
        for item_id, param in enumerate(group.params):
            name = buffer.param_to_name[param]
            start, end = main_buffer._get_item_slice_in_shard(item_id)
            main = dist_params[name].to_local().view(-1)
            assert main.numel() == end - start, (name, main.numel(), start, end)
            out.append(Shard(name, param, main, dist_params[name], start, end, main_buffer.data_parallel_group))
    return out


def whole(shard: Shard, local: torch.Tensor) -> torch.Tensor:
    """The whole (TP-local) parameter-shaped tensor of which ``local`` is this rank's slice: the slices summed
    into place over the DP group (each element lives on exactly one rank)."""
    full = torch.zeros(shard.param.numel(), dtype=local.dtype, device=local.device)
    full[shard.start : shard.end] = local.view(-1)
    dist.all_reduce(full, group=shard.group)
    return full.view(shard.param.shape)


def model_sharded_state(fsdp: FullyShardedDataParallel) -> dict:
    """The model's sharded state over its own parameters (whose storage FSDP frees): the keys, shapes and TP
    offsets of a DDP run's checkpoint, for :func:`with_data` to fill.

    Built while the module holds its raw (TP-local) parameters: between steps it holds FSDP's DTensors, whose
    shape under TP is the whole, TP-gathered one (``make_fsdp_dtensor``), and the TP offsets would be computed
    from it. FSDP swaps the same way around its own state dicts (``MegatronFSDP._replace_param_with_raw_if_needed``),
    and puts the DTensors back in a ``state_dict`` pre-hook of every submodule, which ``sharded_state_dict`` runs:
    that swap is held off (an instance attribute shadowing the method the hook calls) until the state is built.
    """
    inner = fsdp.module
    distributed = inner.is_param_fsdp_distributed
    inner._replace_param_with_raw_if_needed()
    inner._replace_param_with_distributed_if_needed = lambda: None
    try:
        sharded = inner.module.sharded_state_dict(metadata=ensure_metadata_has_dp_cp_group(None))
    finally:
        del inner._replace_param_with_distributed_if_needed
        if distributed:
            inner._replace_param_with_distributed_if_needed()
    raw = inner.raw_param
    return {k: replace(v, data=raw[k]) if isinstance(v, ShardedTensor) and k in raw else v for k, v in sharded.items()}


def with_data(model: dict, slots: list[Shard], is_loading: bool) -> dict:
    """``model`` with each parameter's data the whole weight put together from the main-weight slices, cast to
    the model's dtype (as the model holds after a step), or with ``is_loading`` an empty tensor to load into."""
    by_name = {s.name: s for s in slots}
    out = dict(model)
    for k, s in by_name.items():
        data = (
            torch.empty(s.param.shape, dtype=s.param.dtype, device=s.main.device)
            if is_loading
            else whole(s, s.main).to(s.param.dtype)
        )
        out[k] = replace(model[k], data=data)
    return out


def optimizer_sharded_state(optimizer: MegatronOptimizer, model: dict, slots: list[Shard], is_loading: bool) -> dict:
    """The optimizer's state as the distributed optimizer's ``fully_reshardable`` format holds it (so a DDP run
    loads it and FSDP loads a DDP run's): the param groups, and per parameter its fp32 main weight and Adam
    moments as whole tensors under ``optimizer.state.<name>.<model key>``."""
    (chained,) = optimizer.chained_optimizers
    by_param = {id(v.data): v for v in model.values() if isinstance(v, ShardedTensor)}
    param_state = {}
    for i, s in enumerate(slots):
        sh = by_param[id(s.param)]
        tensors = {"param": s.main}
        tensors.update({k: v.to_local() for k, v in chained.optimizer.state[s.dist_param].items() if k in _MOMENTS})
        param_state[i] = {
            k: replace(
                sh,
                key=f"optimizer.state.{k}.{sh.key}",
                dtype=torch.float32,
                data=torch.empty(s.param.shape, dtype=torch.float32, device=s.main.device)
                if is_loading
                else whole(s, v.float()),
            )
            for k, v in tensors.items()
        }
    return {
        "optimizer": {"param_groups": _param_groups(chained.optimizer)},
        "param_state": param_state,
        "param_state_sharding_type": "fully_reshardable",
    }


def _param_groups(adam: torch.optim.Optimizer) -> list[dict]:
    """The param groups without their parameters, each with the step count, as ``DistributedOptimizer.state_dict``
    writes them. Not through it: a parameter wholly in other ranks' slices gets no gradient here, so torch Adam's
    per-parameter steps differ (behind for those), which it asserts against; the step count is the largest."""
    step = max((int(state["step"]) for state in adam.state.values() if "step" in state), default=0)
    return [{"step": step, **{k: v for k, v in group.items() if k != "params"}} for group in adam.param_groups]


_MOMENTS = ("exp_avg", "exp_avg_sq")


def load_weights(slots: list[Shard], model: dict) -> None:
    """Each rank's slice of the loaded whole weights into the main weights (publish them into the model after)."""
    with torch.no_grad():
        for s in slots:
            s.main.copy_(model[s.name].view(-1)[s.start : s.end])


def load_optimizer(optimizer: MegatronOptimizer, slots: list[Shard], loaded: dict) -> None:
    """The state :func:`optimizer_sharded_state` requested, loaded: each rank's slices of the main weights and Adam
    moments, the param groups matched by their configuration (as the distributed optimizer matches them) and
    torch Adam's per-parameter step."""
    (chained,) = optimizer.chained_optimizers
    with torch.no_grad():
        for i, s in enumerate(slots):
            tensors = loaded["param_state"][i]
            s.main.copy_(tensors["param"].view(-1)[s.start : s.end])
            state = chained.optimizer.state[s.dist_param]
            for k in _MOMENTS:
                state[k].to_local().view(-1).copy_(tensors[k].view(-1)[s.start : s.end])
    saved = {_group_id(g): g for g in loaded["optimizer"]["param_groups"]}
    for group in chained.optimizer.param_groups:
        group.update({k: v for k, v in saved[_group_id(group)].items() if k != "params"})
    for group in chained.optimizer.param_groups:
        for p in group["params"]:
            if "step" in chained.optimizer.state[p] and "step" in group:
                chained.optimizer.state[p]["step"] = torch.tensor(float(group["step"]))


def _group_id(group: dict) -> tuple:
    return tuple(group.get(k, group.get(f"pre_{k}")) for k in param_group_identifier_keys)
