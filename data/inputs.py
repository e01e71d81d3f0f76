"""What to prepare: (media file, caption) pairs, from a folder of captioned files or a caption list.

In a folder (searched recursively), each image or video has its caption in a ``.txt`` file of the
same name beside it (``cat.jpg`` + ``cat.txt``). A list file gives one ``path,caption`` row per
input: a CSV with a header naming those columns, or JSONL objects with those keys; relative paths
are relative to the input folder. The order is fixed (sorted paths, or the list's own order)
because prepare assigns inputs to shards by their position.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from dit.errors import ConfigError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".webm", ".mkv", ".avi"})


@dataclass(frozen=True)
class MediaItem:
    """One input: the media file, its caption, and its path relative to the input folder (for logs)."""

    path: Path
    caption: str
    source: str

    @property
    def is_video(self) -> bool:
        return self.path.suffix.lower() in VIDEO_SUFFIXES


def _item(root: Path, path: str, caption: str) -> MediaItem:
    full = Path(path) if Path(path).is_absolute() else root / path
    return MediaItem(full, caption.strip(), str(path))


def _from_folder(root: Path) -> tuple[list[MediaItem], list[str]]:
    media = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
    if not media:
        raise ConfigError(
            "INPUT",
            f"no images or videos under {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))})",
        )
    items, uncaptioned = [], []
    for path in media:
        text = path.with_suffix(".txt")
        rel = path.relative_to(root).as_posix()
        if text.is_file():
            items.append(_item(root, rel, text.read_text(encoding="utf-8")))
        else:
            uncaptioned.append(rel)
    if not items:
        raise ConfigError(
            "INPUT",
            f"found {len(media)} images/videos under {root} but no caption .txt beside "
            "any; write NAME.txt beside each NAME.jpg/.mp4, or pass --captions FILE.csv",
        )
    return items, uncaptioned


def _rows(captions: Path) -> list[dict]:
    text = captions.read_text(encoding="utf-8")
    if captions.suffix.lower() == ".csv":
        return list(csv.DictReader(text.splitlines()))
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise ConfigError("--captions", f"{captions} line {number} is not valid JSON") from None
    return rows


def _from_list(root: Path, captions: Path) -> list[MediaItem]:
    if not captions.is_file():
        raise ConfigError("--captions", f"{captions} does not exist")
    if captions.suffix.lower() not in (".csv", ".jsonl"):
        raise ConfigError("--captions", f"{captions} must be a .csv or .jsonl file")
    items = []
    for number, row in enumerate(_rows(captions), 1):
        if not isinstance(row, dict) or not isinstance(row.get("path"), str) or not isinstance(row.get("caption"), str):
            raise ConfigError(
                "--captions",
                f"{captions} row {number} has no 'path' and 'caption' "
                "(a CSV needs a header line 'path,caption'; JSONL needs those keys)",
            )
        items.append(_item(root, row["path"], row["caption"]))
    if not items:
        raise ConfigError("--captions", f"{captions} lists no inputs")
    return items


def find_items(root: Path, captions: Path | None = None) -> tuple[list[MediaItem], list[str]]:
    """The inputs in their fixed order, and the media files skipped for having no caption."""
    if not root.is_dir():
        raise ConfigError("INPUT", f"{root} is not a folder; give the folder that holds the images/videos")
    if captions is not None:
        return _from_list(root, captions), []
    return _from_folder(root)
