"""Run a test body in N gloo processes and bring back each rank's result.

The body must be a module-level function (each rank imports it). A failing rank's
traceback is raised in the test; a hang is killed after ``timeout`` seconds.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dit.runtime.distributed import free_port


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results, output: str) -> None:
    # stdout and stderr to a file that the parent replays into the test's own (captured) streams
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    from dit.runtime import distributed as runtime

    try:
        runtime.init_distributed(timeout_minutes=3)
        # pickled here: tensors sent as shared memory would vanish when this process exits
        results.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        runtime.destroy()


def _replay(outputs: tempfile.TemporaryDirectory) -> None:
    """The ranks' output, in rank order, onto this process's stdout (pytest shows it with a failure)."""
    sys.stdout.flush()
    for log in sorted(Path(outputs.name).glob("*.log"), key=lambda f: int(f.stem)):
        os.write(1, log.read_bytes())
    outputs.cleanup()


class RankFailed(AssertionError):
    pass


def _deaths(procs: list, reported: dict) -> list[str]:
    """A line for each rank that exited abnormally without reporting (segfault, OOM kill, os._exit)."""
    return [
        f"\n--- rank {r} of {len(procs)} died (exit code {p.exitcode}) without a result ---"
        for r, p in enumerate(procs)
        if r not in reported and p.exitcode not in (None, 0)
    ]


# Ranks fork from a server process that imported torch, Megatron-Core and energon once: a spawned rank
# spends ~8 s of CPU importing them, most of the suite's time on 2 cores. The server only imports
# (no process group, no loader), so each rank still starts clean.
_CONTEXT = mp.get_context("forkserver")
_CONTEXT.set_forkserver_preload(
    [
        "dit.runtime.distributed",
        "dit.training.pretrain",
        "megatron.energon",
        "data.loader.dataloader",
        "pretrain_dit",
        "tests.model_setup",
    ]
)


# Whether the running test carries @pytest.mark.dist (tests/conftest.py sets it before each test's setup);
# True outside pytest, for the scripts that use these helpers.
DIST_MARKED = True


def require_dist_marker(ranks: int) -> None:
    """Refuse to start ``ranks`` > 1 processes from a test without ``@pytest.mark.dist``."""
    if ranks > 1 and not DIST_MARKED:
        raise AssertionError(
            f"this test starts {ranks} ranks: mark it @pytest.mark.dist (-m 'not dist' is the one-process tier)"
        )


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 240) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` gloo ranks; return the results ordered by rank.

    Ranks are not daemonic: Megatron's checkpoint writer starts processes of its own.
    """
    require_dist_marker(world_size)
    ctx = _CONTEXT
    results = ctx.Queue()
    port = free_port()
    outputs = tempfile.TemporaryDirectory(prefix="ranks-")
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results, f"{outputs.name}/{r}.log"))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    failures: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world_size and not failures:
            try:
                rank, ok, value = results.get(timeout=1)
            except queue.Empty:
                crashed = _deaths(procs, out)
                if crashed:  # a segfault or an OOM kill: no traceback to wait for
                    raise RankFailed(f"{fn.__name__} failed:" + "".join(crashed)) from None
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(out))
                    raise RankFailed(
                        f"{fn.__name__}: ranks {missing} gave no result within {timeout:.0f}s (hung?)"
                    ) from None
                continue
            if ok:
                out[rank] = pickle.loads(value)
            else:  # the other ranks are likely blocked in a collective now: stop at the first failure
                failures.append(f"\n--- rank {rank} of {world_size} failed ---\n{value}")
        if failures:
            time.sleep(2)  # a peer's death often shows first as another rank's gloo error: name it too
            raise RankFailed(f"{fn.__name__} failed:" + "".join(failures + _deaths(procs, out)))
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        _replay(outputs)
    return [out[r] for r in range(world_size)]


def pretrain_main(argv: list[str]) -> int:
    """``pretrain_dit.py ARGV`` on a rank of the harness: its exit status (its output is the rank's)."""
    import pretrain_dit
    from dit.training.main import main

    return main(pretrain_dit.HOOKS, argv)
