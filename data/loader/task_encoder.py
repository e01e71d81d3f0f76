"""The energon task encoder: crude sample -> cheap DiffusionSample -> packs of decoded samples.

energon's order with a packing buffer (``get_train_dataset(..., packing_buffer_size=N)``):

1. :meth:`DiTTaskEncoder.cook` on each crude sample (no decoding, see :mod:`data.loader.sample`);
2. :meth:`select_samples_to_pack` on a full buffer: first-fit-decreasing into packs;
3. :meth:`postencode_sample` on each sample of one chosen pack: decode and check;
4. :meth:`pack_selected_samples`: concatenate into a :class:`PackedBatch`.

Without packing, step 2 is gone and :meth:`batch` pads each sample to ``max_seq_length`` and
concatenates a micro-batch of them. Broken samples become :class:`SkippedSample` markers at
whichever step finds them; they travel in the pack and are counted there (:class:`LoadedPack`),
never raised to energon: any exception while cooking or decoding ONE sample, foreseen or not, is
that sample's counted skip (``sample_error`` with the exception's one-line message where no check
named it), so energon's fatal error for failures in a row never ends a run. A defect found only
by decoding the latent (NaN/Inf) leaves its room in the pack unused: bad data is rare, and
checking values before packing would decode every latent twice or hold its tensor in the buffer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from megatron.energon import Cooker, DefaultTaskEncoder, Sample, WorkerConfig, stateless
from megatron.energon.edataclass import edataclass
from megatron.energon.task_encoder.cooking import basic_sample_keys

from data.loader.bad_data import BadSample, DataStats, SkipKind
from data.loader.packing import build_pack, first_fit_decreasing, padded_length
from data.loader.sample import (
    DiffusionSample,
    EncodedSample,
    LatentFormat,
    SkippedSample,
    decode,
    read_header,
    sample_key,
)
from data.loader.shard_reads import tolerate_unreadable_shards
from dit.errors import one_line
from dit.model.packed import PackedBatch

AnySample = DiffusionSample | EncodedSample | SkippedSample


@edataclass
class LoadedPack(Sample):
    """What a loader worker yields: the pack (None when all its samples were skipped) and its counts."""

    batch: PackedBatch | None
    stats: DataStats
    read_indices: list[int]  # each sample's place in the loader's read order, in the batch's order
    skipped_read_indices: list[int]  # the same of the samples skipped


class DiTTaskEncoder(DefaultTaskEncoder):
    """Cooks, packs and encodes DiT samples; ``pad_multiple`` comes from the run's parallel layout."""

    decoder = None  # the cooker gets raw bytes: decoding waits until a sample is in a chosen pack

    def __init__(self, fmt: LatentFormat, *, max_seq_length: int, pad_multiple: int, packing: bool = True):
        super().__init__()
        if not packing and max_seq_length % pad_multiple:
            raise ValueError(
                f"max_seq_length {max_seq_length} is not a multiple of the layout's padding multiple {pad_multiple}"
            )
        self.fmt = fmt
        self.max_seq_length = max_seq_length
        self.pad_multiple = pad_multiple
        self.packing = packing
        self.cookers = [Cooker(self.cook)]

    def build_cook_crude_sample(self, dataset: Any, **kwargs: Any) -> Any:
        """energon's cooking step, over tar readers that turn a shard's read errors into samples the
        cooker counts as ``corrupt_shard`` (energon would raise them below its error handlers)."""
        tolerate_unreadable_shards(dataset)
        return super().build_cook_crude_sample(dataset, **kwargs)

    def cooked(self, crude: dict) -> DiffusionSample:
        """The cooked sample, or :class:`BadSample` naming why it cannot train (the launch check uses it too)."""
        header = read_header(crude, self.fmt)
        seq_len = header.grid[0] * header.grid[1] * header.grid[2]
        padded = padded_length(seq_len, self.pad_multiple) if self.packing else self.max_seq_length
        if max(seq_len, padded) > self.max_seq_length:
            raise BadSample(
                SkipKind.OVERSIZE,
                f"{seq_len} tokens ({padded} padded) > --max-seq-length {self.max_seq_length}",
                "--max-seq-length",
                max(seq_len, padded),
            )
        return DiffusionSample(
            **_base(crude),
            shard=crude.get("__shard__", ""),
            read_index=_read_index(),
            latent_payload=header.latent_payload,
            text=header.text,
            latent_shape=header.shape,
            grid=header.grid,
            seq_len=seq_len,
            padded_len=padded,
            metadata=header.metadata,
            format=header.format,
            notes=header.notes,
        )

    @stateless
    def cook(self, crude: dict) -> DiffusionSample | SkippedSample:
        try:
            return self.cooked(crude)
        except Exception as e:  # noqa: BLE001 -- one sample's failure, of any kind, is its own counted skip
            return SkippedSample(
                **_base(crude), shard=crude.get("__shard__", ""), read_index=_read_index(), **_skip_fields(e)
            )

    def select_samples_to_pack(self, samples: list[AnySample]) -> list[list[AnySample]]:
        """First-fit-decreasing over the buffer. energon drops what no group holds, so every sample
        is placed: the skip markers join the first pack, or form a pack of their own."""
        good = [s for s in samples if isinstance(s, DiffusionSample)]
        groups = [[good[i] for i in b] for b in first_fit_decreasing([s.padded_len for s in good], self.max_seq_length)]
        markers = [s for s in samples if isinstance(s, SkippedSample)]
        if markers:
            groups = [groups[0] + markers, *groups[1:]] if groups else [markers]
        return groups

    @stateless
    def postencode_sample(self, sample: AnySample) -> EncodedSample | SkippedSample:
        if isinstance(sample, SkippedSample):
            return sample
        try:
            return decode(sample, self.fmt)
        except Exception as e:  # noqa: BLE001 -- as in cook
            return SkippedSample.derive_from(
                sample, shard=sample.shard, read_index=sample.read_index, **_skip_fields(e)
            )

    @stateless
    def pack_selected_samples(self, samples: list[EncodedSample | SkippedSample]) -> LoadedPack:
        return self._loaded_pack(samples)

    @stateless
    def batch(self, samples: list[EncodedSample | SkippedSample]) -> LoadedPack:
        """Without packing: a micro-batch of samples, each already padded to ``max_seq_length``."""
        return self._loaded_pack(samples)

    def _loaded_pack(self, samples: Sequence[EncodedSample | SkippedSample]) -> LoadedPack:
        encoded = [s for s in samples if isinstance(s, EncodedSample)]
        markers = [s for s in samples if isinstance(s, SkippedSample)]
        stats = DataStats(
            read=len(samples),
            trained=len(encoded),
            skipped=dict(Counter(m.kind.value for m in markers)),
            examples=[m.record() for m in markers],
            longest=max([s.padded_len for s in encoded] + [m.tokens for m in markers]),
            formats=dict(Counter(s.format for s in encoded)),
            normalised=dict(Counter(name for s in encoded for name in s.notes)),
            notes={name: f"{s.__key__}: {detail}" for s in reversed(encoded) for name, detail in s.notes.items()},
        )
        return LoadedPack(
            __key__=",".join(s.__key__ for s in samples),
            __restore_key__=(),
            batch=build_pack(encoded) if encoded else None,
            stats=stats,
            read_indices=[s.read_index for s in encoded],
            skipped_read_indices=[m.read_index for m in markers],
        )


def _base(crude: dict) -> dict[str, Any]:
    """energon's sample keys of a crude sample, with a key unique across the dataset."""
    return {**basic_sample_keys(crude), "__key__": sample_key(crude)}


def _skip_fields(error: Exception) -> dict[str, Any]:
    """A skip marker's kind, detail and tokens for the exception a sample raised."""
    if isinstance(error, BadSample):
        return {
            "kind": error.kind,
            "detail": error.detail,
            "tokens": error.value if error.kind == SkipKind.OVERSIZE else 0,
        }
    return {"kind": SkipKind.SAMPLE_ERROR, "detail": one_line(error), "tokens": 0}


def _read_index() -> int:
    """energon's index of the sample being cooked: (its place in its worker's stream) * workers + worker.
    energon restores it with the sample, so it is the same after a restore; 0 outside a loader."""
    config = WorkerConfig.active_worker_config
    return config.active_worker_sample_index if config is not None else 0
