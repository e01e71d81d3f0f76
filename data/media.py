"""Decoding an input to pixels at a size the VAE and the patch grid accept.

An image becomes a clip of one frame. A video (read with PyAV) is resampled down to ``fps`` by
dropping frames (never invented: a slower source keeps its own rate), cut to its first
``max_frames`` frames, then to ``1 + k * frame_step`` frames, the lengths a causal video VAE
accepts. Every frame is resized, when ``resolution`` is set, to about ``resolution**2`` pixels at
its own aspect ratio, then center-cropped to a multiple of ``multiple`` on each side (the VAE's
downsampling times the patch size), so that the latent divides into whole patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps


class MediaError(ValueError):
    """An input that decodes but cannot be used; ``kind`` names the reason for the skip counts."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class PixelSpec:
    """How inputs become pixels."""

    multiple: int
    """Each side is cropped to a multiple of this."""
    resolution: int | None = None
    """Resize to about resolution**2 pixels first (None: keep the native size)."""
    fps: float | None = None
    """Drop video frames down to this rate (None: the source rate)."""
    max_frames: int | None = None
    """Keep at most this many video frames (None: all)."""
    frame_step: int = 1
    """Video lengths must be 1 + k * frame_step (the VAE's temporal compression)."""


@dataclass
class Clip:
    """Decoded pixels ``[T, 3, H, W]`` uint8 (T = 1 for an image) and, for a video, its frame rate."""

    frames: torch.Tensor
    fps: float | None


def output_size(height: int, width: int, spec: PixelSpec) -> tuple[tuple[int, int], tuple[int, int]]:
    """(resized (h, w), cropped (h, w)) of a frame of ``height`` x ``width`` pixels."""
    scale = 1.0 if spec.resolution is None else spec.resolution / math.sqrt(height * width)
    resized = (max(1, round(height * scale)), max(1, round(width * scale)))
    cropped = (resized[0] // spec.multiple * spec.multiple, resized[1] // spec.multiple * spec.multiple)
    if min(cropped) == 0:
        raise MediaError("too small", f"{height}x{width} pixels is smaller than one {spec.multiple}-pixel block")
    return resized, cropped


def _to_tensor(image: Image.Image, spec: PixelSpec) -> torch.Tensor:
    """``[3, H, W]`` uint8, resized and center-cropped."""
    (rh, rw), (ch, cw) = output_size(image.height, image.width, spec)
    if (rh, rw) != (image.height, image.width):
        image = image.resize((rw, rh), Image.Resampling.LANCZOS)
    top, left = (rh - ch) // 2, (rw - cw) // 2
    image = image.crop((left, top, left + cw, top + ch))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def read_image(path: Path, spec: PixelSpec) -> Clip:
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
    return Clip(_to_tensor(image, spec)[None], None)


def read_video(path: Path, spec: PixelSpec) -> Clip:
    import av

    frames: list[torch.Tensor] = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        source_fps = float(stream.average_rate or stream.guessed_rate or 0) or None
        if source_fps is None and spec.fps is not None:
            raise MediaError("no frame rate", "the video states no frame rate, so --fps cannot resample it")
        fps: float | None = source_fps
        step = 1.0  # source frames per kept frame
        if spec.fps is not None and source_fps is not None:
            fps = min(spec.fps, source_fps)
            step = source_fps / fps
        for index, frame in enumerate(container.decode(stream)):
            if index < round(len(frames) * step):
                continue
            frames.append(_to_tensor(frame.to_image(), spec))
            if spec.max_frames is not None and len(frames) >= spec.max_frames:
                break
    if not frames:
        raise MediaError("no frames", "the video has no decodable frames")
    keep = 1 + (len(frames) - 1) // spec.frame_step * spec.frame_step
    return Clip(torch.stack(frames[:keep]), fps)
