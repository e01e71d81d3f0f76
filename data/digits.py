"""The quick-start dataset: scikit-learn's bundled 8x8 handwritten digits, in our shard format.

Pixels become a 1-channel "latent" ``[1, 8, 8]`` scaled to [-1, 1] (no VAE is needed at this size).
The caption is "a handwritten digit N"; with no text encoder installed, each word gets a fixed
pseudo-random vector (seeded by the word), standing in for T5: the embedding ``[L, D]`` then
differs between classes only in the digit's word, as a real encoder's would mostly.

    python -m data.digits OUT_DIR [--text-embed-dim 64] [--samples-per-shard 256] [--prompts DIR]

``--prompts DIR`` also writes each class's caption embedding, ``DIR/digit_N.pickle`` in the dataset's
format, for ``python -m dit.generate --text-embedding``.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
from pathlib import Path

import numpy as np
import torch

from data.shards import ShardSample, encode_sample, write_dataset

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def word_vector(word: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32) / np.sqrt(dim)


def caption_embedding(caption: str, dim: int) -> np.ndarray:
    """``[L, D]``: one fixed vector per word of the caption."""
    return np.stack([word_vector(w, dim) for w in caption.split()])


def digit_samples(text_embed_dim: int) -> list[tuple[str, ShardSample]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    samples = []
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        latent = torch.from_numpy(image.astype(np.float32) / 8.0 - 1.0)[None]  # [1, 8, 8], pixels 0..16
        caption = f"a handwritten digit {NUMBER_WORDS[label]}"
        meta = {"caption": caption, "label": int(label), "height": 8, "width": 8, "aspect_ratio": 1.0}
        samples.append((f"digit_{i:05d}", ShardSample(latent, caption_embedding(caption, text_embed_dim), meta)))
    return samples


def write_digits(out: Path, text_embed_dim: int = 64, samples_per_shard: int = 256) -> int:
    """Write the shards (skipping complete ones) and index them; return the number of samples."""
    return write_dataset(out, ((key, encode_sample(s)) for key, s in digit_samples(text_embed_dim)), samples_per_shard)


def write_prompts(out: Path, text_embed_dim: int = 64) -> list[Path]:
    """One caption embedding per class, ``out/digit_N.pickle``, as the shards store them."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for label, word in enumerate(NUMBER_WORDS):
        path = out / f"digit_{label}.pickle"
        path.write_bytes(pickle.dumps(caption_embedding(f"a handwritten digit {word}", text_embed_dim)))
        paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="Dataset folder to write.")
    p.add_argument("--text-embed-dim", type=int, default=64, help="Width of the stand-in text embedding.")
    p.add_argument("--samples-per-shard", type=int, default=256, help="Samples per tar shard.")
    p.add_argument("--prompts", type=Path, default=None, help="Also write each class's caption embedding here.")
    a = p.parse_args()
    n = write_digits(a.out, a.text_embed_dim, a.samples_per_shard)
    print(f"wrote {n} digit samples to {a.out} and indexed them with `energon prepare`")
    if a.prompts is not None:
        write_prompts(a.prompts, a.text_embed_dim)
        print(f"wrote the caption embeddings of the 10 classes to {a.prompts}")


if __name__ == "__main__":
    main()
