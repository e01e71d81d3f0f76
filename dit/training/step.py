"""One training step: the step's packs are fetched and counted first, then drawn, run and applied.

The loss of a step is the mean, over every sample of its packs (all micro-batches, all DP ranks), of
the sample's mean over its real tokens. Samples per pack vary, so the step's samples are counted over
DP before the backward, and each micro-batch's loss is divided by the step's samples per micro-batch
(``dit.diffusion.loss.microbatch_loss``): the update then depends on neither the layout nor the micro-batch split.
A step whose loss or gradient norm is not finite changes no weight and no optimizer state.
On a GPU a step reads device tensors on the host three times ("host read" below; the layers never do),
which ``tests/unit/dit/test_host_syncs.py`` holds it to.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from dit.diffusion import Objective
from dit.diffusion.draws import draw
from dit.diffusion.microbatch import DiffusionMicroBatch, diffusion_microbatch
from dit.errors import ConfigError, TrainingStopped
from dit.model.config import DiTConfig
from dit.model.packed import PackedBatch
from dit.training.flops import pack_flops
from dit.training.run_config import RunConfig

ForwardStep = Callable  # Megatron's forward_step_func(data_iterator, model) -> (output, loss_func)


@dataclass
class TrainingSetup:
    """What every step uses; built once by ``dit.training.pretrain``."""

    run: RunConfig
    config: DiTConfig  # run.model
    model: list[DistributedDataParallel]  # one model chunk (no virtual pipeline stages)
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    objective: Objective
    device: torch.device


@dataclass
class StepCounts:
    """The step's packs over all DP ranks."""

    packs: int
    samples: int
    real_tokens: int
    flops: float  # model FLOPs, forward + backward


@dataclass
class StepResult:
    loss: float  # mean over the step's samples (NaN or Inf on a skipped step)
    grad_norm: float
    skipped: bool
    counts: StepCounts
    keys: list[str]  # this rank's samples, in order


def count_step(
    packs: list[PackedBatch], config: DiTConfig, device: torch.device, stop: ConfigError | TrainingStopped | None = None
) -> StepCounts:
    """Samples, real tokens and FLOPs of this DP rank's packs, summed over DP (one all-reduce), which also
    tells every rank whether one of them could not read its packs (``stop``): then all raise that rank's
    error together (:func:`raise_agreed_stop`), none is left waiting in a collective."""
    local = [0.0, 0.0, 0.0, float(stop is not None)]
    for pack in packs:
        cu, cu_padded, cu_text = (x.tolist() for x in (pack.cu_seqlens, pack.cu_seqlens_padded, pack.cu_seqlens_text))
        local[0] += pack.num_samples
        local[1] += cu[-1]
        local[2] += pack_flops(config, cu, cu_padded, cu_text)
    total = torch.tensor(local, dtype=torch.float64, device=device)
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    samples, tokens, flops, stops = total.tolist()  # host read 1 of a step: the loss is divided by the step's samples
    if stops:
        raise_agreed_stop(stop)
    return StepCounts(
        packs=len(packs) * ps.get_data_parallel_world_size(),
        samples=round(samples),
        real_tokens=round(tokens),
        flops=flops,
    )


def raise_agreed_stop(stop: ConfigError | TrainingStopped | None) -> None:
    """Raise, on every rank of this DP group, the stop of its first rank that had one (the ranks of a replica
    read the same packs, so they stop alike). The entry point then ends the launch with that one line."""
    mine = (
        None
        if stop is None
        else (stop.flag, str(stop).split(": ", 1)[1])
        if isinstance(stop, ConfigError)
        else (None, str(stop))
    )
    stops: list[tuple[str | None, str] | None] = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(stops, mine, group=ps.get_data_parallel_group())
    flag, message = next(s for s in stops if s is not None)
    raise ConfigError(flag, message) if flag is not None else TrainingStopped(message)


def prepare_microbatches(
    setup: TrainingSetup, packs: list[PackedBatch], iteration: int, counts: StepCounts
) -> list[DiffusionMicroBatch]:
    run, cp = setup.run, ps.get_context_parallel_world_size()
    samples_per_microbatch = counts.samples / (len(packs) * ps.get_data_parallel_world_size())
    return [
        diffusion_microbatch(
            setup.objective,
            pack.to(setup.device),
            draw(
                pack,
                seed=run.training.seed,
                iteration=iteration,
                drop_prob=run.objective.text_drop_prob,
                cp_size=cp,
                cp_rank=ps.get_context_parallel_rank(),
            ),
            cp_size=cp,
            null_class=setup.config.num_classes,
            samples_per_microbatch=samples_per_microbatch,
        )
        for pack in packs
    ]


def _step_loss(logged: list[dict], device: torch.device) -> float:
    """The step's loss on every rank: the last stage's [sum, samples], summed over the world (every TP and
    CP rank of a replica holds the same sums, which cancel in the ratio)."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for entry in logged:
        total += entry["loss"].to(total)
    dist.all_reduce(total)
    return (total[0] / total[1]).item()  # host read 2 of a step: the logged loss, and the non-finite check


def apply_gradients(optimizer: MegatronOptimizer, loss: float, clip_grad: float) -> tuple[bool, float]:
    """Clip and step unless the loss or the gradient norm is not finite; return (updated, grad norm).

    This is Megatron's ``ChainedOptimizer.step`` with the non-finite check between the gradient norm and
    the update (without a loss scaler Megatron checks nothing, and a NaN norm never clips)."""
    found_inf = optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())  # host read 3 of a step (Megatron's .item()): clipping, log
    if found_inf or not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return False, grad_norm
    if clip_grad > 0:
        for chained in optimizer.chained_optimizers:
            params = chained.get_parameters()
            if params:
                clip_grad_by_total_norm_fp32(
                    params,
                    max_norm=clip_grad,
                    total_norm=grad_norm,
                    use_decoupled_grad=chained.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
                )
    return optimizer.step_with_ready_grads(), grad_norm


def train_step(
    setup: TrainingSetup,
    forward_step: ForwardStep,
    packs: list[PackedBatch],
    iteration: int,
    stop: ConfigError | TrainingStopped | None = None,
) -> StepResult:
    """Run one optimizer step on this DP rank's ``packs`` (its micro-batches of the global batch); ``stop``:
    why this rank could not read them, which stops every rank before the step (:func:`count_step`)."""
    counts = count_step(packs, setup.config, setup.device, stop)
    microbatches = prepare_microbatches(setup, packs, iteration, counts)
    for chunk in setup.model:
        chunk.zero_grad_buffer()
    setup.optimizer.zero_grad()
    logged = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=setup.model,
        num_microbatches=len(microbatches),
        seq_length=max(int(p.cu_seqlens_padded[-1]) for p in packs),
        micro_batch_size=1,
        forward_only=False,
    )
    loss = _step_loss(logged, setup.device)
    updated, grad_norm = apply_gradients(setup.optimizer, loss, setup.run.optimizer.clip_grad)
    if updated:
        setup.scheduler.step(increment=1)
    return StepResult(
        loss=loss,
        grad_norm=grad_norm,
        skipped=not updated,
        counts=counts,
        keys=[key for pack in packs for key in pack.keys],
    )
