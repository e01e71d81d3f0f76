"""Real ``torchrun`` launches of pretrain_dit.py for the tests that kill, signal or restart a run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from dit.runtime.distributed import free_port
from tests.distributed import require_dist_marker

ROOT = Path(__file__).resolve().parents[1]


def torchrun(nproc: int, flags: list[str], log: Path) -> subprocess.Popen:
    """Start ``torchrun --nproc-per-node nproc pretrain_dit.py FLAGS`` in a session of its own, output to ``log``."""
    require_dist_marker(nproc)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "pretrain_dit.py",
        *flags,
    ]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def run_to_end(nproc: int, flags: list[str], log: Path, timeout: float = 300) -> str:
    proc = torchrun(nproc, flags, log)
    try:
        proc.wait(timeout=timeout)
    finally:
        kill(proc)
    text = log.read_text()
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{text[-3000:]}"
    return text


def wait_until(proc: subprocess.Popen, condition: Callable[[], bool], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before the condition held")
        if time.monotonic() > deadline:
            kill(proc)
            raise AssertionError("the condition did not hold in time")
        time.sleep(0.02)


def _children(pid: int) -> list[int]:
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return []
    found = []
    for task in tasks:
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            pass
    return found


def _descendants(pid: int) -> list[int]:
    found = _children(pid)
    return found + [d for child in found for d in _descendants(child)]


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the launch and everything it started (workers, loader workers, checkpoint writers): torchrun
    starts its workers in sessions of their own, so killing its process group would not reach them."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def workers(proc: subprocess.Popen) -> list[int]:
    """The training processes torchrun started (its direct children)."""
    return _children(proc.pid)
