"""When a run stops early on purpose: SIGTERM (``--exit-signal-handler``), ``--exit-duration-in-mins`` and
``--exit-interval``, as in Megatron-LM. The run then finishes its step, saves and exits 0.

A signal reaches the ranks at different moments and their clocks differ, so the decision is all-reduced
(one small MAX over the world each step, only when a signal or a duration can stop the run): every rank
stops after the same step.
"""

from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

from dit.training.run_config import TrainingConfig


class ExitConditions:
    def __init__(self, training: TrainingConfig, device: torch.device):
        self.interval, self.device = training.exit_interval, device
        minutes = training.exit_duration_in_mins
        self.deadline = None if minutes is None else time.monotonic() + 60 * minutes
        self.signal_handler = training.exit_signal_handler
        self.received = False
        if self.signal_handler:
            self.previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.received = True

    def reason(self, iteration: int) -> str | None:
        """Why the run stops after ``iteration``, the same on every rank, or None."""
        if self.signal_handler or self.deadline is not None:
            flags = torch.tensor(
                [self.received, self.deadline is not None and time.monotonic() > self.deadline],
                dtype=torch.int32,
                device=self.device,
            )
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            if flags[0]:
                return "SIGTERM received (--exit-signal-handler)"
            if flags[1]:
                return "--exit-duration-in-mins reached"
        if self.interval and iteration % self.interval == 0:
            return f"--exit-interval {self.interval}"
        return None

    def close(self) -> None:
        if self.signal_handler:
            signal.signal(signal.SIGTERM, self.previous)
