"""A checkpoint written under megatron-core 0.16.1 (the oldest stack supported), kept as a test asset.

Newer stacks must load it and continue the run with the losses the old stack logged. It was made on Python
3.11 with megatron-core 0.16.1, megatron-energon 7.4.1 and torch 2.13.0 (CPU build) by::

    PYTHONPATH=. .venv/bin/python -m tests.old_checkpoint   (with megatron-core 0.16.1 installed there)

which trains the tiny model of :data:`FLAGS` from scratch for :data:`ITERS` iterations on :func:`dataset`,
saving at :data:`SAVED` and at the end, keeps the checkpoint of iteration :data:`SAVED` in :data:`ASSET` and
writes the losses of the iterations after it to ``losses.json`` there.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

from dit.checkpoint.files import checkpoint_dir, write_tracker
from dit.training.sample_log import read_sample_log
from tests.distributed import pretrain_main, run_distributed
from tests.launch import ROOT
from tests.tiny_data import TINY_RUN, good_entries, write_dataset

ASSET = ROOT / "tests" / "assets" / "mcore016_checkpoint"
SAVED, ITERS = 2, 4
# a model of about 15k parameters, so that the checkpoint (weights, Adam moments, EMA) stays small
FLAGS = TINY_RUN + [
    "--num-layers",
    "1",
    "--hidden-size",
    "16",
    "--num-attention-heads",
    "1",
    "--lr",
    "1e-3",
    "--lr-decay-style",
    "constant",
    "--global-batch-size",
    "2",
    "--save-interval",
    str(SAVED),
]


def dataset(root: Path) -> Path:
    """The run's dataset, written the same way on every stack."""
    return write_dataset(root, good_entries(24, seed=5))


def train(data: Path, out: Path, iters: int, *load: str) -> dict[int, float]:
    """Train one process to ``iters`` (saving in ``out/ckpt``); the loss of each iteration it ran."""
    flags = FLAGS + [
        "--data-path",
        str(data),
        "--train-iters",
        str(iters),
        "--save",
        str(out / "ckpt"),
        "--sample-log",
        str(out / "samples"),
        *load,
    ]
    assert run_distributed(pretrain_main, 1, flags) == [0]
    (log,) = sorted((out / "samples").glob("dp_*.jsonl"))
    return {it: record["loss"] for it, record in read_sample_log(log).items()}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        losses = train(dataset(work / "data"), work / "run", ITERS)
        shutil.rmtree(ASSET, ignore_errors=True)
        shutil.copytree(checkpoint_dir(work / "run" / "ckpt", SAVED), checkpoint_dir(ASSET, SAVED))
    write_tracker(ASSET, SAVED)
    stack = {name: version(name) for name in ("megatron-core", "megatron-energon", "torch")}
    (ASSET / "losses.json").write_text(
        json.dumps({"stack": stack, "losses": {str(it): losses[it] for it in range(SAVED + 1, ITERS + 1)}}, indent=1)
        + "\n"
    )


if __name__ == "__main__":
    main()
