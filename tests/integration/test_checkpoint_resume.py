"""Exact resume after SIGKILL and after SIGTERM, through real torchrun launches.

A second run is SIGKILLed past its checkpoint at K, while it trains, and restarted: it must start at K+1
and give, at every iteration after K, bit-identical losses and the same samples in the same order as an
uninterrupted run (each DP replica's --sample-log records them). DP=2 with the distributed optimizer and
loader workers, whose restarted run is then sent SIGTERM as slurm does before preemption: it saves where
it stopped, exits 0, and a third run continues exactly to the end. PP=2 with --async-save.
"""

import os
import signal

import pytest

from dit.checkpoint.files import read_tracker
from dit.training.sample_log import read_sample_log
from tests.distributed import pretrain_main, run_distributed
from tests.launch import kill, run_to_end, torchrun, wait_until, workers
from tests.tiny_data import TINY_RUN, good_entries, write_dataset

pytestmark = [pytest.mark.slow, pytest.mark.dist]

K = 3
FLAGS = TINY_RUN + [
    "--num-workers",
    "1",
    "--lr",
    "1e-3",
    "--lr-decay-style",
    "constant",
    "--global-batch-size",
    "4",
    "--save-interval",
    str(K),
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return str(write_dataset(tmp_path_factory.mktemp("resume"), good_entries(48, seed=5)))


def _records(sample_log):
    return {path.name: read_sample_log(path) for path in sorted(sample_log.glob("dp_*.jsonl"))}


def _assert_same_steps(resumed, straight, first, last):
    assert resumed.keys() == straight.keys() and resumed
    for replica, records in straight.items():
        for it in range(first, last + 1):
            assert resumed[replica][it]["loss"] == records[it]["loss"], (replica, it)  # bit-identical
            assert resumed[replica][it]["keys"] == records[it]["keys"], (replica, it)


# PP=2 also saves in the background (--async-save), published when every rank's writer has finished
LAYOUTS = {
    "dp2-distributed-optimizer": ["--use-distributed-optimizer"],
    "pp2-async-save": ["--pipeline-model-parallel-size", "2", "--async-save"],
}
STRAIGHT = 16  # iterations of the straight runs; the LR is constant, so runs of any length share a schedule


@pytest.fixture(scope="module")
def straight(dataset, tmp_path_factory):
    """Each layout's uninterrupted run (pretrain_dit.py's main on 2 ranks of the test harness, which start
    faster than torchrun's; the launch does not change a number): its sample logs by replica and iteration."""
    records = {}
    for layout, extra in LAYOUTS.items():
        out = tmp_path_factory.mktemp(f"straight-{layout}")
        flags = (
            FLAGS
            + extra
            + [
                "--data-path",
                dataset,
                "--train-iters",
                str(STRAIGHT),
                "--save",
                str(out / "ckpt"),
                "--save-interval",
                str(STRAIGHT),
                "--sample-log",
                str(out / "samples"),
            ]
        )
        assert run_distributed(pretrain_main, 2, flags) == [0, 0]
        records[layout] = _records(out / "samples")
    return records


def _sigterm(proc, log) -> None:
    for pid in workers(proc):  # as slurm signals the tasks before preemption
        os.kill(pid, signal.SIGTERM)
    try:
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        kill(proc)
    assert "stopped early: SIGTERM received" in log.read_text()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resume_after_sigkill_is_exact(tmp_path, dataset, straight, layout):
    run = tmp_path / "killed"
    sigterm = layout == "dp2-distributed-optimizer"
    flags = (
        FLAGS
        + LAYOUTS[layout]
        + ["--data-path", dataset, "--save", str(run / "ckpt"), "--sample-log", str(run / "samples")]
    )
    proc = torchrun(2, flags + ["--train-iters", "1000"], tmp_path / "killed.log")
    wait_until(
        proc,
        lambda: (read_tracker(run / "ckpt") or 0) >= K and any(K + 1 in r for r in _records(run / "samples").values()),
    )
    kill(proc)  # SIGKILL past a checkpoint, mid-training
    # the latest published checkpoint: K, or a later one when --async-save published K late and the next in time
    last = read_tracker(run / "ckpt")
    assert last % K == 0 and K <= last <= STRAIGHT - 2 * K, last
    if not sigterm:
        log = run_to_end(2, flags + ["--train-iters", str(last + K)], tmp_path / "resumed.log")
        assert f"loaded checkpoint {run / 'ckpt' / f'iter_{last:07d}'}" in log
        assert f"from iteration {last} to {last + K}" in log
        _assert_same_steps(_records(run / "samples"), straight[layout], last + 1, last + K)
        return
    # restarted with the signal handler, then SIGTERMed past last + 1: it saves where it stopped and exits 0
    flags += ["--exit-signal-handler"]
    log = tmp_path / "resumed.log"
    proc = torchrun(2, flags + ["--train-iters", "1000"], log)
    wait_until(proc, lambda: any(last + 2 in r for r in _records(run / "samples").values()))
    _sigterm(proc, log)
    assert f"loaded checkpoint {run / 'ckpt' / f'iter_{last:07d}'}" in log.read_text()
    stopped = read_tracker(run / "ckpt")
    assert stopped is not None and last + 2 <= stopped < STRAIGHT
    assert run_distributed(pretrain_main, 2, flags + ["--train-iters", str(STRAIGHT)]) == [0, 0]
    _assert_same_steps(_records(run / "samples"), straight[layout], last + 1, STRAIGHT)
