"""The multi-process harness itself: results by rank, a failing rank's traceback, hangs time out."""

import os
import time

import pytest
import torch.distributed as dist

from tests.distributed import RankFailed, run_distributed

pytestmark = pytest.mark.dist


def _rank_times_ten():
    return dist.get_rank() * 10


def _rank_one_fails():
    if dist.get_rank() == 1:
        raise ValueError("planted failure on rank one")
    dist.barrier()  # rank 0 is left waiting, as in a real collective


def _rank_one_dies():
    if dist.get_rank() == 1:
        os._exit(3)  # as a segfault or an OOM kill would: no traceback, no result
    dist.barrier()


def _rank_one_hangs():
    if dist.get_rank() == 1:
        time.sleep(600)
    return "done"


def test_results_come_back_in_rank_order():
    assert run_distributed(_rank_times_ten, 2) == [0, 10]


def test_failing_rank_traceback_is_shown():
    with pytest.raises(RankFailed, match=r"(?s)rank 1 of 2 failed.*ValueError: planted failure on rank one"):
        run_distributed(_rank_one_fails, 2, timeout=60)


def test_hung_rank_times_out():
    start = time.monotonic()
    # rank 0 may be missing too when start-up alone takes longer than the timeout on a busy machine
    with pytest.raises(RankFailed, match=r"ranks \[(0, )?1\] gave no result within 8s"):
        run_distributed(_rank_one_hangs, 2, timeout=8)
    assert time.monotonic() - start < 40  # the hung process is killed, not awaited


def test_dead_rank_is_reported_at_once():
    start = time.monotonic()
    with pytest.raises(RankFailed, match=r"rank 1 of 2 died \(exit code 3\) without a result"):
        run_distributed(_rank_one_dies, 2, timeout=200)
    assert time.monotonic() - start < 100  # not the full timeout
