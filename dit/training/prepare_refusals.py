"""Why ``energon prepare`` refused a dataset, found in its shards' headers.

A refused prepare leaves ``.nv-meta`` incomplete, the same as an interrupted one, but running it
again fails the same way: the fix is in the shards. energon refuses a sample key seen in two places
(each of the peers' preparation scripts numbers its samples from 0, so two datasets copied into one
folder collide), a shard without samples, and a ``.json`` that does not parse among the first two
samples of the first shard (it prints them, and stops on one it cannot). Only tar headers, and those
two ``.json`` members, are read.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from megatron.energon.flavors.webdataset.config import split_name_re

from dit.errors import one_line


def _keys(shard: Path) -> list[str]:
    """The sample keys of a shard, in order, each once."""
    keys: dict[str, None] = {}
    with tarfile.open(shard) as tar:
        for member in tar:
            match = split_name_re.match(member.name)
            if member.isfile() and match:
                keys.setdefault(match.group(1))
    return list(keys)


def _first_jsons(shard: Path, samples: int = 2) -> list[tuple[str, bytes]]:
    """The ``.json`` members of the first ``samples`` samples of a shard, by key."""
    found: list[tuple[str, bytes]] = []
    keys: set[str] = set()
    with tarfile.open(shard) as tar:
        for member in tar:
            match = split_name_re.match(member.name)
            if not (member.isfile() and match):
                continue
            keys.add(match.group(1))
            if len(keys) > samples:
                break
            if match.group(2) == "json":
                data = tar.extractfile(member)
                assert data is not None  # a regular file (isfile above)
                found.append((match.group(1), data.read(2**20)))
    return found


def prepare_refusal(root: Path) -> str | None:
    """What in ``root``'s shards makes ``energon prepare`` refuse it, with the fix; None when nothing does."""
    seen: dict[str, Path] = {}
    for shard in sorted(root.rglob("*.tar")):
        name = shard.relative_to(root)
        try:
            keys = _keys(shard)
        except (tarfile.TarError, OSError) as e:
            return f"{name} is not a readable tar ({one_line(e)}): re-copy it or move it out"
        if not keys:
            return f"{name} holds no sample, which energon prepare refuses: move it out"
        for key in keys:
            if key in seen:
                return (
                    f"sample key {key!r} is in both {seen[key]} and {name}, and energon prepare refuses a key "
                    "seen twice: write one of them with other keys (a start index of its own), or keep the "
                    "datasets apart and mix them with an energon metadataset .yaml"
                )
            seen[key] = name
    for key, payload in _first_jsons(min(root.rglob("*.tar"))) if seen else ():
        try:
            json.loads(payload)
        except ValueError as e:
            return (
                f"the .json of sample {key!r}, one of the first two of the first shard (energon prepare prints "
                f"them), is not JSON ({type(e).__name__}): fix that member or move the sample out"
            )
    return None
