"""``pretrain()``: set-up and the training loop, driven by the hooks of ``pretrain_dit.py``.

As in Megatron-LM, the entry point only provides hooks (``dit.training.hooks``); the loop (here), the
optimizer set-up, the step, the log and the FLOP count live in this package, one file each.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from dit.runtime import distributed as runtime
from dit.model.config import config_from_args
from dit.diffusion import build_objective
from dit.errors import TrainingStopped
from dit.training.ema import EMA
from dit.checkpoint.files import find_checkpoint
from dit.training.checkpointing import Checkpointer, LoadChoices, load_checkpoint
from dit.training.exits import ExitConditions
from dit.training.flops import peak_tflops
from dit.training.hooks import Hooks, TrainLoader
from dit.training.metrics import TrainingLogger
from dit.training.optimizer import build_optimizer, build_scheduler, wrap_model
from dit.training.sample_log import SampleLog
from dit.training.state import TrainState
from dit.training.validation import ValidationResult, Validator
from dit.training.step import ForwardStep, StepResult, TrainingSetup, train_step


@dataclass
class StepRecord:
    iteration: int
    loss: float
    grad_norm: float
    skipped: bool
    learning_rate: float
    keys: list[str]  # this rank's samples


@dataclass
class TrainResult:
    state: TrainState
    setup: TrainingSetup
    history: list[StepRecord] = field(default_factory=list)  # the steps of this run (not of a resumed one)
    exit_reason: str | None = None  # why it stopped before --train-iters
    ema: EMA | None = None
    validations: list[tuple[int, ValidationResult]] = field(default_factory=list)  # (iteration, result)


def setup_training(args: argparse.Namespace, hooks: Hooks) -> TrainingSetup:
    """Process groups, seeds, this stage's model in Megatron DDP, the optimizer and the LR schedule."""
    runtime.init_distributed(args.distributed_timeout_minutes)
    runtime.initialize_model_parallel(runtime.ParallelLayout(
        tensor=args.tensor_model_parallel_size, pipeline=args.pipeline_model_parallel_size,
        context=args.context_parallel_size, virtual_pipeline=args.virtual_pipeline_model_parallel_size))
    runtime.set_random_seed(args.seed, per_data_parallel_rank=False)  # the same initial weights on every replica
    config = config_from_args(args)
    model = hooks.model_provider(config, ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage())
    device = runtime.current_device()
    model.to(device)
    runtime.set_random_seed(args.seed, per_data_parallel_rank=True)
    ddp = wrap_model(model, config, args)
    optimizer = build_optimizer(args, [ddp])
    objective = build_objective(
        args.objective, edm_p_mean=args.edm_p_mean, edm_p_std=args.edm_p_std, sigma_data=args.sigma_data,
        flow_logit_mean=args.flow_logit_mean, flow_logit_std=args.flow_logit_std, flow_shift=args.flow_shift)
    return TrainingSetup(args=args, config=config, model=[ddp], optimizer=optimizer,
                         scheduler=build_scheduler(args, optimizer), objective=objective, device=device)


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters of the whole model (every TP shard and PP stage, the PP-replicated conditioning once)."""
    tp_rank = ps.get_tensor_model_parallel_rank()
    local = sum(p.numel() for p in model.parameters()
                if not getattr(p, "shared", False) and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0))
    total = torch.tensor(local, dtype=torch.float64, device=next(model.parameters()).device)
    dist.all_reduce(total, group=ps.get_model_parallel_group())
    return int(total.item())


def gather_data_stats(stats: Any) -> Any:
    """The bad-data counts of every DP replica, summed (the ranks of one replica read the same packs)."""
    gathered = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(gathered, stats, group=ps.get_data_parallel_group())
    total = type(stats)()
    for part in gathered:
        total.add(part)
    return total


def _advance(state: TrainState, result: StepResult, max_skipped: int, last_checkpoint: Path | None) -> None:
    state.iteration += 1
    state.consumed_packs += result.counts.packs
    state.consumed_samples += result.counts.samples
    state.consecutive_skips = state.consecutive_skips + 1 if result.skipped else 0
    state.skipped_steps += result.skipped
    if state.consecutive_skips >= max_skipped:
        resume = (f"resume from the last checkpoint, {last_checkpoint}" if last_checkpoint
                  else "no checkpoint was saved in this run")
        raise TrainingStopped(
            f"{state.consecutive_skips} consecutive steps had a non-finite loss or gradient norm (iteration "
            f"{state.iteration}: loss {result.loss}, grad norm {result.grad_norm}); none of them changed the "
            f"weights. Stopping (--max-skipped-steps {max_skipped}): lower --lr or check the data "
            f"(python -m data.report); {resume}")


class TrainingLoop:
    """The loop's parts and one iteration of it (:meth:`iterate`): ``--train-iters`` steps from ``state``,
    each on ``global / (micro x DP)`` packs of this rank's loader, with the log, validation, checkpoints
    (every ``--save-interval``, on an exit and at the end) and the exit conditions around it."""

    def __init__(self, setup: TrainingSetup, loader: TrainLoader, forward_step: ForwardStep, state: TrainState,
                 ema: EMA | None = None, validator: Validator | None = None):
        args = self.args = setup.args
        self.setup, self.loader, self.forward_step, self.ema, self.validator = setup, loader, forward_step, ema, validator
        self.num_microbatches = args.global_batch_size // (args.micro_batch_size * ps.get_data_parallel_world_size())
        self.logging_rank = dist.get_rank() == dist.get_world_size() - 1  # the last stage has the loss
        peak = args.peak_tflops or (peak_tflops(torch.cuda.get_device_name(), args.fp8_format is not None)
                                    if torch.cuda.is_available() else None)
        self.logger = TrainingLogger(
            args, world_size=dist.get_world_size(), peak_tflops=peak, logging_rank=self.logging_rank,
            pack_capacity=args.max_seq_length * (args.micro_batch_size if args.no_packing else 1),
            objective=setup.objective.name)
        self.exits, self.samples, self.checkpointer = ExitConditions(args, setup.device), SampleLog(args.sample_log), Checkpointer(args)
        self.result = TrainResult(state=state, setup=setup, ema=ema)

    def announce(self) -> None:
        args, state = self.args, self.result.state
        parameters = count_parameters(self.setup.model[0].module)
        if self.logging_rank:
            print(f"pretrain_dit.py: {parameters:,} parameters, {args.transformer_impl} backend, "
                  f"tp={args.tensor_model_parallel_size} pp={args.pipeline_model_parallel_size} "
                  f"cp={args.context_parallel_size} dp={ps.get_data_parallel_world_size()}; {args.objective} "
                  f"objective; {args.global_batch_size} packs of up to {args.max_seq_length} tokens a step "
                  f"({self.num_microbatches} per DP rank); from iteration {state.iteration} to {args.train_iters}",
                  flush=True)

    def iterate(self) -> str | None:
        """One step and what follows it; the reason to stop early, if there is one."""
        args, state = self.args, self.result.state
        start = time.monotonic()
        packs = [next(self.loader) for _ in range(self.num_microbatches)]
        step = train_step(self.setup, self.forward_step, packs, state.iteration + 1)
        self.checkpointer.poll()
        if self.ema is not None and not step.skipped:
            self.ema.update()
        _advance(state, step, args.max_skipped_steps, self.checkpointer.last)
        self.logger.record(step, time.monotonic() - start)
        self.samples.write(state.iteration, step)
        lr = self.setup.optimizer.param_groups[0]["lr"]
        self.result.history.append(StepRecord(state.iteration, step.loss, step.grad_norm, step.skipped, lr, step.keys))
        last = state.iteration == args.train_iters
        if state.iteration % args.log_interval == 0 or last:
            self.logger.log(state, lr, gather_data_stats(self.loader.stats))
        if args.eval_interval and (state.iteration % args.eval_interval == 0 or last):
            self.validate()
        reason = self.exits.reason(state.iteration)
        if args.save and (reason or last or (args.save_interval and state.iteration % args.save_interval == 0)):
            self.checkpointer.save(self.setup, state, self.loader, self.ema)
        return reason

    def validate(self) -> None:
        iteration = self.result.state.iteration
        outcome = self.validator.run()
        self.result.validations.append((iteration, outcome))
        self.logger.log_validation(iteration, outcome, self.validator.ema is not None)

    def run(self) -> TrainResult:
        self.announce()
        try:
            if self.args.skip_train:
                self.validate()
                return self.result
            while self.result.state.iteration < self.args.train_iters and self.result.exit_reason is None:
                self.result.exit_reason = self.iterate()
            self.checkpointer.finish()
        finally:
            self.close()
        return self.result

    def close(self) -> None:
        self.logger.close()
        self.exits.close()
        self.samples.close()


def pretrain(args: argparse.Namespace, hooks: Hooks) -> TrainResult:
    """Train with validated ``args``, from ``--load`` / ``--save`` when they hold a checkpoint. The process
    groups stay up for the caller (tests read the model)."""
    setup = setup_training(args, hooks)
    ema = EMA(setup, args.ema_decay, args.ema_warmup) if args.ema_decay > 0 else None
    loader = hooks.train_data_provider(args)
    state = TrainState()
    try:
        path = None
        if args.load or args.save:
            path = find_checkpoint(args.load or args.save, args.ckpt_step, flag="--load" if args.load else "--save",
                                   required=bool(args.load), fix="point it at a --save folder of an earlier run, or "
                                                                 "drop --load to start from scratch")
        if path is not None:
            load_checkpoint(setup, state, loader, ema, path, LoadChoices.from_args(args))
        validator = None
        if args.eval_interval or args.skip_train:
            validator = Validator(setup, hooks.forward_step, lambda: hooks.valid_data_provider(args), ema)
        return TrainingLoop(setup, loader, hooks.forward_step, state, ema, validator).run()
    finally:
        loader.close()
