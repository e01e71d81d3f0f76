"""The loss curve of a short run of the tiny model, stored in ``tests/assets/tiny_loss_curve.json`` so that a
silent numerical change (the model, the objective, the draws, the loss, the optimizer) shows as a test failure.

A change that is meant to move the numbers regenerates it (and says so in its commit)::

    PYTHONPATH=. .venv/bin/python -m tests.loss_curve

which trains :data:`FLAGS` for :data:`ITERS` iterations on :func:`dataset` in one process and writes each
iteration's loss, grad norm and sample keys with the stack that produced them.
"""

from __future__ import annotations

import json
import tempfile
from importlib.metadata import version
from pathlib import Path

from dit.training.sample_log import read_sample_log
from tests.distributed import pretrain_main, run_distributed
from tests.launch import ROOT
from tests.tiny_data import TINY_RUN, good_entries, write_dataset

ASSET = ROOT / "tests" / "assets" / "tiny_loss_curve.json"
ITERS = 8
# lr 1e-2: large enough that after a few steps the conditioning paths (zero at init: adaLN-Zero) move the loss
FLAGS = TINY_RUN + [
    "--lr",
    "1e-2",
    "--lr-warmup-iters",
    "0",
    "--lr-decay-style",
    "constant",
    "--global-batch-size",
    "2",
    "--seed",
    "3",
    "--ema-decay",
    "0.9",
]


def dataset(root: Path) -> Path:
    """16 good samples: the suite's session dataset (``tiny_dataset`` in tests/conftest.py)."""
    return write_dataset(root, good_entries(16, seed=4))


def train(data: str | Path, out: Path, iters: int, *extra: str) -> dict[int, dict]:
    """Train one process to ``iters``; the sample log's record (loss, grad norm, keys) of each iteration it ran."""
    flags = FLAGS + [
        "--data-path",
        str(data),
        "--train-iters",
        str(iters),
        "--sample-log",
        str(out / "samples"),
        *extra,
    ]
    assert run_distributed(pretrain_main, 1, flags) == [0]
    (log,) = sorted((out / "samples").glob("dp_*.jsonl"))
    return read_sample_log(log)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        records = train(dataset(Path(tmp) / "data"), Path(tmp) / "run", ITERS)
    stack = {name: version(name) for name in ("megatron-core", "megatron-energon", "torch")}
    iterations = {str(it): {k: r[k] for k in ("loss", "grad_norm", "keys")} for it, r in sorted(records.items())}
    ASSET.write_text(json.dumps({"stack": stack, "iterations": iterations}, indent=1) + "\n")


if __name__ == "__main__":
    main()
