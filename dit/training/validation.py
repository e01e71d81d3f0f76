"""A validation loss that can be compared between evaluations, runs and layouts.

Every evaluation reads the same packs (the validation split in its stored order, ``--eval-iters``
global batches), gives each sample the same noise (drawn from its key alone) and no guidance dropout,
and measures the loss at the same 8 noise levels: the quantiles (k + 1/2) / 8 of the training
distribution of z, mapped to sigma or t by the objective (per sample, so the flow's resolution shift
applies). Two evaluations of the same weights give the same number; the mean over the levels is the
headline, each level its own curve. With an EMA the EMA weights are evaluated (``--no-ema``: the raw ones).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from dit.diffusion.draws import draw
from dit.diffusion.microbatch import diffusion_microbatch
from dit.training.ema import EMA
from dit.training.hooks import TrainLoader
from dit.training.step import ForwardStep, TrainingSetup

NUM_LEVELS = 8
VALIDATION_ITERATION = -1  # the draws' iteration: validation noise depends on the sample's key alone


def level_quantiles(n: int = NUM_LEVELS) -> torch.Tensor:
    """(k + 1/2) / n for k < n: stratified over the training distribution."""
    return (torch.arange(n, dtype=torch.float64) + 0.5) / n


@dataclass
class ValidationResult:
    loss: float  # mean over the levels
    per_level: list[float]  # at each of level_quantiles()
    samples: int


class Validator:
    def __init__(
        self,
        setup: TrainingSetup,
        forward_step: ForwardStep,
        loader_provider: Callable[[], TrainLoader],
        ema: EMA | None,
    ):
        self.setup, self.forward_step, self.loader_provider = setup, forward_step, loader_provider
        self.ema = ema if setup.run.evaluation.use_ema else None
        self.z = torch.special.ndtri(level_quantiles()).float()  # [8] standard-normal quantiles

    def _packs(self) -> list:
        run = self.setup.run
        per_rank = (
            run.evaluation.eval_iters
            * run.training.global_batch_size
            // (run.training.micro_batch_size * ps.get_data_parallel_world_size())
        )
        loader = self.loader_provider()
        packs = []
        try:
            for pack in loader:
                packs.append(pack)
                if len(packs) == per_rank:
                    break
        finally:
            loader.close()
        return packs

    def run(self) -> ValidationResult:
        setup = self.setup
        packs = self._packs()
        cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
        seed = setup.run.training.seed
        draws = [
            draw(p, seed=seed, iteration=VALIDATION_ITERATION, drop_prob=0.0, cp_size=cp, cp_rank=cp_rank)
            for p in packs
        ]
        count = torch.tensor([sum(p.num_samples for p in packs)], dtype=torch.float64, device=setup.device)
        dist.all_reduce(count, group=ps.get_data_parallel_group())
        # each micro-batch's logged sum is divided by nothing: the totals are reduced below
        totals = torch.zeros(NUM_LEVELS, 2, dtype=torch.float64, device=setup.device)
        interactive = sys.stderr.isatty() and dist.get_rank() == dist.get_world_size() - 1
        for chunk in setup.model:
            chunk.eval()
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext(), torch.no_grad():
            for k, z in enumerate(self.z):
                if interactive:
                    print(
                        f"\r validation: noise level {k + 1}/{NUM_LEVELS}, {len(packs)} packs", end="", file=sys.stderr
                    )
                microbatches = [
                    diffusion_microbatch(
                        setup.objective,
                        pack.to(setup.device),
                        replace(d, z=torch.full_like(d.z, float(z))),
                        cp_size=cp,
                        null_class=setup.config.num_classes,
                        samples_per_microbatch=1.0,
                    )
                    for pack, d in zip(packs, draws)
                ]
                if not microbatches:  # a DP rank whose share of a small validation set is empty
                    continue
                logged = get_forward_backward_func()(
                    forward_step_func=self.forward_step,
                    data_iterator=iter(microbatches),
                    model=setup.model,
                    num_microbatches=len(microbatches),
                    forward_only=True,
                    micro_batch_size=1,
                    seq_length=max(int(p.cu_seqlens_padded[-1]) for p in packs),
                )
                for entry in logged or []:
                    totals[k] += entry["loss"].to(totals)
        for chunk in setup.model:
            chunk.train()
        if interactive:
            print("\r" + " " * 60 + "\r", end="", file=sys.stderr)
        dist.all_reduce(totals)  # the last stage's sums; TP and CP copies cancel in the ratio
        per_level = (totals[:, 0] / totals[:, 1]).tolist()
        return ValidationResult(loss=sum(per_level) / NUM_LEVELS, per_level=per_level, samples=int(count.item()))


def validation_line(iteration: int, result: ValidationResult, objective: str, ema: bool) -> str:
    levels = " ".join(f"{q:.3f}:{v:.4E}" for q, v in zip(level_quantiles().tolist(), result.per_level))
    weights = "EMA weights" if ema else "raw weights"
    return (
        f" validation at iteration {iteration} ({weights}, {result.samples} samples) | loss ({objective}): "
        f"{result.loss:.6E} | by noise quantile: {levels} |"
    )
