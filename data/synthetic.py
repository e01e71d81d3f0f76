"""A synthetic dataset of mixed image and video latents, for the packing report and loader benchmarks.

Shapes follow a VAE with 8x spatial and 4x temporal compression and 16 channels:
- images of 256x256 and 512x512 px -> latents ``[16, 32, 32]`` and ``[16, 64, 64]`` (stored 3-D);
- videos of 17 to 121 frames (4k+1) -> ``(frames - 1) / 4 + 1`` = 5 to 31 latent frames, at a few
  resolutions and aspect ratios -> ``[16, T, H/8, W/8]``.

Latents are bf16 noise, text embeddings float16 ``[L, D]`` with L in [16, 120], metadata in the
shapes real preparation writes (``image_height``/``image_width`` for images, ``height``/``width``,
``fps`` and ``num_frames`` for videos).

    python -m data.synthetic OUT [--samples 2400] [--video-fraction 0.3] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.shards import ShardSample, encode_sample, write_dataset

IMAGE_SIZES = (256, 512)  # square, px
VIDEO_SIZES = ((256, 256), (192, 320), (320, 192), (240, 240), (160, 368))  # (height, width) px
VIDEO_FRAMES = tuple(range(17, 122, 4))  # 17, 21, ..., 121
SPATIAL, TEMPORAL = 8, 4  # VAE compression


def synthetic_sample(rng: random.Random, video: bool, channels: int = 16, text_embed_dim: int = 1024) -> ShardSample:
    """One random image or video sample in the on-disk format."""
    g = torch.Generator().manual_seed(rng.getrandbits(62))
    text = np.random.default_rng(rng.getrandbits(62)).standard_normal((rng.randint(16, 120), text_embed_dim))
    shape: tuple[int, ...]
    meta: dict[str, Any]
    if video:
        (h, w), frames = rng.choice(VIDEO_SIZES), rng.choice(VIDEO_FRAMES)
        shape = (channels, (frames - 1) // TEMPORAL + 1, h // SPATIAL, w // SPATIAL)
        meta = {"height": h, "width": w, "fps": 24.0, "num_frames": frames}
    else:
        h = w = rng.choice(IMAGE_SIZES)
        shape = (channels, h // SPATIAL, w // SPATIAL)
        meta = {"image_height": h, "image_width": w}
    meta.update(caption=f"synthetic {'video' if video else 'image'} {w}x{h}", aspect_ratio=round(w / h, 4))
    latent = torch.randn(shape, generator=g).to(torch.bfloat16)
    return ShardSample(latent, text.astype(np.float16), meta)


def synthetic_samples(n: int, video_fraction: float, seed: int, **kw: int) -> Iterator[tuple[str, ShardSample]]:
    rng = random.Random(seed)
    for i in range(n):
        yield f"sample_{i:06d}", synthetic_sample(rng, rng.random() < video_fraction, **kw)


def write_synthetic(
    out: Path, samples: int = 2400, video_fraction: float = 0.3, seed: int = 0, samples_per_shard: int = 100, **kw: int
) -> int:
    """Write the shards and index them with ``energon prepare``; return the number of samples."""
    stream = synthetic_samples(samples, video_fraction, seed, **kw)
    return write_dataset(out, ((key, encode_sample(s)) for key, s in stream), samples_per_shard)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="Dataset folder to write.")
    p.add_argument("--samples", type=int, default=2400, help="Number of samples.")
    p.add_argument("--video-fraction", type=float, default=0.3, help="Fraction of videos (0: images only).")
    p.add_argument("--samples-per-shard", type=int, default=100, help="Samples per tar shard.")
    p.add_argument("--text-embed-dim", type=int, default=1024, help="Width of the text embeddings.")
    p.add_argument("--latent-channels", type=int, default=16, help="Latent channels.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the shapes and values.")
    a = p.parse_args()
    n = write_synthetic(
        a.out,
        a.samples,
        a.video_fraction,
        a.seed,
        a.samples_per_shard,
        channels=a.latent_channels,
        text_embed_dim=a.text_embed_dim,
    )
    print(f"wrote {n} synthetic samples to {a.out} and indexed them with `energon prepare`")


if __name__ == "__main__":
    main()
