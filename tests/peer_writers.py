"""Datasets written the way NeMo's, DFM's and Megatron-Bridge's preparation scripts write them.

Each writer follows its script line by line where it shapes what lands on disk: webdataset's own
``ShardWriter`` (so member names are webdataset's, NeMo's ``KEY..pth`` included), the sample dict's
keys, the shard name pattern, the tensors' dtypes and shapes, the text's padding, and the json fields.
Small random tensors stand in for the VAE's and the text encoder's outputs: 16 latent channels (Cosmos,
Wan and Flux VAEs), text width :data:`TEXT_DIM` in place of 1024 / 4096.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import torch
import webdataset as wds

from data.shards import energon_prepare

CHANNELS = 16
TEXT_DIM = 8
FLAGS = ["--latent-channels", str(CHANNELS), "--text-embed-dim", str(TEXT_DIM)]  # the model's own flags, no other


def _rng(i: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 + i)


def _t5_padded(i: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    """``[length, D]``: the caption's rows, then zero rows (NeMo's ``generate_t5_embed``, Wan's ``_encode_text``)."""
    g = _rng(i)
    rows = caption_rows(i)
    embed = torch.zeros(length, TEXT_DIM, dtype=dtype)
    embed[:rows] = torch.randn(rows, TEXT_DIM, generator=g).to(dtype)
    return embed


def caption_rows(i: int) -> int:
    """Rows of sample ``i``'s caption before its zero padding."""
    return 3 + i % 7


def _side(i: int) -> tuple[int, int]:
    """Latent height and width of sample ``i``: 4 to 8, even (patch 2)."""
    return 4 + 2 * (i % 3), 4 + 2 * (i % 2)


def nemo_dit(out: Path, n: int, first: int = 0) -> None:
    """NeMo ``nemo/collections/diffusion/data/prepare_energon_dataset.py``: keys ``".pth"`` etc."""
    with wds.ShardWriter(os.path.join(out, "rank0-%06d.tar"), maxcount=10000, verbose=0) as sink:
        for i in range(first, first + n):
            h, w = _side(i)
            latent = torch.randn(1, CHANNELS, 1, h, w, generator=_rng(i))  # Cosmos tokenizer's output, a batch of 1
            text = _t5_padded(i, 512, torch.bfloat16)[None]  # [1, 512, D]
            sink.write(
                {
                    "__key__": f"{i:06}",
                    ".pth": latent.to(dtype=torch.bfloat16),
                    ".pickle": pickle.dumps(text),
                    ".json": {"image_height": 8 * h, "image_width": 8 * w},
                }
            )


def dfm_dit(out: Path, n: int, first: int = 0) -> None:
    """DFM ``examples/megatron/recipes/dit/prepare_energon_dataset_butterfly.py``: the json sizes are read
    from ``[b, c, t, h, w]``, so ``image_height`` is t (1) and ``image_width`` the pixel height."""
    with wds.ShardWriter(os.path.join(out, "rank0-%06d.tar"), maxcount=10000, verbose=0) as sink:
        for i in range(first, first + n):
            h, w = _side(i)
            latent = torch.randn(1, CHANNELS, 1, h, w, generator=_rng(i))  # autoencoder.encode(...)[0]: [1, C, T, H, W]
            text = _t5_padded(i, 512, torch.bfloat16)[None]
            sink.write(
                {
                    "__key__": f"{i:06}",
                    "pth": latent.to(dtype=torch.bfloat16),
                    "pickle": pickle.dumps(text),
                    "json": {"image_height": 1, "image_width": 8 * h},
                }
            )


def _wan_json(frames: int, h: int, w: int, mode: str) -> dict:
    return {
        "video_path": "/videos/clip.mp4",
        "processed_frames": frames,
        "processed_height": 8 * h,
        "processed_width": 8 * w,
        "caption": "a clip",
        "deterministic_latents": True,
        "memory_optimization": True,
        "model_version": "wan2.1",
        "processing_mode": mode,
        "resize_settings": {
            "target_size": None,
            "resize_mode": "bilinear",
            "maintain_aspect_ratio": True,
            "center_crop": False,
        },
    }


def wan_video(out: Path, n: int, first: int = 0) -> None:
    """DFM ``examples/common/wan/prepare_dataset_wan.py`` (and Megatron-Bridge's copy), ``--mode video``:
    fp16 on a GPU, latent ``[16, 1 + (T - 1) / 4, H / 8, W / 8]``, umT5 text ``[226, D]`` zero-padded, no fps."""
    with wds.ShardWriter(str(out / "shard-rank00-%06d.tar"), maxcount=10000, verbose=0) as sink:
        for i in range(first, first + n):
            h, w = _side(i)
            frames = 1 + 4 * (1 + i % 2)  # 5 or 9 frames -> 2 or 3 latent frames
            latent = torch.randn(1, CHANNELS, 1 + (frames - 1) // 4, h, w, generator=_rng(i)).half()
            text = _t5_padded(i, 226, torch.float16)[None]
            sink.write(
                {
                    "__key__": f"{i:06}",
                    "pth": latent.detach().to(device="cpu")[0],
                    "pickle": pickle.dumps(text.detach().to(device="cpu")[0]),
                    "json": _wan_json(frames, h, w, "video"),
                }
            )


def wan_frames(out: Path, n: int, first: int = 0, frames_per_video: int = 4) -> None:
    """The same script, ``--mode frames``: each extracted frame a 1-frame video ``[16, 1, h, w]``."""
    with wds.ShardWriter(str(out / "shard-rank00-%06d.tar"), maxcount=10000, verbose=0) as sink:
        for i in range(first, first + n // frames_per_video):
            text = _t5_padded(i, 226, torch.float16)[None].detach().to(device="cpu")[0]
            for frame_idx in range(1, frames_per_video + 1):
                h, w = _side(i)
                latent = torch.randn(1, CHANNELS, 1, h, w, generator=_rng(i * 10 + frame_idx)).half()
                meta = {
                    **_wan_json(1, h, w, "frames"),
                    "frame_index": frame_idx,
                    "total_frames_in_video": frames_per_video,
                }
                sink.write(
                    {
                        "__key__": f"{i:06}_{frame_idx:02}",
                        "pth": latent.detach().to(device="cpu")[0],
                        "pickle": pickle.dumps(text),
                        "json": meta,
                    }
                )


def flux(out: Path, n: int, first: int = 0) -> None:
    """DFM ``examples/megatron/recipes/flux/prepare_energon_dataset_flux.py``: fp32 latent ``[16, H/8, W/8]``,
    a dict of T5 ``prompt_embeds [512, D]`` (padding="max_length": T5's outputs at the pad tokens are not
    zero) and CLIP ``pooled_prompt_embeds [768]``."""
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=10000, verbose=0) as sink:
        for i in range(first, first + n):
            h, w = _side(i)
            g = _rng(i)
            latents = torch.randn(1, CHANNELS, h, w, generator=g)[0]
            text_embeddings = {
                "prompt_embeds": torch.randn(512, TEXT_DIM, generator=g),
                "pooled_prompt_embeds": torch.randn(768, generator=g),
            }
            json_data = {
                "image_path": f"/images/{i}.jpg",
                "processed_height": 8 * h,
                "processed_width": 8 * w,
                "caption": "an image",
                "deterministic_latents": True,
                "memory_optimization": True,
                "model_version": "flux",
                "vae_normalization": "[-1, 1]",
                "resize_settings": {
                    "target_size": [1024, 1024],
                    "resize_mode": "bilinear",
                    "maintain_aspect_ratio": True,
                    "center_crop": False,
                },
            }
            sink.write(
                {
                    "__key__": f"{i:06}",
                    "pth": latents.detach().to(device="cpu"),
                    "pickle": pickle.dumps(text_embeddings),
                    "json": json_data,
                }
            )


WRITERS: dict[str, Callable[[Path, int, int], None]] = {
    "NeMo DiT": nemo_dit,
    "DFM DiT": dfm_dit,
    "Wan": wan_video,
    "Wan frames": wan_frames,
    "Flux": flux,
}


def write(name: str, out: Path, n: int, first: int = 0) -> Path:
    """``n`` samples as writer ``name`` writes them, indexed by ``energon prepare``; ``first``: the index of
    the first (a rank of a distributed prepare starts at its share's; energon refuses a key seen twice)."""
    out.mkdir(parents=True, exist_ok=True)
    WRITERS[name](out, n, first)
    energon_prepare(out)
    return out
