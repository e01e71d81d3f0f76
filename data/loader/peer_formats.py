"""The datasets NeMo's, DFM's and Megatron-Bridge's preparation scripts write, read as they are.

Their writers differ from this recipe's format in small ways that their own readers absorb:

- NeMo ``prepare_energon_dataset.py``: members ``KEY..pth`` (sample dict keys ``".pth"``); latent
  ``[1, C, T, H, W]``; text ``[1, 512, D]`` zero-padded; no caption.
- DFM DiT ``prepare_energon_dataset_butterfly.py``: as NeMo's with plain member names; json ``image_height: 1``
  (read after a rearrange).
- DFM / Megatron-Bridge Wan ``prepare_dataset_wan.py``: fp16 text ``[226, D]`` zero-padded; no fps.
- DFM / Megatron-Bridge Flux ``prepare_energon_dataset_flux.py``: ``.pickle`` a dict
  ``{prompt_embeds, pooled_prompt_embeds}``; T5 padding rows not zero.

:class:`Notes` collects what was normalised in one sample (the names of :data:`NORMALISATIONS`) and
:func:`recognise` names its writer; both travel with the sample and are counted in the pack.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

NORMALISATIONS = {
    "doubled_dot_member_names": "members named KEY..pth (webdataset's writer given keys '.pth') read as KEY.pth",
    "latent_batch_dim_squeezed": "a leading batch dimension of size 1 squeezed from the latent",
    "text_batch_dim_squeezed": "a leading batch dimension of size 1 squeezed from the text embedding",
    "text_from_dict": "the text embedding read from the entry of a .pickle dict; its other entries are ignored",
    "text_converted_to_float32": "a float64, float128 or big-endian text embedding converted to float32",
    "text_zero_padding_trimmed": "trailing all-zero rows (padding) dropped from the text embedding",
    "text_padding_not_zero": "a text embedding of a writer's fixed length whose last row is not zero: padding that "
    "is not zeros (Flux's T5 outputs) cannot be told from text, so every row is kept",
    "no_caption": "no caption in the .json (training never reads it)",
    "sizes_contradict_latent": "size fields of the .json contradict the latent; the latent's shape is used",
}
WARNINGS = frozenset({"text_from_dict", "text_padding_not_zero", "sizes_contradict_latent"})
"""The normalisations a run says once, with a count (the others are what the writers mean)."""

FIXED_TEXT_LENGTHS = (77, 226, 256, 512)  # writers' max_sequence_length defaults: CLIP, Wan (umT5), T5 variants

FORMATS = ("this recipe's", "NeMo DiT", "DFM DiT", "Wan", "Flux")


@dataclass
class Notes:
    """The normalisations applied to one sample, each with the detail of this sample."""

    applied: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, detail: str = "") -> None:
        self.applied.setdefault(name, detail)


def members(crude: dict, exts: tuple[str, ...], notes: Notes) -> dict[str, bytes]:
    """The sample's members by extension; NeMo's ``KEY..pth`` arrive as extension ``.pth``."""
    found = {}
    for ext in exts:
        if ext in crude:
            found[ext] = crude[ext]
        elif "." + ext in crude:
            found[ext] = crude["." + ext]
            notes.add("doubled_dot_member_names", f"member '{crude['__key__']}..{ext}'")
    return found


def squeeze_batch(t: torch.Tensor, rank: int, name: str, notes: Notes) -> torch.Tensor:
    """``t`` without leading dimensions of size 1 beyond ``rank`` (a writer's batch of one)."""
    shape = tuple(t.shape)
    while t.dim() > rank and t.shape[0] == 1:
        t = t[0]
    if t.dim() != len(shape):
        notes.add(f"{name}_batch_dim_squeezed", f"{list(shape)} -> {list(t.shape)}")
    return t


def text_from_dict(value: dict, key: str, notes: Notes) -> object:
    """The text embedding entry ``key`` of a dict pickle (Flux: ``prompt_embeds``)."""
    if key not in value:
        raise KeyError(key)
    others = sorted(str(k) for k in value if k != key)
    notes.add("text_from_dict", f"'{key}' read" + (f", {', '.join(others)} ignored" if others else ""))
    return value[key]


def trim_zero_rows(text: torch.Tensor, notes: Notes) -> torch.Tensor:
    """``text`` ``[L, D]`` without its trailing all-zero rows (at least one row is kept), as a copy of its
    own: a view would keep the padded storage alive in the packing buffer."""
    nonzero = text.ne(0).any(dim=1).nonzero()  # [n, 1]
    length = int(nonzero[-1, 0]) + 1 if len(nonzero) else 1
    if length < text.shape[0]:
        notes.add("text_zero_padding_trimmed", f"{text.shape[0]} -> {length} rows")
        return text[:length].clone()
    if text.shape[0] in FIXED_TEXT_LENGTHS:
        notes.add("text_padding_not_zero", f"{text.shape[0]} rows, the last one not zero")
    return text


def recognise(notes: Notes, metadata: dict) -> str:
    """The writer of a sample, from what it needed (one of :data:`FORMATS`)."""
    applied = notes.applied
    if "doubled_dot_member_names" in applied:
        return "NeMo DiT"
    if "text_from_dict" in applied:
        return "Flux"
    if str(metadata.get("model_version", "")).startswith("wan"):
        return "Wan"
    if "latent_batch_dim_squeezed" in applied and "no_caption" in applied:
        return "DFM DiT"
    return "this recipe's"
