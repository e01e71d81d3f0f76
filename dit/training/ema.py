"""EMA of the weights, in fp32, kept beside the optimizer's main weights and sharded like them.

Each main parameter's state holds its ``ema``, so with ``--use-distributed-optimizer`` a DP rank keeps the
EMA of its own shard only (4 bytes per parameter / DP: DiT-7B at TP2 would otherwise spend 14 GB per GPU
on a full copy), and Megatron's optimizer checkpointing saves, reshards and restores it with the moments.
It is updated after every successful step (never after a skipped one); with ``--ema-warmup`` the decay
ramps up as min(decay, (1 + n) / (10 + n)) over the n updates so far, so that a short run's EMA is not
still dominated by the initial weights (with 0.9999 and no warm-up, half of it would be the initial
weights after 7000 steps).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from dit.training.optimizer import allocate_state, publish_main_params
from dit.training.step import TrainingSetup


def ema_decay(decay: float, updates: int, warmup: bool) -> float:
    """The decay of update number ``updates + 1``."""
    return min(decay, (1 + updates) / (10 + updates)) if warmup else decay


class EMA:
    def __init__(self, setup: TrainingSetup, decay: float, warmup: bool):
        self.setup, self.decay, self.warmup = setup, decay, warmup
        self.updates = 0
        allocate_state(setup.optimizer)
        self.reset()

    def _pairs(self) -> list[tuple[torch.Tensor, dict]]:
        """(main parameter, its optimizer state); looked up each time, as loading a checkpoint replaces the
        optimizer's state dicts."""
        return [(p, chained.optimizer.state[p]) for chained in self.setup.optimizer.chained_optimizers
                for group in chained.optimizer.param_groups for p in group["params"]]

    def weights(self) -> list[torch.Tensor]:
        return [state["ema"] for _, state in self._pairs()]

    def reset(self) -> None:
        """Start from the current main weights (a new run, or weights loaded without their EMA)."""
        with torch.no_grad():
            for p, state in self._pairs():
                state["ema"] = p.detach().float().clone()
        self.updates = 0

    def update(self) -> None:
        d = ema_decay(self.decay, self.updates, self.warmup)
        pairs = self._pairs()
        with torch.no_grad():
            ema = [state["ema"] for _, state in pairs]
            torch._foreach_mul_(ema, d)
            torch._foreach_add_(ema, [p.float() for p, _ in pairs], alpha=1 - d)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the EMA weights inside the block (validation), its own weights again after."""
        pairs = self._pairs()
        with torch.no_grad():
            saved = [p.detach().clone() for p, _ in pairs]
            for p, state in pairs:
                p.copy_(state["ema"])
            publish_main_params(self.setup.optimizer, self.setup.model)
        try:
            yield
        finally:
            with torch.no_grad():
                for (p, _), original in zip(pairs, saved):
                    p.copy_(original)
                publish_main_params(self.setup.optimizer, self.setup.model)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates}  # the tensors are in the optimizer state

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
