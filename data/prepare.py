"""Prepare a dataset: captioned images and videos -> shards of latents and text embeddings, for energon.

    python -m data.prepare INPUT OUT --vae NAME_OR_PATH --text-encoder NAME_OR_PATH [--captions FILE.csv]

Each sample is ``samples/sample_NNNNNNN.{pth,pickle,json}``: the VAE latent ``[C, T, H, W]``
(``[C, H, W]`` for an image), the caption's embedding ``[L, D]`` at its true length, and metadata
(caption, pixel height/width, aspect_ratio = width / height, source file; fps and num_frames for a
video). See dit/encoders.py for how latents are computed and normalised.

Resumable: inputs go to shards by their position in a fixed order, ``--samples-per-shard`` each,
and a shard exists only once complete (it is written as ``.partial`` and renamed), so a rerun
computes just the missing shards. ``OUT/prepare.json`` records the inputs and the settings that
shape the data, and a rerun with others stops instead of mixing two datasets. An input that cannot
be decoded is skipped, counted and named at the end; it never stops the run.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data.inputs import MediaItem, find_items
from data.media import Clip, MediaError, PixelSpec, read_image, read_video
from data.shards import ShardSample, encode_sample, energon_prepare, shard_name, write_shard
from dit.encoders import TextEncoder, VaeEncoder, check_source
from dit.errors import ConfigError

MANIFEST = "prepare.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Stored dtype of latents and text embeddings, by ``--dtype`` name."""
SHAPING_FLAGS = (
    "samples_per_shard",
    "vae",
    "vae_subfolder",
    "text_encoder",
    "text_encoder_subfolder",
    "tokenizer_subfolder",
    "max_text_length",
    "resolution",
    "patch_size",
    "fps",
    "num_frames",
    "dtype",
)
"""The settings that change what is written; a rerun must keep them to resume."""


@dataclass
class PrepareConfig:
    """The command line, as parsed (``build_parser`` holds each field's help and default)."""

    input: Path
    output: Path
    vae: str
    text_encoder: str
    captions: Path | None
    vae_subfolder: str | None
    text_encoder_subfolder: str | None
    tokenizer_subfolder: str | None
    samples_per_shard: int
    batch_size: int
    max_text_length: int
    resolution: int | None
    patch_size: int
    fps: float | None
    num_frames: int
    dtype: str
    num_workers: int


@dataclass
class Summary:
    """What a run did: shards written now and found done, samples written, inputs skipped by reason."""

    shards_written: int = 0
    shards_done_before: int = 0
    samples_written: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def skip(self, kind: str, source: str, message: str) -> None:
        self.skipped[kind] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{source} ({kind}: {message})")

    def lines(self) -> list[str]:
        out = [
            f"wrote {self.samples_written} samples in {self.shards_written} shards; "
            f"{self.shards_done_before} shards were already complete"
        ]
        if self.skipped:
            kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(self.skipped.items()))
            out.append(f"skipped {sum(self.skipped.values())} inputs ({kinds}); first: " + "; ".join(self.examples))
        return out


@dataclass
class Encoders:
    vae: VaeEncoder
    text: TextEncoder
    pixels: PixelSpec
    dtype: torch.dtype


def _check(config: PrepareConfig) -> None:
    for flag, value, low in (
        ("--samples-per-shard", config.samples_per_shard, 1),
        ("--batch-size", config.batch_size, 1),
        ("--max-text-length", config.max_text_length, 1),
        ("--patch-size", config.patch_size, 1),
        ("--num-frames", config.num_frames, 0),
        ("--num-workers", config.num_workers, 1),
    ):
        if value < low:
            raise ConfigError(flag, f"must be >= {low}, got {value}")
    for flag, positive in (("--resolution", config.resolution), ("--fps", config.fps)):
        if positive is not None and positive <= 0:
            raise ConfigError(flag, f"must be > 0, got {positive}")


def _manifest(config: PrepareConfig, items: list[MediaItem]) -> dict:
    listing = "\n".join(f"{item.source}\t{item.caption}" for item in items).encode()
    settings = {name: getattr(config, name) for name in SHAPING_FLAGS}
    return {"inputs": len(items), "inputs_sha256": hashlib.sha256(listing).hexdigest(), **settings}


def _check_resumable(out: Path, manifest: dict) -> None:
    """Stop when ``out`` holds shards of other inputs or settings, which this run would mix in."""
    path = out / MANIFEST
    if path.is_file():
        before = json.loads(path.read_text())
        differ = sorted(k for k in manifest.keys() | before.keys() if before.get(k) != manifest.get(k))
        if differ:
            raise ConfigError(
                "OUT",
                f"{out} holds shards prepared with other {', '.join(differ)}; "
                "rerun with the same inputs and flags, or write to a new folder",
            )
    elif any(out.glob("shard_*.tar")):
        raise ConfigError("OUT", f"{out} holds shards not written by data.prepare; give a new or empty folder")


def _decode(item: MediaItem, pixels: PixelSpec) -> Clip | Exception:
    try:
        return (read_video if item.is_video else read_image)(item.path, pixels)
    except Exception as e:  # noqa: BLE001 -- any broken input is skipped and reported, never fatal
        return e


def _decoded_batches(
    items: list[MediaItem], pixels: PixelSpec, batch_size: int, pool: ThreadPoolExecutor
) -> Iterator[list[tuple[int, MediaItem, Clip | Exception]]]:
    """Batches of (position, input, clip or error); the next batch decodes while the caller encodes this one."""
    starts = range(0, len(items), batch_size)

    def submit(start: int) -> list[Future]:
        return [pool.submit(_decode, item, pixels) for item in items[start : start + batch_size]]

    pending = submit(0)
    for start in starts:
        current, pending = pending, (submit(start + batch_size) if start + batch_size < len(items) else [])
        yield [(start + i, items[start + i], f.result()) for i, f in enumerate(current)]


def _metadata(item: MediaItem, clip: Clip) -> dict:
    frames, _, height, width = clip.frames.shape
    meta = {
        "caption": item.caption,
        "height": height,
        "width": width,
        "aspect_ratio": round(width / height, 4),
        "source": item.source,
    }
    if item.is_video:
        meta.update(fps=clip.fps, num_frames=frames)
    return meta


def _encode_batch(batch: list[tuple[int, MediaItem, Clip]], encoders: Encoders) -> list[ShardSample]:
    """Encode decoded inputs; clips of one shape share a VAE batch."""
    texts = encoders.text.encode([item.caption for _, item, _ in batch])
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, (_, _, clip) in enumerate(batch):
        by_shape[tuple(clip.frames.shape)].append(i)
    latents: dict[int, torch.Tensor] = {}
    for members in by_shape.values():
        z = encoders.vae.encode(torch.stack([batch[i][2].frames for i in members]))  # [N, C, T', h, w]
        latents.update(zip(members, z))
    samples = []
    for i, ((_, item, clip), text) in enumerate(zip(batch, texts)):
        latent = latents[i] if item.is_video else latents[i][:, 0]  # [C, T', h, w] or [C, h, w]
        samples.append(ShardSample(latent.to(encoders.dtype), text.to(encoders.dtype), _metadata(item, clip)))
    return samples


def _shard_samples(
    items: list[MediaItem],
    first: int,
    encoders: Encoders,
    batch_size: int,
    pool: ThreadPoolExecutor,
    summary: Summary,
    progress,
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, payloads)`` of one shard's inputs (``first`` is the global position of the first one)."""
    for batch in _decoded_batches(items, encoders.pixels, batch_size, pool):
        good = []
        for position, item, result in batch:
            if isinstance(result, Exception):
                kind = result.kind if isinstance(result, MediaError) else "unreadable"
                summary.skip(kind, item.source, (str(result).strip() or type(result).__name__).splitlines()[0])
            else:
                good.append((position, item, result))
        if good:
            for (position, _, _), sample in zip(good, _encode_batch(good, encoders)):
                yield f"sample_{first + position:07d}", encode_sample(sample)
        progress.update(len(batch))


def _load_encoders(config: PrepareConfig) -> Encoders:
    check_source("--vae", config.vae)  # before the text encoder, which may take minutes to load
    text = TextEncoder(
        config.text_encoder, config.text_encoder_subfolder, config.tokenizer_subfolder, config.max_text_length
    )
    vae = VaeEncoder(config.vae, config.vae_subfolder, config.batch_size)
    pixels = PixelSpec(
        multiple=vae.spatial * config.patch_size,
        resolution=config.resolution,
        fps=config.fps,
        max_frames=config.num_frames or None,
        frame_step=vae.temporal,
    )
    return Encoders(vae, text, pixels, DTYPES[config.dtype])


def prepare(config: PrepareConfig) -> Summary:
    """Write the missing shards of ``config.output``, then index the folder with ``energon prepare``."""
    from tqdm import tqdm

    _check(config)
    items, uncaptioned = find_items(config.input, config.captions)
    out = config.output
    manifest = _manifest(config, items)
    _check_resumable(out, manifest)
    summary = Summary()
    for source in uncaptioned:
        summary.skip("no caption", source, "no .txt beside it")
    n = config.samples_per_shard
    shards = [(index, items[start : start + n]) for index, start in enumerate(range(0, len(items), n))]
    todo = [(index, chunk) for index, chunk in shards if not (out / shard_name(index)).exists()]
    summary.shards_done_before = len(shards) - len(todo)
    print(
        f"data.prepare: {len(items)} inputs -> {len(shards)} shards of up to {n}; "
        f"{summary.shards_done_before} already complete, {len(todo)} to write",
        flush=True,
    )
    if todo:
        encoders = _load_encoders(config)
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        with (
            ThreadPoolExecutor(config.num_workers) as pool,
            tqdm(total=sum(len(chunk) for _, chunk in todo), unit="input", desc="encoding") as progress,
        ):
            for index, chunk in todo:
                samples = _shard_samples(chunk, index * n, encoders, config.batch_size, pool, summary, progress)
                head = next(samples, None)  # energon refuses an empty shard, so write none
                if head is None:
                    progress.write(f"{shard_name(index)}: no readable input, not written (a rerun retries it)")
                    continue
                summary.samples_written += write_shard(out / shard_name(index), itertools.chain([head], samples))
                summary.shards_written += 1
    if not any(out.glob("shard_*.tar")):
        raise ConfigError(
            "INPUT",
            f"none of the {len(items)} inputs could be read, so there is nothing to index; "
            + "; ".join(summary.examples),
        )
    energon_prepare(out)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data.prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "input",
        type=Path,
        metavar="INPUT",
        help="Folder of images/videos (captions in NAME.txt beside each, unless --captions is given).",
    )
    p.add_argument("output", type=Path, metavar="OUT", help="Dataset folder to write (rerun on it to resume).")
    p.add_argument("--vae", required=True, help="diffusers VAE: hub name or local folder.")
    p.add_argument("--vae-subfolder", default=None, help="Its subfolder in a pipeline repository (e.g. vae).")
    p.add_argument("--text-encoder", required=True, help="T5-style transformers encoder: hub name or local folder.")
    p.add_argument("--text-encoder-subfolder", default=None, help="Its subfolder (e.g. text_encoder).")
    p.add_argument(
        "--tokenizer-subfolder",
        default=None,
        help="Subfolder of the text encoder's repository holding the tokenizer (e.g. tokenizer).",
    )
    p.add_argument(
        "--captions",
        type=Path,
        default=None,
        help="CSV (header path,caption) or JSONL of inputs; relative paths are under INPUT.",
    )
    p.add_argument("--samples-per-shard", type=int, default=1000, help="Inputs per tar shard.")
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="Inputs per text batch; clips (or frames, for an image VAE) per VAE batch.",
    )
    p.add_argument("--max-text-length", type=int, default=512, help="Caption tokens kept at most.")
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Resize to about RESOLUTION^2 pixels at the input's aspect ratio (default: native size).",
    )
    p.add_argument(
        "--patch-size",
        type=int,
        default=2,
        help="The model's spatial patch; sides are cropped to a multiple of it x the VAE's downsampling.",
    )
    p.add_argument("--fps", type=float, default=None, help="Drop video frames down to this rate (default: source).")
    p.add_argument("--num-frames", type=int, default=121, help="Video frames kept at most (0: all).")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="Stored dtype of latents and text.")
    p.add_argument("--num-workers", type=int, default=4, help="Threads decoding inputs.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.monotonic()
    try:
        summary = prepare(PrepareConfig(**vars(args)))
    except ConfigError as e:
        print(f"data.prepare: error: {e}", file=sys.stderr)
        return 2
    for line in summary.lines():
        print(f"data.prepare: {line}")
    print(f"data.prepare: {args.output} is indexed for energon; done in {time.monotonic() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
