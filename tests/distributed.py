"""Run a test body in N gloo processes and bring back each rank's result.

The body must be a module-level function (spawned processes import it). A failing rank's
traceback is raised in the test; a hang is killed after ``timeout`` seconds.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import traceback
from typing import Any, Callable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    from dit import runtime

    try:
        runtime.init_distributed(timeout_minutes=3)
        # pickled here: tensors sent as shared memory would vanish when this process exits
        results.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        runtime.destroy()


class RankFailed(AssertionError):
    pass


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 240) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` gloo ranks; return the results ordered by rank.

    Ranks are not daemonic: Megatron's checkpoint writer starts processes of its own.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    failures: list[str] = []
    try:
        for _ in range(world_size):
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(out))
                raise RankFailed(
                    f"{fn.__name__}: ranks {missing} gave no result within {timeout:.0f}s (hung?)"
                    + "".join(failures)
                ) from None
            if ok:
                out[rank] = pickle.loads(value)
            else:
                failures.append(f"\n--- rank {rank} of {world_size} failed ---\n{value}")
                break  # the other ranks are likely blocked in a collective now
        if failures:
            raise RankFailed(f"{fn.__name__} failed:" + "".join(failures))
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world_size)]
