"""``--sample-log DIR``: which samples every step trained on, for data provenance and loss spikes.

One JSON line per step and DP replica in ``DIR/dp_NNNNN.jsonl`` (written by the replica's first rank):
the iteration, the step's loss and grad norm at full precision, whether it was skipped, and this
replica's sample keys in order. A resumed run appends; a later line for an iteration supersedes an
earlier one (the part of a killed run after its last checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron.core import parallel_state as ps

from dit.training.step import StepResult


class SampleLog:
    def __init__(self, directory: str | None):
        first_of_replica = (
            ps.get_tensor_model_parallel_rank() == 0
            and ps.get_context_parallel_rank() == 0
            and ps.get_pipeline_model_parallel_rank() == 0
        )
        self.file = None
        if directory is not None and first_of_replica:
            Path(directory).mkdir(parents=True, exist_ok=True)
            self.file = open(Path(directory) / f"dp_{ps.get_data_parallel_rank():05d}.jsonl", "a")

    def write(self, iteration: int, step: StepResult) -> None:
        if self.file is not None:
            record = {
                "iteration": iteration,
                "loss": step.loss,
                "grad_norm": step.grad_norm,
                "skipped": step.skipped,
                "keys": step.keys,
            }
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def read_sample_log(path: str | Path) -> dict[int, dict]:
    """The records of one replica's log by iteration, the last one winning (a torn last line is skipped)."""
    records = {}
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        records[record["iteration"]] = record
    return records
