"""One sample of the on-disk format, in its two in-memory forms, and the checks that reject bad ones.

energon hands the cooker a crude sample of raw bytes: ``.pth`` latent ``[C, T, H, W]`` or
``[C, H, W]`` (any float dtype), ``.pickle`` text embedding ``[L, D]`` (numpy or torch) and
``.json`` metadata (an object; keys kept as they are). The peers' variants of it (a batch
dimension of one, a dict pickle, zero-padded text, ``KEY..pth`` names) are read as their readers
read them, and noted (:mod:`data.loader.peer_formats`).

- :func:`read_header` makes a :class:`DiffusionSample`: the lengths come from the tensor header
  (a meta-device load reads no tensor data) and the latent stays raw bytes; the text embedding is
  unpickled (by :mod:`dit.safe_pickle`, which runs nothing) and checked here, kept in its stored
  dtype: as many bytes as its payload, so a packing buffer of hundreds of samples still costs only
  their on-disk size, and a text defect is found before it takes room in a pack.
  Every problem of a sample is found, not only the first (``--validate-only`` lists them).
- :func:`decode` runs after packing, on the samples of one pack: it decodes the latent, checks its
  values and patchifies into an :class:`EncodedSample`.

Both raise :class:`~data.loader.bad_data.BadSample` naming the defect. Nothing may cost much more memory
than its declared shape: a tensor stored with more than :data:`MAX_STORAGE_RATIO` times its own
bytes is skipped before its data is loaded, and shapes are checked before any conversion.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from megatron.energon import Sample
from megatron.energon.edataclass import edataclass

from data.loader import peer_formats
from data.loader.bad_data import BadSample, SkipKind, SkipRecord
from data.loader.peer_formats import Notes
from data.loader.shard_reads import TOO_LARGE, UNREADABLE
from dit import safe_pickle
from dit.model.patchify import as_video, grid_size, patchify

MEMBERS = ("pth", "pickle", "json")
NUMPY_KEPT = (np.dtype(np.float16), np.dtype(np.float32))  # numpy text kept as stored; other floats -> float32
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
    text_padding: str = "trim-zeros"
    """``--text-padding``: ``trim-zeros`` drops a text embedding's trailing all-zero rows (a writer's padding),
    ``keep`` trains on every row (a model trained on padded text, as Wan is)."""
    text_embedding_key: str = "prompt_embeds"
    """``--text-embedding-key``: the entry of a dict ``.pickle`` that holds the text embedding (Flux's writer)."""


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
    format: str  # the writer recognised (data.loader.peer_formats.FORMATS)
    notes: dict[str, str]  # normalisations applied: name -> this sample's detail


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
    format: str  # as in the DiffusionSample
    notes: dict[str, str]  # as in the DiffusionSample


@edataclass
class SkippedSample(Sample):
    """A marker that takes a broken (or oversize) sample's place so that its skip is counted once."""

    kind: SkipKind
    shard: str
    detail: str
    tokens: int = 0  # its padded length where the cooker knew it (an oversize sample), else 0
    read_index: int = 0  # as in the DiffusionSample

    def record(self) -> SkipRecord:
        return SkipRecord(self.kind.value, self.__key__, self.shard, self.detail)


def sample_key(crude: dict) -> str:
    """A key unique across the dataset (shards may reuse member names): ``SHARD/NAME``."""
    return f"{crude.get('__shard__', '')}/{crude['__key__']}"


def _load_metadata(payload: bytes, notes: Notes) -> dict[str, Any]:
    try:
        metadata = json.loads(payload)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; nesting deeper than Python's stack
        raise BadSample(SkipKind.INVALID_JSON, f"not JSON ({type(e).__name__})") from None
    if not isinstance(metadata, dict):
        raise BadSample(SkipKind.INVALID_JSON, f"not a JSON object but a {type(metadata).__name__}")
    if "caption" not in metadata:
        notes.add("no_caption", f"keys {sorted(metadata)[:6]}")
    for key, kind in (("fps", (int, float)), ("label", int)):  # the keys the model conditions on
        if metadata.get(key) is not None and (not isinstance(metadata[key], kind) or isinstance(metadata[key], bool)):
            raise BadSample(SkipKind.INVALID_JSON, f"'{key}' is {metadata[key]!r}, not a number")
    return metadata


def _check_fps(metadata: dict[str, Any], shape: tuple[int, int, int, int]) -> None:
    """Under ``--fps-conditioning`` a video (more than one latent frame) needs a finite positive fps."""
    fps = metadata.get("fps")
    if fps is None and shape[1] > 1:
        raise BadSample(
            SkipKind.MISSING_FPS,
            f"a video of {shape[1]} latent frames without 'fps' in its .json (--fps-conditioning is on)",
            "--fps-conditioning",
        )
    if fps is not None and not 0 < fps < math.inf:
        raise BadSample(SkipKind.BAD_METADATA, f"fps {fps} is not a finite positive number (--fps-conditioning is on)")


def _note_contradictions(metadata: dict[str, Any], shape: tuple[int, int, int, int], notes: Notes) -> None:
    """Sizes in the metadata that no encoder could have turned into this latent (fewer frames or pixels
    than it has; DFM's ``image_height: 1``) are noted, not trusted: the latent's shape is the truth.
    Pixel sizes are not checked against one compression ratio, because datasets prepared elsewhere
    often record the size before resizing and cropping."""
    limits = [("num_frames", shape[1])] + [(key, side) for keys in SIZE_KEYS for key, side in zip(keys, shape[2:])]
    for key, side in limits:
        value = metadata.get(key)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not side <= value < math.inf:
            notes.add("sizes_contradict_latent", f"'{key}' is {value!r} for a latent of shape {list(shape)}")


def _load_tensor(payload: bytes, map_location: str) -> Any:
    try:
        return safe_pickle.torch_load(payload, map_location)
    except safe_pickle.DeclaredTooLarge as e:
        raise BadSample(
            SkipKind.OVERSIZED_STORAGE, f".pth: {e}, so it is compressed: not torch.save's writing"
        ) from None
    except Exception as e:  # truncated zip, garbage bytes, a pickled non-tensor object
        raise BadSample(SkipKind.CORRUPT_MEMBER, f".pth does not load ({type(e).__name__})") from None


def _check_dense(member: str, t: torch.Tensor) -> None:
    """A dense float tensor whose storage holds about as many bytes as the tensor itself."""
    kind = SkipKind.NOT_A_LATENT if member == ".pth" else SkipKind.BAD_TEXT_EMBEDDING
    if t.layout != torch.strided or t.is_quantized or not t.dtype.is_floating_point:
        raise BadSample(kind, f"{member} holds a {t.layout} {t.dtype} tensor, not a dense float one")
    stored, shown = t.untyped_storage().nbytes(), t.numel() * t.element_size()
    if stored > MAX_STORAGE_RATIO * max(shown, 1):
        raise BadSample(
            SkipKind.OVERSIZED_STORAGE,
            f"{member} stores {stored} bytes for a tensor of {shown} "
            "(a view of a larger tensor: save it with .clone())",
        )


def _latent_shape(payload: bytes, fmt: LatentFormat, notes: Notes) -> tuple[int, int, int, int]:
    header = _load_tensor(payload, "meta")  # shapes only: no tensor data is read
    if not isinstance(header, torch.Tensor):
        raise BadSample(SkipKind.NOT_A_LATENT, f".pth holds a {type(header).__name__}, not a tensor")
    _check_dense(".pth", header)
    try:
        shape = cast(
            "tuple[int, int, int, int]", tuple(as_video(peer_formats.squeeze_batch(header, 4, "latent", notes)).shape)
        )
    except ValueError:
        raise BadSample(
            SkipKind.NOT_A_LATENT, f".pth has shape {tuple(header.shape)}, not [C, T, H, W] or [C, H, W]"
        ) from None
    if min(shape) == 0:  # 0 tokens: its per-sample loss would be 0/0 = NaN
        raise BadSample(SkipKind.NOT_A_LATENT, f".pth has shape {tuple(header.shape)}, with a side of size 0")
    if shape[0] != fmt.latent_channels:
        raise BadSample(
            SkipKind.NOT_A_LATENT,
            f"{shape[0]} latent channels, expected --latent-channels {fmt.latent_channels}",
            "--latent-channels",
            shape[0],
        )
    return shape


def _unpickle(payload: bytes) -> Any:
    try:
        return safe_pickle.loads(payload)
    except safe_pickle.UnsafePickle as e:
        raise BadSample(
            SkipKind.UNSAFE_PICKLE, f".pickle calls {e.name}, which array data never needs; not run"
        ) from None
    except safe_pickle.DeclaredTooLarge as e:
        raise BadSample(SkipKind.OVERSIZED_STORAGE, f".pickle: a tensor storage of which {e}") from None
    except Exception as e:  # truncated or garbage pickle
        raise BadSample(SkipKind.CORRUPT_MEMBER, f".pickle does not load ({type(e).__name__})") from None


def _as_tensor(value: Any, fmt: LatentFormat, notes: Notes) -> torch.Tensor:
    """A dict's text entry, a numpy float array of any byte order and width, or a tensor, as a tensor:
    float16 / bfloat16 / float32 kept as stored, wider or foreign ones in float32."""
    if isinstance(value, dict):
        try:
            value = peer_formats.text_from_dict(value, fmt.text_embedding_key, notes)
        except KeyError:
            raise BadSample(
                SkipKind.BAD_TEXT_EMBEDDING,
                f".pickle holds a dict of {sorted(map(str, value))[:8]}, none of "
                f"them --text-embedding-key {fmt.text_embedding_key!r}",
                "--text-embedding-key",
            ) from None
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        if value.dtype not in NUMPY_KEPT:  # float64, float128, big-endian: values beyond float32's become Inf here
            notes.add("text_converted_to_float32", f"from numpy {value.dtype.str}")
            with np.errstate(over="ignore"):  # counted as non_finite below
                value = value.astype(np.float32)
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise BadSample(
            SkipKind.BAD_TEXT_EMBEDDING,
            f".pickle holds a {type(value).__name__} {getattr(value, 'dtype', '')}, not a float array",
        )
    _check_dense(".pickle", value)
    if value.dtype == torch.float64:
        notes.add("text_converted_to_float32", "from torch.float64")
        value = value.float()
    return value.detach()  # saved with requires_grad: a worker could not send it


def _text_embedding(payload: bytes, fmt: LatentFormat, notes: Notes) -> torch.Tensor:
    """The checked ``[L, D]`` text embedding, in its stored dtype (float32 for wider ones), its zero padding
    trimmed under ``--text-padding trim-zeros``."""
    value = peer_formats.squeeze_batch(_as_tensor(_unpickle(payload), fmt, notes), 2, "text", notes)
    if value.dim() != 2 or value.shape[0] == 0 or value.shape[1] != fmt.text_embed_dim:
        raise BadSample(
            SkipKind.BAD_TEXT_EMBEDDING,
            f"text embedding of shape {tuple(value.shape)}, expected [L >= 1, --text-embed-dim {fmt.text_embed_dim}]",
            "--text-embed-dim" if value.dim() == 2 and value.shape[0] else None,
            value.shape[-1],
        )
    _finite("text embedding", value)  # after any conversion to float32: a float64 beyond its range is Inf now
    if fmt.text_padding == "trim-zeros":
        value = peer_formats.trim_zero_rows(value, notes)
    if value.shape[0] > fmt.max_text_length:
        raise BadSample(
            SkipKind.TEXT_OVERSIZE,
            f"text embedding of {value.shape[0]} rows > --max-text-length {fmt.max_text_length}",
            "--max-text-length",
            value.shape[0],
        )
    return value


@dataclass(frozen=True)
class Header:
    """What the cooker learns from a crude sample without decoding its latent."""

    shape: tuple[int, int, int, int]  # [C, T, H, W]
    grid: tuple[int, int, int]  # (T', H', W') in patches
    metadata: dict[str, Any]
    text: torch.Tensor  # [L, D] as stored
    latent_payload: bytes  # the .pth member, as stored
    format: str  # the writer recognised
    notes: dict[str, str]  # normalisations applied


class _Problems:
    """Every defect of one sample: each check runs on what the checks before it could read."""

    def __init__(self) -> None:
        self.found: list[BadSample] = []

    def attempt(self, check: Any, *args: Any) -> Any:
        """``check(*args)``, or None with its defect kept."""
        try:
            return check(*args)
        except BadSample as e:
            self.found.append(e)
            return None

    def raise_any(self) -> None:
        """Raise the first defect, carrying the others in ``also``."""
        if self.found:
            first, *others = self.found
            first.also = others
            raise first


def _grid(shape: tuple[int, int, int, int], fmt: LatentFormat) -> tuple[int, int, int]:
    try:
        return grid_size(shape, fmt.patch_size, fmt.temporal_patch_size)
    except ValueError as e:
        flag = "--temporal-patch-size" if shape[1] % fmt.temporal_patch_size else "--patch-size"
        raise BadSample(SkipKind.GRID_NOT_DIVISIBLE, str(e), flag) from None


def _members(crude: dict, notes: Notes) -> dict[str, bytes]:
    found = peer_formats.members(crude, MEMBERS, notes)
    missing = [ext for ext in MEMBERS if ext not in found]
    if missing:
        present = sorted(k for k in crude if not k.startswith("__"))
        raise BadSample(
            SkipKind.MISSING_MEMBER,
            "no ."
            + ", .".join(missing)
            + "; found "
            + (", ".join(f"{crude['__key__']}.{ext}" for ext in present) or "no other member"),
        )
    return found


def read_header(crude: dict, fmt: LatentFormat) -> Header:
    """Check a crude sample as far as possible without reading its latent's data; raise its first defect
    with the others in ``also``."""
    if UNREADABLE in crude:  # its tar bytes did not read (see data.loader.shard_reads)
        raise BadSample(SkipKind.CORRUPT_SHARD, crude[UNREADABLE])
    if TOO_LARGE in crude:
        raise BadSample(SkipKind.MEMBER_TOO_LARGE, crude[TOO_LARGE])
    notes, problems = Notes(), _Problems()
    files = problems.attempt(_members, crude, notes) or peer_formats.members(crude, MEMBERS, Notes())
    metadata = problems.attempt(_load_metadata, files["json"], notes) if "json" in files else None
    shape = problems.attempt(_latent_shape, files["pth"], fmt, notes) if "pth" in files else None
    text = problems.attempt(_text_embedding, files["pickle"], fmt, notes) if "pickle" in files else None
    grid = problems.attempt(_grid, shape, fmt) if shape else None
    if metadata is not None and shape is not None:
        _note_contradictions(metadata, shape, notes)
        if fmt.fps_conditioning:
            problems.attempt(_check_fps, metadata, shape)
    if metadata is not None and fmt.num_classes is not None:
        problems.attempt(_check_label, metadata.get("label"), fmt.num_classes)
    problems.raise_any()
    # raise_any raised if a member was missing or a check failed: every part is here
    assert shape is not None and grid is not None and metadata is not None and text is not None
    return Header(shape, grid, metadata, text, files["pth"], peer_formats.recognise(notes, metadata), notes.applied)


def _check_label(label: int | None, num_classes: int) -> None:
    if label is None:
        raise BadSample(SkipKind.BAD_LABEL, "no 'label' in the .json of a class-conditioned run", "--conditioning")
    if not 0 <= label < num_classes:
        raise BadSample(
            SkipKind.BAD_LABEL,
            f"label {label} outside [0, --num-classes {num_classes})",
            "--num-classes" if label >= num_classes else None,
            label + 1,
        )


def _finite(name: str, t: torch.Tensor) -> None:
    # A NaN or Inf anywhere makes the float64 sum non-finite; finite float32 values cannot overflow
    # it. 5x faster than isfinite(t).all(), which allocates a mask.
    if not torch.isfinite(t.sum(dtype=torch.float64)):
        raise BadSample(SkipKind.NON_FINITE, f"NaN or Inf in the {name}")


def decode(sample: DiffusionSample, fmt: LatentFormat) -> EncodedSample:
    """Decode, check and patchify one cooked sample."""
    latent = peer_formats.squeeze_batch(_load_tensor(sample.latent_payload, "cpu"), 4, "latent", Notes())
    latent = as_video(latent).float()  # [C, T, H, W], wherever it was saved
    _finite("latent", latent)
    tokens, positions = patchify(latent, fmt.patch_size, fmt.temporal_patch_size)
    fps = sample.metadata.get("fps")
    return EncodedSample.derive_from(
        sample,
        tokens=tokens,
        positions=positions,
        text=sample.text.float(),
        seq_len=sample.seq_len,
        padded_len=sample.padded_len,
        grid=sample.grid,
        read_index=sample.read_index,
        fps=None if fps is None else float(fps),
        label=None if fmt.num_classes is None else int(sample.metadata["label"]),  # checked by read_header
        format=sample.format,
        notes=sample.notes,
    )
