"""One sample of the on-disk format, in its two in-memory forms, and the checks that reject bad ones.

energon hands the cooker a crude sample of raw bytes: ``.pth`` latent ``[C, T, H, W]`` or
``[C, H, W]`` (any float dtype), ``.pickle`` text embedding ``[L, D]`` (numpy or torch) and
``.json`` metadata (a caption at least; other keys kept as they are).

- :func:`read_header` makes a :class:`DiffusionSample`: the lengths come from the tensor header
  (a meta-device load reads no tensor data) and the latent stays raw bytes; the text embedding is
  unpickled (by :mod:`data.safe_pickle`, which runs nothing) and checked here, kept in its stored
  dtype: as many bytes as its payload, so a packing buffer of hundreds of samples still costs only
  their on-disk size, and a text defect is found before it takes room in a pack.
- :func:`decode` runs after packing, on the samples of one pack: it decodes the latent, checks its
  values and patchifies into an :class:`EncodedSample`.

Both raise :class:`~data.errors.BadSample` naming the defect. Nothing may cost much more memory
than its declared shape: a tensor stored with more than :data:`MAX_STORAGE_RATIO` times its own
bytes is skipped before its data is loaded, and shapes are checked before any conversion.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from megatron.energon import Sample
from megatron.energon.edataclass import edataclass

from data import safe_pickle
from data.errors import BadSample, SkipKind, SkipRecord
from data.shard_reads import UNREADABLE
from dit.patchify import as_video, grid_size, patchify

MEMBERS = ("pth", "pickle", "json")
NUMPY_FLOATS = (np.float16, np.float32, np.float64)  # the ones torch.from_numpy takes
MAX_STORAGE_RATIO = 2  # stored bytes / tensor bytes beyond which a tensor is a view of a larger one
SIZE_KEYS = (("height", "width"), ("image_height", "image_width"))  # pixel sizes the metadata may give


@dataclass(frozen=True)
class LatentFormat:
    """What a sample must look like for this model."""

    patch_size: int
    temporal_patch_size: int
    latent_channels: int
    text_embed_dim: int
    max_text_length: int = 512
    """Rows a text embedding may have (``--max-text-length``); longer ones are skipped as ``text_oversize``."""
    fps_conditioning: bool = False
    """``--fps-conditioning``: a video's fps must then be a finite positive number."""
    num_classes: int | None = None
    """Classes of a class-conditioned run (``--conditioning class``): every sample needs a label in
    ``[0, num_classes)``. None: a text-conditioned run, which ignores labels."""


@edataclass
class DiffusionSample(Sample):
    """A cooked sample: cheap to hold in the packing buffer (lengths + raw payloads)."""

    shard: str
    read_index: int  # place in the loader's read order (energon's sample index of the cooker): the report's stream
    latent_payload: bytes  # the .pth member, decoded only after packing
    text: torch.Tensor  # [L, D] text embedding in its stored dtype, checked
    latent_shape: tuple[int, int, int, int]  # [C, T, H, W] from the tensor header
    grid: tuple[int, int, int]  # (T', H', W') in patches
    seq_len: int  # real latent tokens = T' * H' * W'
    padded_len: int  # seq_len rounded up to the layout's multiple (or --max-seq-length without packing)
    metadata: dict[str, Any]


@edataclass
class EncodedSample(Sample):
    """A decoded sample, ready to be concatenated into a pack."""

    tokens: torch.Tensor  # [seq_len, pt*ph*pw*C] float32
    positions: torch.Tensor  # [seq_len, 3] int64 (t, h, w)
    text: torch.Tensor  # [L, D] float32
    seq_len: int
    padded_len: int
    grid: tuple[int, int, int]
    read_index: int  # as in the DiffusionSample
    fps: float | None  # from the metadata (videos)
    label: int | None  # from the metadata under class conditioning; None in text-conditioned runs


@edataclass
class SkippedSample(Sample):
    """A marker that takes a broken (or oversize) sample's place so that its skip is counted once."""

    kind: SkipKind
    shard: str
    detail: str
    tokens: int = 0  # its padded length where the cooker knew it (an oversize sample), else 0

    def record(self) -> SkipRecord:
        return SkipRecord(self.kind.value, self.__key__, self.shard, self.detail)


def sample_key(crude: dict) -> str:
    """A key unique across the dataset (shards may reuse member names): ``SHARD/NAME``."""
    return f"{crude.get('__shard__', '')}/{crude['__key__']}"


def _load_metadata(payload: bytes) -> dict[str, Any]:
    try:
        metadata = json.loads(payload)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; nesting deeper than Python's stack
        raise BadSample(SkipKind.INVALID_JSON, f"not JSON ({type(e).__name__})") from None
    if not isinstance(metadata, dict) or "caption" not in metadata:
        raise BadSample(SkipKind.INVALID_JSON, "not a JSON object with a 'caption'")
    for key, kind in (("fps", (int, float)), ("label", int)):  # the keys the model conditions on
        if metadata.get(key) is not None and (not isinstance(metadata[key], kind) or isinstance(metadata[key], bool)):
            raise BadSample(SkipKind.INVALID_JSON, f"'{key}' is {metadata[key]!r}, not a number")
    return metadata


def _check_metadata(metadata: dict[str, Any], shape: tuple[int, int, int, int], fps_conditioning: bool) -> None:
    """The metadata that describes the latent must be able to: an encoder never makes more frames or
    pixels than it was given. Pixel sizes are not checked against one compression ratio, because
    datasets prepared elsewhere often record the size before resizing and cropping."""
    fps = metadata.get("fps")
    if fps_conditioning and fps is not None and not 0 < fps < math.inf:
        raise BadSample(SkipKind.BAD_METADATA, f"fps {fps} is not a finite positive number (--fps-conditioning is on)")
    limits = [("num_frames", shape[1])] + [(key, side) for keys in SIZE_KEYS for key, side in zip(keys, shape[2:])]
    for key, side in limits:
        value = metadata.get(key)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not side <= value < math.inf:
            raise BadSample(SkipKind.BAD_METADATA, f"'{key}' is {value!r}, which cannot give a latent of shape {shape}")


def _load_tensor(payload: bytes, map_location: str) -> Any:
    try:
        return torch.load(io.BytesIO(payload), weights_only=True, map_location=map_location)
    except Exception as e:  # truncated zip, garbage bytes, a pickled non-tensor object
        raise BadSample(SkipKind.CORRUPT_MEMBER, f".pth does not load ({type(e).__name__})") from None


def _check_dense(member: str, t: torch.Tensor) -> None:
    """A dense float tensor whose storage holds about as many bytes as the tensor itself."""
    kind = SkipKind.NOT_A_LATENT if member == ".pth" else SkipKind.BAD_TEXT_EMBEDDING
    if t.layout != torch.strided or t.is_quantized or not t.dtype.is_floating_point:
        raise BadSample(kind, f"{member} holds a {t.layout} {t.dtype} tensor, not a dense float one")
    stored, shown = t.untyped_storage().nbytes(), t.numel() * t.element_size()
    if stored > MAX_STORAGE_RATIO * max(shown, 1):
        raise BadSample(SkipKind.OVERSIZED_STORAGE, f"{member} stores {stored} bytes for a tensor of {shown} "
                                                    "(a view of a larger tensor: save it with .clone())")


def _latent_shape(header: Any, fmt: LatentFormat) -> tuple[int, int, int, int]:
    if not isinstance(header, torch.Tensor):
        raise BadSample(SkipKind.NOT_A_LATENT, f".pth holds a {type(header).__name__}, not a tensor")
    _check_dense(".pth", header)
    try:
        shape = tuple(as_video(header).shape)
    except ValueError:
        raise BadSample(SkipKind.NOT_A_LATENT, f".pth has shape {tuple(header.shape)}, not [C, T, H, W] or [C, H, W]") from None
    if min(shape) == 0:  # 0 tokens: its per-sample loss would be 0/0 = NaN
        raise BadSample(SkipKind.NOT_A_LATENT, f".pth has shape {tuple(header.shape)}, with a side of size 0")
    if shape[0] != fmt.latent_channels:
        raise BadSample(SkipKind.NOT_A_LATENT, f"{shape[0]} latent channels, expected --latent-channels {fmt.latent_channels}",
                        "--latent-channels", shape[0])
    return shape


def _text_embedding(payload: bytes, fmt: LatentFormat) -> torch.Tensor:
    """The checked ``[L, D]`` text embedding, in its stored dtype."""
    try:
        value = safe_pickle.loads(payload)
    except safe_pickle.UnsafePickle as e:
        raise BadSample(SkipKind.UNSAFE_PICKLE, f".pickle calls {e.name}, which array data never needs; not run") from None
    except Exception as e:  # truncated or garbage pickle
        raise BadSample(SkipKind.CORRUPT_MEMBER, f".pickle does not load ({type(e).__name__})") from None
    if isinstance(value, np.ndarray) and value.dtype in NUMPY_FLOATS:
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise BadSample(SkipKind.BAD_TEXT_EMBEDDING,
                        f".pickle holds a {type(value).__name__} {getattr(value, 'dtype', '')}, not a float array")
    _check_dense(".pickle", value)
    if value.dim() != 2 or value.shape[0] == 0 or value.shape[1] != fmt.text_embed_dim:
        raise BadSample(SkipKind.BAD_TEXT_EMBEDDING, f"text embedding of shape {tuple(value.shape)}, expected "
                        f"[L >= 1, --text-embed-dim {fmt.text_embed_dim}]",
                        "--text-embed-dim" if value.dim() == 2 and value.shape[0] else None, value.shape[-1])
    if value.shape[0] > fmt.max_text_length:
        raise BadSample(SkipKind.TEXT_OVERSIZE, f"text embedding of {value.shape[0]} rows > --max-text-length "
                        f"{fmt.max_text_length}", "--max-text-length", value.shape[0])
    _finite("text embedding", value)
    return value


@dataclass(frozen=True)
class Header:
    """What the cooker learns from a crude sample without decoding its latent."""

    shape: tuple[int, int, int, int]  # [C, T, H, W]
    grid: tuple[int, int, int]  # (T', H', W') in patches
    metadata: dict[str, Any]
    text: torch.Tensor  # [L, D] as stored


def read_header(crude: dict, fmt: LatentFormat) -> Header:
    """Check a crude sample as far as possible without reading its latent's data."""
    if UNREADABLE in crude:  # its tar bytes did not read (see data.shard_reads)
        raise BadSample(SkipKind.CORRUPT_SHARD, crude[UNREADABLE])
    missing = [ext for ext in MEMBERS if ext not in crude]
    if missing:
        raise BadSample(SkipKind.MISSING_MEMBER, "no ." + ", .".join(missing))
    metadata = _load_metadata(crude["json"])
    shape = _latent_shape(_load_tensor(crude["pth"], "meta"), fmt)
    try:
        grid = grid_size(shape, fmt.patch_size, fmt.temporal_patch_size)
    except ValueError as e:
        flag = "--temporal-patch-size" if shape[1] % fmt.temporal_patch_size else "--patch-size"
        raise BadSample(SkipKind.GRID_NOT_DIVISIBLE, str(e), flag) from None
    _check_metadata(metadata, shape, fmt.fps_conditioning)
    if fmt.num_classes is not None:
        _check_label(metadata.get("label"), fmt.num_classes)
    return Header(shape, grid, metadata, _text_embedding(crude["pickle"], fmt))


def _check_label(label: int | None, num_classes: int) -> None:
    if label is None:
        raise BadSample(SkipKind.BAD_LABEL, "no 'label' in the .json of a class-conditioned run", "--conditioning")
    if not 0 <= label < num_classes:
        raise BadSample(SkipKind.BAD_LABEL, f"label {label} outside [0, --num-classes {num_classes})",
                        "--num-classes" if label >= num_classes else None, label + 1)


def _finite(name: str, t: torch.Tensor) -> None:
    # A NaN or Inf anywhere makes the float64 sum non-finite; finite float32 values cannot overflow
    # it. 5x faster than isfinite(t).all(), which allocates a mask.
    if not torch.isfinite(t.sum(dtype=torch.float64)):
        raise BadSample(SkipKind.NON_FINITE, f"NaN or Inf in the {name}")


def decode(sample: DiffusionSample, fmt: LatentFormat) -> EncodedSample:
    """Decode, check and patchify one cooked sample."""
    latent = as_video(_load_tensor(sample.latent_payload, "cpu")).float()  # [C, T, H, W], wherever it was saved
    _finite("latent", latent)
    tokens, positions = patchify(latent, fmt.patch_size, fmt.temporal_patch_size)
    fps = sample.metadata.get("fps")
    return EncodedSample.derive_from(
        sample, tokens=tokens, positions=positions, text=sample.text.float(), seq_len=sample.seq_len,
        padded_len=sample.padded_len, grid=sample.grid, read_index=sample.read_index, fps=None if fps is None else float(fps),
        label=None if fmt.num_classes is None else int(sample.metadata["label"]))  # checked by read_header
