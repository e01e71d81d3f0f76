"""The checkpoint file layout, as Megatron-LM writes it, shared by training, ``dit.generate`` and ``dit.convert``::

    SAVE/iter_0000100/                   a torch_dist checkpoint (any TP/PP/DP layout loads it)
    SAVE/latest_checkpointed_iteration.txt

Publication is atomic: the shards are written to ``iter_NNNNNNN.partial/``, renamed to ``iter_NNNNNNN/``
when every rank has finished, and only then is the tracker replaced (temporary file, fsync, rename).
A process killed at any moment of a save therefore leaves the previous checkpoint the latest, and a
``.partial`` folder is never loaded.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal, overload

from dit.errors import ConfigError

TRACKER = "latest_checkpointed_iteration.txt"


def checkpoint_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def partial_dir(final: Path) -> Path:
    """Where the checkpoint ``final`` is written until it is published."""
    return final.with_name(final.name + ".partial")


def read_tracker(root: str | Path) -> int | None:
    """The iteration the tracker names, or None where there is no tracker."""
    path = Path(root) / TRACKER
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise ConfigError("--load", f"{path} holds {text!r}, not an iteration number")
    return int(text)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tracker(root: Path, iteration: int) -> None:
    """Replace the tracker atomically: a reader sees the old or the new iteration, never a torn file."""
    tmp = root / (TRACKER + ".tmp")
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / TRACKER)
    _fsync_dir(root)


def publish(root: Path, partial: Path, final: Path, iteration: int) -> None:
    """Rename the complete folder into place, then point the tracker at it."""
    if final.exists():  # an earlier save of the same iteration: replaced, never merged
        shutil.rmtree(final)
    os.replace(partial, final)
    _fsync_dir(root)
    write_tracker(root, iteration)


def retain(root: Path, keep: int | None) -> None:
    """Delete all but the newest ``keep`` checkpoints; never the one the tracker names."""
    if keep is None:
        return
    latest = read_tracker(root)
    saved = sorted(p for p in root.glob("iter_*") if p.is_dir() and p.name[5:].isdigit())
    for old in saved[:-keep]:
        if int(old.name[5:]) != latest:
            shutil.rmtree(old)


@overload
def find_checkpoint(
    root: str | Path,
    step: int | None = None,
    *,
    flag: str = ...,
    required: Literal[True] = ...,
    fix: str = ...,
) -> Path: ...


@overload
def find_checkpoint(
    root: str | Path, step: int | None = None, *, flag: str = ..., required: bool, fix: str = ...
) -> Path | None: ...


def find_checkpoint(
    root: str | Path,
    step: int | None = None,
    *,
    flag: str = "--load",
    required: bool = True,
    fix: str = "point it at a --save folder of an earlier run",
) -> Path | None:
    """The complete checkpoint of iteration ``step`` (``--ckpt-step``) in ``root``, by default the one its tracker
    names. ``flag`` names ``root`` in errors; a root without a tracker is an error saying ``fix`` when
    ``required``, else None."""
    iteration = step if step is not None else read_tracker(root)
    if iteration is None:
        if required:
            raise ConfigError(flag, f"{root} holds no checkpoint (no {TRACKER}); {fix}")
        return None
    path = checkpoint_dir(root, iteration)
    if not (path / "metadata.json").is_file():
        raise ConfigError(
            "--ckpt-step" if step is not None else flag,
            f"{path} is not a complete checkpoint; pick another --ckpt-step",
        )
    return path


def folder_size(path: Path) -> int:
    """Bytes of the files under ``path`` (for the save and load lines)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
