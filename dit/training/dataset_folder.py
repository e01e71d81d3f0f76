"""An energon dataset folder as a launch sees it: prepared (``.nv-meta`` complete, or a metadataset file), the
splits it lists, and why ``energon prepare`` refused it.

A refused prepare leaves ``.nv-meta`` incomplete, the same as an interrupted one, but running it
again fails the same way: the fix is in the shards. energon refuses a sample key seen in two places
(each of the peers' preparation scripts numbers its samples from 0, so two datasets copied into one
folder collide), a shard without samples, and a ``.json`` that does not parse among the first two
samples of the first shard (it prints them, and stops on one it cannot). Only tar headers, and those
two ``.json`` members, are read.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import yaml

from dit.errors import ConfigError, one_line


def _members(shard: Path) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo, re.Match]]:
    """A shard's files named as energon splits them into sample key and extension (its own rule)."""
    # imported here: the command line imports this module, and energon brings torch
    from megatron.energon.flavors.webdataset.config import split_name_re

    with tarfile.open(shard) as tar:
        for member in tar:
            match = split_name_re.match(member.name)
            if member.isfile() and match:
                yield tar, member, match


def _keys(shard: Path) -> list[str]:
    """The sample keys of a shard, in order, each once."""
    keys: dict[str, None] = {}
    for _, _, match in _members(shard):
        keys.setdefault(match.group(1))
    return list(keys)


def _first_jsons(shard: Path, samples: int = 2) -> list[tuple[str, bytes]]:
    """The ``.json`` members of the first ``samples`` samples of a shard, by key."""
    found: list[tuple[str, bytes]] = []
    keys: set[str] = set()
    for tar, member, match in _members(shard):
        keys.add(match.group(1))
        if len(keys) > samples:
            break
        if match.group(2) == "json":
            data = tar.extractfile(member)
            assert data is not None  # a regular file (isfile in _members)
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


NV_META = (("dataset.yaml",), ("split.yaml",), (".info.json", ".info.yaml"), ("index.sqlite",))
"""What ``energon prepare`` writes into ``.nv-meta`` (either name of a tuple), all needed to read."""


def check_energon_dataset(path: str | Path, flag: str = "--data-path") -> None:
    """An existing dataset prepared by ``energon prepare`` (a folder with .nv-meta, or a metadataset file)."""
    path = Path(path)
    prepare = f"`energon prepare {path} --non-interactive --split-ratio 1,0,0 --sample-type CrudeWebdataset`"
    if not path.exists():
        raise ConfigError(flag, f"{path} does not exist")
    if path.is_file():
        _check_metadataset(path, flag)
    elif not (path / ".nv-meta").is_dir():
        raise ConfigError(flag, f"{path} is not an energon dataset (no .nv-meta); run {prepare} first")
    else:
        missing = [names[0] for names in NV_META if not any((path / ".nv-meta" / n).is_file() for n in names)]
        if missing:
            refusal = prepare_refusal(path)
            raise ConfigError(
                flag,
                f"{path}/.nv-meta lacks {', '.join(missing)}: "
                + (
                    f"energon prepare refused the dataset: {refusal}; then run {prepare}"
                    if refusal
                    else f"an interrupted prepare? run {prepare} again"
                ),
            )


def _check_metadataset(path: Path, flag: str) -> None:
    """A file is a dataset only as energon's metadataset YAML; a shard or anything else is a mistake."""
    if path.suffix == ".tar":
        raise ConfigError(flag, f"{path} is one shard; give the folder that holds the shards and .nv-meta")
    if path.suffix not in (".yaml", ".yml"):
        raise ConfigError(flag, f"{path} is a file, not an energon dataset folder (with .nv-meta) or metadataset .yaml")
    try:
        recipe = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(flag, f"{path} is not valid YAML ({type(e).__name__})") from None
    if not (isinstance(recipe, dict) and "__module__" in recipe):
        raise ConfigError(flag, f"{path} is not an energon metadataset (a YAML mapping with __module__ and __class__)")


def has_split(path: str | Path, split: str) -> bool:
    """Whether an energon dataset folder lists shards for ``split`` (``.nv-meta/split.yaml``)."""
    meta = Path(path) / ".nv-meta" / "split.yaml"
    if not meta.is_file():
        return False
    parts = (yaml.safe_load(meta.read_text()) or {}).get("split_parts") or {}
    return bool(parts.get(split))
