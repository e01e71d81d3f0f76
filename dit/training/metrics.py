"""The training log: one Megatron-style line per ``--log-interval`` on the last rank, and the same numbers
to TensorBoard / W&B.

Throughput is over the interval (samples, real latent tokens, model FLOPs of every DP rank's packs, from
their cu_seqlens); MFU divides the model TFLOP/s per GPU by the accelerator's dense peak
(``dit.training.flops``, or ``--peak-tflops``); packing efficiency is real tokens / pack capacity.
"""

from __future__ import annotations

import datetime
import resource
import time
from dataclasses import dataclass
from typing import Any

import torch

from dit.training.run_config import RunConfig
from dit.training.state import TrainState
from dit.training.step import StepResult
from dit.training.writers import MetricWriters


@dataclass
class Interval:
    """Sums over the steps since the last log line."""

    steps: int = 0
    finite_steps: int = 0
    loss: float = 0.0
    seconds: float = 0.0
    packs: int = 0
    samples: int = 0
    tokens: int = 0
    flops: float = 0.0

    def add(self, result: StepResult, seconds: float) -> None:
        self.steps += 1
        if not result.skipped:
            self.finite_steps += 1
            self.loss += result.loss
        self.seconds += seconds
        self.packs += result.counts.packs
        self.samples += result.counts.samples
        self.tokens += result.counts.real_tokens
        self.flops += result.counts.flops


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def peak_memory() -> tuple[float, str]:
    """(GiB, what was measured): the GPU's max allocated, or this process's max RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "GPU max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "CPU max RSS"


class TrainingLogger:
    """Accumulates steps; :meth:`log` prints and writes on the logging rank only."""

    def __init__(
        self,
        run: RunConfig,
        *,
        world_size: int,
        peak_tflops: float | None,
        pack_capacity: int,
        logging_rank: bool,
        objective: str,
    ):
        self.train_iters, self.world_size, self.peak = run.training.train_iters, world_size, peak_tflops
        self.pack_capacity, self.logging_rank, self.objective = pack_capacity, logging_rank, objective
        self.interval = Interval()
        self.writers = MetricWriters(run.logging, run.summary()) if logging_rank else None
        self.start = time.monotonic()
        self.steps_this_run = 0
        self.examples_shown = 0
        self.formats_shown: set[str] = set()  # writers and warnings already shown (_show_new_notes)
        self.notes_shown: set[str] = set()
        self.last_grad_norm = float("nan")

    def record(self, result: StepResult, seconds: float) -> None:
        self.interval.add(result, seconds)
        self.steps_this_run += 1
        self.last_grad_norm = result.grad_norm

    def log(self, state: TrainState, lr: float, data_stats: Any) -> dict[str, float]:
        """Print the interval's line (logging rank) and start a new interval; return its metrics."""
        i = self.interval
        seconds = max(i.seconds, 1e-9)
        metrics = {
            "loss": i.loss / i.finite_steps if i.finite_steps else float("nan"),
            "grad_norm": self.last_grad_norm,
            "learning_rate": lr,
            "skipped_steps": state.skipped_steps,
            "samples_per_s": i.samples / seconds,
            "tokens_per_s": i.tokens / seconds,
            "tflops_per_gpu": i.flops / seconds / self.world_size / 1e12,
            "packing_efficiency": i.tokens / max(i.packs * self.pack_capacity, 1),
            "bad_samples": data_stats.bad,
        }
        if self.peak:
            metrics["mfu"] = metrics["tflops_per_gpu"] / self.peak
        if self.logging_rank:
            print(self._line(state, metrics, data_stats, i), flush=True)
            self._show_new_skips(data_stats)
            self._show_new_notes(data_stats)
            assert self.writers is not None  # made on the logging rank
            self.writers.write(state.iteration, metrics)
        self.interval = Interval()
        return metrics

    def _line(self, state: TrainState, m: dict[str, float], data_stats: Any, i: Interval) -> str:
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.steps_this_run * (self.train_iters - state.iteration)
        memory, where = peak_memory()
        kinds = ", ".join(f"{k}={n}" for k, n in sorted(data_stats.skipped.items()))
        fields = [
            f"iteration {state.iteration:>8}/{self.train_iters:>8}",
            f"consumed packs: {state.consumed_packs:>10}",
            f"consumed samples: {state.consumed_samples:>12}",
            f"elapsed time per iteration (ms): {1000 * i.seconds / i.steps:.1f}",
            f"learning rate: {m['learning_rate']:.6E}",
            f"loss ({self.objective}): {m['loss']:.6E}",
            f"grad norm: {m['grad_norm']:.4f}",
            f"skipped steps: {state.skipped_steps}",
            f"samples/s: {m['samples_per_s']:.1f}",
            f"tokens/s: {m['tokens_per_s']:.0f} ({m['tokens_per_s'] / self.world_size:.0f} per GPU)",
            f"TFLOP/s per GPU: {m['tflops_per_gpu']:.3f}",
            f"MFU: {m['mfu']:.1%}" if "mfu" in m else "MFU: n/a (--peak-tflops)",
            f"packing: {m['packing_efficiency']:.3f}",
            f"bad samples: {data_stats.bad}" + (f" ({kinds})" if kinds else ""),
            f"memory: {memory:.2f} GiB {where}",
            f"elapsed: {_clock(elapsed)}",
            f"ETA: {_clock(eta)}",
        ]
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        return f" [{stamp}] " + " | ".join(fields) + " |"

    def log_validation(self, iteration: int, result: Any, ema: bool) -> None:
        if self.logging_rank:
            from dit.training.validation import level_quantiles, validation_line

            print(validation_line(iteration, result, self.objective, ema), flush=True)
            metrics = {"validation/loss": result.loss}
            metrics.update(
                {f"validation/loss_q{q:.3f}": v for q, v in zip(level_quantiles().tolist(), result.per_level)}
            )
            assert self.writers is not None  # made on the logging rank
            self.writers.write(iteration, metrics)

    def _show_new_skips(self, data_stats: Any) -> None:
        """The first few skipped samples by key and shard, each shown once."""
        for e in data_stats.examples[self.examples_shown :]:
            print(f" skipped sample: {e.kind} {e.key} in {e.shard}: {e.detail}", flush=True)
        self.examples_shown = len(data_stats.examples)

    def _show_new_notes(self, data_stats: Any) -> None:
        """Each writer recognised and each normalisation that deserves a warning, once, with its count so far."""
        for name in sorted(set(data_stats.formats) - self.formats_shown):
            print(f" data format: {name} ({data_stats.formats[name]} samples so far)", flush=True)
        warnings = data_stats.warnings()
        for name in sorted(set(warnings) - self.notes_shown):
            print(
                f" data warning: {data_stats.normalised[name]} samples so far: {warnings[name]} "
                f"(first: {data_stats.notes[name]})",
                flush=True,
            )
        self.formats_shown |= set(data_stats.formats)
        self.notes_shown |= set(warnings)

    def close(self) -> None:
        if self.writers is not None:
            self.writers.close()
