"""``pretrain()``: set-up and the training loop, driven by the hooks of ``pretrain_dit.py``.

As in Megatron-LM, the entry point only provides hooks (``dit.training.hooks``); the loop (here), the
optimizer set-up, the step, the log and the FLOP count live in this package, one file each.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from dit.errors import ConfigError, TrainingStopped
from dit.runtime import distributed as runtime
from dit.training.checkpointing import Checkpointer, find_checkpoint, load_checkpoint
from dit.training.ema import EMA
from dit.training.exits import ExitConditions
from dit.training.flops import peak_tflops
from dit.training.hooks import Hooks, TrainLoader
from dit.training.metrics import TrainingLogger
from dit.training.optimizer import build_optimizer, build_scheduler, wrap_model
from dit.training.run_config import RunConfig
from dit.training.sample_log import SampleLog
from dit.training.state import TrainState
from dit.training.step import ForwardStep, StepResult, TrainingSetup, train_step
from dit.training.validation import ValidationResult, Validator


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


def setup_training(run: RunConfig, hooks: Hooks) -> TrainingSetup:
    """Process groups, seeds, this stage's model in Megatron DDP, the optimizer and the LR schedule."""
    config, seed = run.model, run.training.seed
    runtime.init_distributed(run.training.distributed_timeout_minutes)
    runtime.initialize_model_parallel(
        runtime.ParallelLayout(
            tensor=config.tensor_model_parallel_size,
            pipeline=config.pipeline_model_parallel_size,
            context=config.context_parallel_size,
        )
    )
    runtime.set_random_seed(seed, per_data_parallel_rank=False)  # the same initial weights on every replica
    model = hooks.model_provider(config, ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage())
    device = runtime.current_device()
    model.to(device)
    runtime.set_random_seed(seed, per_data_parallel_rank=True)
    ddp = wrap_model(model, config, run.optimizer)
    optimizer = build_optimizer(run.optimizer, [ddp])
    return TrainingSetup(
        run=run,
        config=config,
        model=[ddp],
        optimizer=optimizer,
        scheduler=build_scheduler(run.optimizer, optimizer, run.training.train_iters),
        objective=run.objective.build(),
        device=device,
    )


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters of the whole model (every TP shard and PP stage, the PP-replicated conditioning once)."""
    tp_rank = ps.get_tensor_model_parallel_rank()
    local = sum(
        p.numel()
        for p in model.parameters()
        if not getattr(p, "shared", False) and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0)
    )
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
        resume = (
            f"resume from the last checkpoint, {last_checkpoint}"
            if last_checkpoint
            else "no checkpoint was saved in this run"
        )
        raise TrainingStopped(
            f"{state.consecutive_skips} consecutive steps had a non-finite loss or gradient norm (iteration "
            f"{state.iteration}: loss {result.loss}, grad norm {result.grad_norm}); none of them changed the "
            f"weights. Stopping (--max-skipped-steps {max_skipped}): lower --lr or check the data "
            f"(python -m data.report); {resume}"
        )


class TrainingLoop:
    """The loop's parts and one iteration of it (:meth:`iterate`): ``--train-iters`` steps from ``state``,
    each on ``global / (micro x DP)`` packs of this rank's loader, with the log, validation, checkpoints
    (every ``--save-interval``, on an exit and at the end) and the exit conditions around it."""

    def __init__(
        self,
        setup: TrainingSetup,
        loader: TrainLoader,
        forward_step: ForwardStep,
        state: TrainState,
        ema: EMA | None = None,
        validator: Validator | None = None,
    ):
        run = self.run_config = setup.run
        self.setup, self.loader, self.forward_step, self.ema, self.validator = (
            setup,
            loader,
            forward_step,
            ema,
            validator,
        )
        training = run.training
        dp = ps.get_data_parallel_world_size()
        self.num_microbatches = training.global_batch_size // (training.micro_batch_size * dp)
        self.logging_rank = dist.get_rank() == dist.get_world_size() - 1  # the last stage has the loss
        peak = run.logging.peak_tflops or (
            peak_tflops(torch.cuda.get_device_name(), run.model.fp8 is not None) if torch.cuda.is_available() else None
        )
        self.logger = TrainingLogger(
            run,
            world_size=dist.get_world_size(),
            peak_tflops=peak,
            logging_rank=self.logging_rank,
            pack_capacity=run.data.max_seq_length * (1 if run.data.packing else training.micro_batch_size),
            objective=setup.objective.name,
        )
        self.exits, self.samples = ExitConditions(training, setup.device), SampleLog(run.logging.sample_log)
        self.checkpointer = Checkpointer(run.checkpoint)
        self.result = TrainResult(state=state, setup=setup, ema=ema)

    def announce(self) -> None:
        run, config, state = self.run_config, self.run_config.model, self.result.state
        parameters = count_parameters(self.setup.model[0].module)
        if self.logging_rank:
            print(
                f"pretrain_dit.py: {parameters:,} parameters, {config.transformer_impl} backend, "
                f"tp={config.tensor_model_parallel_size} pp={config.pipeline_model_parallel_size} "
                f"cp={config.context_parallel_size} dp={ps.get_data_parallel_world_size()}; "
                f"{run.objective.objective} objective; {run.training.global_batch_size} packs of up to "
                f"{run.data.max_seq_length} tokens a step ({self.num_microbatches} per DP rank); from iteration "
                f"{state.iteration} to {run.training.train_iters}",
                flush=True,
            )

    def iterate(self) -> str | None:
        """One step and what follows it; the reason to stop early, if there is one."""
        run, state = self.run_config, self.result.state
        start = time.monotonic()
        packs, stop = [], None
        try:
            packs = [next(self.loader) for _ in range(self.num_microbatches)]
        except (ConfigError, TrainingStopped) as e:  # bad data, a stall: this rank's alone, told to all in the step
            stop = e
        step = train_step(self.setup, self.forward_step, packs, state.iteration + 1, stop)
        self.checkpointer.poll()
        if self.ema is not None and not step.skipped:
            self.ema.update()
        _advance(state, step, run.training.max_skipped_steps, self.checkpointer.last)
        self.logger.record(step, time.monotonic() - start)
        self.samples.write(state.iteration, step)
        lr = self.setup.optimizer.param_groups[0]["lr"]
        self.result.history.append(StepRecord(state.iteration, step.loss, step.grad_norm, step.skipped, lr, step.keys))
        last = state.iteration == run.training.train_iters
        if state.iteration % run.logging.log_interval == 0 or last:
            self.logger.log(state, lr, gather_data_stats(self.loader.stats))
        eval_interval, save_interval = run.evaluation.eval_interval, run.checkpoint.save_interval
        if eval_interval and (state.iteration % eval_interval == 0 or last):
            self.validate()
        reason = self.exits.reason(state.iteration)
        if run.checkpoint.save and (reason or last or (save_interval and state.iteration % save_interval == 0)):
            self.checkpointer.save(self.setup, state, self.loader, self.ema)
        return reason

    def validate(self) -> None:
        iteration = self.result.state.iteration
        assert self.validator is not None, "a validator is built whenever validation runs"
        outcome = self.validator.run()
        self.result.validations.append((iteration, outcome))
        self.logger.log_validation(iteration, outcome, self.validator.ema is not None)

    def run(self) -> TrainResult:
        self.announce()
        try:
            if self.run_config.evaluation.skip_train:
                self.validate()
                return self.result
            iters = self.run_config.training.train_iters
            while self.result.state.iteration < iters and self.result.exit_reason is None:
                self.result.exit_reason = self.iterate()
            self.checkpointer.finish()
        finally:
            self.close()
        return self.result

    def close(self) -> None:
        self.logger.close()
        self.exits.close()
        self.samples.close()


def pretrain(run: RunConfig, hooks: Hooks) -> TrainResult:
    """Train the run (``dit.training.arguments.run_config``), from ``--load`` / ``--save`` when they hold a checkpoint.
    The process groups stay up for the caller (tests read the model)."""
    setup = setup_training(run, hooks)
    evaluation = run.evaluation
    ema = EMA(setup, evaluation.ema_decay, evaluation.ema_warmup) if evaluation.ema_decay > 0 else None
    loader = hooks.train_data_provider(run)
    state = TrainState()
    try:
        path = find_checkpoint(run.checkpoint)
        if path is not None:
            load_checkpoint(setup, state, loader, ema, path)
        validator = None
        if evaluation.eval_interval or evaluation.skip_train:

            def valid_loader() -> TrainLoader:
                assert hooks.valid_data_provider is not None, "validation needs Hooks.valid_data_provider"
                return hooks.valid_data_provider(run)

            validator = Validator(setup, hooks.forward_step, valid_loader, ema)
        return TrainingLoop(setup, loader, hooks.forward_step, state, ema, validator).run()
    finally:
        loader.close()
