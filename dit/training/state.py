"""The counters of a run: what one checkpoint restores besides the model, the optimizer and the data."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class TrainState:
    iteration: int = 0  # optimizer steps taken or skipped (the data of a skipped step is consumed too)
    consumed_packs: int = 0  # packs (micro-batches under --no-packing) over all DP ranks
    consumed_samples: int = 0  # samples in those packs
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient norm, in all
    consecutive_skips: int = 0  # the current run of skipped steps

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TrainState:
        return cls(**state)
