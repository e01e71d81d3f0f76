"""EMA of the weights: fp32 buffers of its own, beside the optimizer's main weights and sharded like them.

One buffer per main weight, so with ``--use-distributed-optimizer`` or ``--use-megatron-fsdp`` a DP rank keeps
the EMA of its own shard only (4 bytes per parameter / DP: DiT-7B at TP2 would otherwise spend 14 GB per GPU on
a full copy). The
buffers are not in the optimizer's per-parameter state: Transformer Engine's ``FusedAdam`` (which
Megatron-Core picks whenever TE imports) saves and loads only the state keys it knows (``exp_avg``,
``exp_avg_sq``, ``master_param``) and raises on any other, so any optimizer Megatron-Core picks can hold
the moments while this module saves the EMA under keys of its own (:meth:`EMA.sharded_state_dict`).

It is updated after every successful step (never after a skipped one); with ``--ema-warmup`` the decay
ramps up as min(decay, (1 + n) / (10 + n)) over the n updates so far, so that a short run's EMA is not
still dominated by the initial weights (with 0.9999 and no warm-up, half of it would be the initial
weights after 7000 steps).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from dit.checkpoint.weights import DP_SHARDS, MODEL_SPACE
from dit.training.optimizer import publish_main_params
from dit.training.step import TrainingSetup


def ema_decay(decay: float, updates: int, warmup: bool) -> float:
    """The decay of update number ``updates + 1``."""
    return min(decay, (1 + updates) / (10 + updates)) if warmup else decay


@dataclass
class MainWeight:
    """One main weight of the optimizer and where it sits in the model."""

    main: torch.Tensor  # fp32; under the distributed optimizer this rank's 1-D shard of ``param``
    param: torch.nn.Parameter  # the model parameter
    start: int  # the shard's range in ``param.view(-1)`` (0, numel without the distributed optimizer)
    end: int
    group: dist.ProcessGroup | None  # the DP group the shards of ``param`` are spread over, None: unsharded


def main_weights(optimizer: MegatronOptimizer) -> list[MainWeight]:
    """Every main weight of Megatron's (chained) optimizer, paired with its model parameter."""
    weights = []
    for chained in optimizer.chained_optimizers:
        if isinstance(chained, DistributedOptimizer) and chained.ddp_config.use_megatron_fsdp:
            # Megatron-FSDP's fp32 main weights: each rank's flat slice of every parameter, which its optimizer
            # steps; the EMA keeps the same slices
            from dit.training import fsdp  # megatron-core 0.17+ only

            slices = fsdp.shards(chained.model_chunks[0])
            weights += [MainWeight(s.main, s.param, s.start, s.end, s.group) for s in slices]
        elif isinstance(chained, DistributedOptimizer):
            groups = (
                (chained.model_float16_groups, chained.shard_fp32_from_float16_groups),
                (chained.model_fp32_groups, chained.shard_fp32_groups),
            )
            shards = {
                id(param): shard
                for models, mains in groups
                for model_group, shard_group in zip(models, mains)
                for param, shard in zip(model_group, shard_group)
            }
            # Every parameter of the gradient buffers, in their order (the same on every DP rank, which the
            # gathers of ``_whole`` need), with an empty shard where it lies wholly in other ranks' shards.
            for param in (p for buffer in chained.buffers for p in buffer.params):
                if id(param) in shards:
                    span = chained._get_model_param_range_map(param)["param"]
                    main, start, end = shards[id(param)], span.start, span.end
                else:
                    main, start, end = param.detach().new_empty(0, dtype=torch.float32), 0, 0
                weights.append(MainWeight(main, param, start, end, chained.data_parallel_group))
        elif hasattr(chained, "float16_groups"):  # Float16OptimizerWithFloat16Params: fp32 copies of bf16 weights
            pairs = [
                pair
                for models, mains in (
                    (chained.float16_groups, chained.fp32_from_float16_groups),
                    (chained.fp32_from_fp32_groups, chained.fp32_from_fp32_groups),
                )
                for model_group, main_group in zip(models, mains)
                for pair in zip(model_group, main_group)
            ]
            weights += [MainWeight(main, param, 0, param.numel(), None) for param, main in pairs]
        else:  # FP32Optimizer: the model's own weights
            params = [p for group in chained.optimizer.param_groups for p in group["params"]]
            weights += [MainWeight(p, p, 0, p.numel(), None) for p in params]
    return weights


class EMA:
    def __init__(self, setup: TrainingSetup, decay: float, warmup: bool):
        self.setup, self.decay, self.warmup = setup, decay, warmup
        self.slots = main_weights(setup.optimizer)
        self.buffers: list[torch.Tensor] = []
        self.updates = 0
        self.reset()

    def reset(self) -> None:
        """Start from the current main weights (a new run, or weights loaded without their EMA)."""
        self.buffers = [s.main.detach().float().clone() for s in self.slots]
        self.updates = 0

    def update(self) -> None:
        d = ema_decay(self.decay, self.updates, self.warmup)
        with torch.no_grad():
            torch._foreach_mul_(self.buffers, d)
            torch._foreach_add_(self.buffers, [s.main.float() for s in self.slots], alpha=1 - d)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the EMA weights inside the block (validation), its own weights again after."""
        with torch.no_grad():
            saved = [s.main.detach().clone() for s in self.slots]
            for s, ema in zip(self.slots, self.buffers):
                s.main.copy_(ema)
            publish_main_params(self.setup.optimizer, self.setup.model)
        try:
            yield
        finally:
            with torch.no_grad():
                for s, original in zip(self.slots, saved):
                    s.main.copy_(original)
                publish_main_params(self.setup.optimizer, self.setup.model)

    def state_dict(self) -> dict:
        """The scalars; the buffers are saved through :meth:`sharded_state_dict`."""
        return {"decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]

    def sharded_state_dict(self, model: dict, layout: str, is_loading: bool = False) -> dict[str, ShardedTensor]:
        """The buffers as dist-checkpoint tensors in ``layout`` (``MODEL_SPACE`` or ``DP_SHARDS``), keyed after
        the model's sharded state ``model``; with ``is_loading`` the request :meth:`load_sharded` takes."""
        by_param = _model_tensors(model)
        tensors = {}
        for i, (s, ema) in enumerate(zip(self.slots, self.buffers)):  # by slot: stacked layers share a key
            sh = by_param[id(s.param)]
            if layout == DP_SHARDS:
                if s.end > s.start:  # the other DP ranks hold all of it
                    tensors[str(i)] = _dp_shard(sh, s, ema)
            else:
                whole = torch.empty(s.param.shape, device=ema.device) if is_loading else _whole(s, ema)
                tensors[str(i)] = replace(sh, key=f"ema.{sh.key}", data=whole, dtype=torch.float32)
        return tensors

    def load_sharded(self, loaded: dict[str, torch.Tensor], layout: str) -> None:
        """Copy what ``dist_checkpointing.load`` returned for :meth:`sharded_state_dict` into the buffers."""
        with torch.no_grad():
            for i, (s, ema) in enumerate(zip(self.slots, self.buffers)):
                if str(i) not in loaded:
                    continue  # no shard on this rank
                value = loaded[str(i)]
                ema.copy_(value.view(-1)[s.start : s.end].view_as(ema) if layout == MODEL_SPACE else value.view_as(ema))


def _model_tensors(model: dict) -> dict[int, ShardedTensor]:
    """The model's sharded tensors by the id of the parameter each holds."""
    return {id(v.data): v for v in model.values() if isinstance(v, ShardedTensor)}


def _whole(s: MainWeight, ema: torch.Tensor) -> torch.Tensor:
    """The EMA of the whole (TP-local) parameter: the DP shards summed into place over the DP group."""
    if s.group is None:
        return ema.view(s.param.shape)
    whole = torch.zeros(s.param.numel(), dtype=torch.float32, device=ema.device)
    whole[s.start : s.end] = ema
    dist.all_reduce(whole, group=s.group)  # each element lives on exactly one DP rank
    return whole.view(s.param.shape)


def _dp_shard(sh: ShardedTensor, s: MainWeight, ema: torch.Tensor) -> ShardedTensor:
    """This rank's flat shard as a row of a ``[TP fragments, numel]`` tensor: row f holds the flattened
    fragment f of the model tensor ``sh``, and the DP ranks' shards of each fragment cover it exactly."""
    shape = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
    fragments = [g // n for g, n in zip(sh.global_shape, shape)]
    row = int(np.ravel_multi_index([o // n for o, n in zip(sh.global_offset, shape)], fragments))
    numel = s.param.numel()
    pp, tp = sh.replica_id[:2] if isinstance(sh.replica_id, tuple) else (0, sh.replica_id)
    return ShardedTensor(
        key=f"ema.dp_shards.{sh.key}",
        data=ema.view(1, -1),
        dtype=torch.float32,
        local_shape=(1, s.end - s.start),
        global_shape=(int(np.prod(fragments)), numel),
        global_offset=(row, s.start),
        axis_fragmentations=None,
        replica_id=(pp, tp, 0),
    )  # TP and PP copies are replicas; DP shards are not
