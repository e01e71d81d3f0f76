"""Writing the on-disk format: webdataset shards of ``.pth`` / ``.pickle`` / ``.json`` samples.

Each shard is written to a temporary name and renamed when complete, so a crash never leaves a
half-written tar that looks finished. :func:`energon_prepare` indexes the folder for energon.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class ShardSample:
    """One sample as stored: latent ``[C, T, H, W]`` or ``[C, H, W]``, text ``[L, D]``, metadata."""

    latent: torch.Tensor
    text_embedding: np.ndarray | torch.Tensor
    metadata: dict[str, Any] = field(default_factory=dict)


def _member(tar: tarfile.TarFile, name: str, payload: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = mtime
    tar.addfile(info, io.BytesIO(payload))


def encode_sample(sample: ShardSample) -> dict[str, bytes]:
    """The three file payloads of one sample, by extension."""
    buf = io.BytesIO()
    torch.save(sample.latent.contiguous().clone(), buf)
    return {
        "pth": buf.getvalue(),
        "pickle": pickle.dumps(sample.text_embedding, protocol=pickle.HIGHEST_PROTOCOL),
        "json": json.dumps(sample.metadata).encode(),
    }


def shard_name(index: int) -> str:
    return f"shard_{index:06d}.tar"


def write_shard(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write ``(key, {ext: payload})`` pairs as ``samples/KEY.EXT`` members; atomic; returns the count."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    mtime = int(time.time())  # whole seconds: a float mtime costs every member an extra PAX header
    count = 0
    with tarfile.open(tmp, "w") as tar:
        for key, files in samples:
            for ext, payload in files.items():
                _member(tar, f"samples/{key}.{ext}", payload, mtime)
            count += 1
    os.replace(tmp, path)
    return count


def write_dataset(
    out: Path, samples: Iterable[tuple[str, dict[str, bytes]]], samples_per_shard: int, split_ratio: str = "1,0,0"
) -> int:
    """Write ``(key, {ext: payload})`` pairs into consecutive shards of ``out`` and index them for
    energon (``split_ratio``: train,val,test shares of the shards); return the sample count.

    Shards already complete are kept (their samples are still drawn from ``samples``, so a
    deterministic stream resumes where it stopped).
    """
    out.mkdir(parents=True, exist_ok=True)
    stream = iter(samples)
    total, index = 0, 0
    while chunk := list(itertools.islice(stream, samples_per_shard)):
        path = out / shard_name(index)
        if not path.exists():
            write_shard(path, chunk)
        total, index = total + len(chunk), index + 1
    energon_prepare(out, split_ratio)
    return total


def energon_prepare(root: Path, split_ratio: str = "1,0,0") -> None:
    """Index ``root`` as a CrudeWebdataset, non-interactively; by default all samples in the train split."""
    exe = shutil.which("energon", path=str(Path(sys.executable).parent)) or shutil.which("energon")
    if exe is None:
        raise RuntimeError("the `energon` command of megatron-energon is not installed")
    subprocess.run(
        [
            exe,
            "prepare",
            str(root),
            "--non-interactive",
            "--split-ratio",
            split_ratio,
            "--sample-type",
            "CrudeWebdataset",
            "--force-overwrite",
            "--no-progress",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
