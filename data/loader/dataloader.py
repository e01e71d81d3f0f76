"""The training loader: energon's savable loader over the task encoder, seen from one rank.

The trainer iterates :class:`DiTDataLoader` for :class:`PackedBatch` es already cut to this rank,
reads ``loader.stats`` at its log interval, and stores ``loader.state_dict()`` in its checkpoint;
a loader restored with :meth:`DiTDataLoader.load_state_dict` yields exactly the next pack.

No silent hang: a loader worker process that dies (killed for memory, a crash in a library) ends
the run with one line (:func:`worker_died`) instead of a traceback, or a wait. When every sample is
skipped (all longer than ``--max-seq-length``, say) energon would keep filling packing buffers forever.
Once this process has read :func:`stall_limit` samples without one it could train, the loader stops
the run with one line naming the likely flag.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

from megatron.energon import SavableDataLoader, get_savable_loader, get_train_dataset, get_val_dataset

from data.loader.bad_data import SIZING, BadDataError, DataStats, SkipKind
from data.loader.rank_split import RankPlace, shard_for_rank
from data.loader.sample import LatentFormat
from data.loader.task_encoder import DiTTaskEncoder, LoadedPack
from dit.errors import ConfigError, one_line
from dit.model.config import DiTConfig
from dit.model.packed import PackedBatch
from dit.training.run_config import DataConfig, RunConfig

STALL_SAMPLES = 1000
"""Samples read with none trainable before the run stops (at least a packing buffer from every worker)."""


def worker_died(error: RuntimeError) -> BadDataError | None:
    """The one line for torch's error about a loader worker process that died, or None for any other error."""
    if "DataLoader worker (pid" not in str(error):
        return None
    return BadDataError(
        f"a data loader worker process died ({one_line(error)}); the run cannot go on without "
        "its samples. The kernel's out-of-memory killer is the usual cause (see dmesg): lower "
        "--num-workers or --packing-buffer-size; python -m data.report DATASET reads the dataset "
        "alone, to find a sample that kills it."
    )


def iterate_packs(loader: SavableDataLoader) -> Generator[LoadedPack, None, None]:
    """energon's packs, a dead worker raised as :func:`worker_died`'s line; closing it stops the workers now."""
    packs = iter(loader)
    try:
        while True:
            try:
                yield next(packs)
            except StopIteration:
                return
            except RuntimeError as e:
                raise worker_died(e) or e from None
    finally:
        packs.close()  # left to garbage collection, each worker takes seconds to stop


def stall_limit(packing_buffer_size: int, num_workers: int) -> int:
    """Samples this process reads, none trainable, before the run stops: a full packing buffer from
    every worker, and never fewer than :data:`STALL_SAMPLES` (a dataset may start with a run of
    long samples it is meant to skip)."""
    return max(STALL_SAMPLES, packing_buffer_size * max(num_workers, 1))


def build_task_encoder(model: DiTConfig, data: DataConfig, pad_multiple: int) -> DiTTaskEncoder:
    """The task encoder for the model's latents and text, the data settings and the layout's padding multiple."""
    fmt = LatentFormat(
        model.patch_size,
        model.temporal_patch_size,
        model.latent_channels,
        model.text_embed_dim,
        max_text_length=data.max_text_length,
        fps_conditioning=model.fps_conditioning,
        num_classes=model.num_classes if model.conditioning == "class" else None,
        text_padding=data.text_padding,
        text_embedding_key=data.text_embedding_key,
    )
    return DiTTaskEncoder(fmt, max_seq_length=data.max_seq_length, pad_multiple=pad_multiple, packing=data.packing)


def energon_loader(
    data_path: str | Path,
    encoder: DiTTaskEncoder,
    layout: RankPlace,
    *,
    num_workers: int,
    seed: int,
    packing_buffer_size: int,
    micro_batch_size: int,
    repeat: bool = True,
    split: str | None = None,
) -> SavableDataLoader:
    """energon's savable loader yielding :class:`LoadedPack` s for this replica: the train split, shuffled
    and repeated, or ``split`` read once in its stored order (validation)."""
    common = dict(
        worker_config=layout.worker_config(num_workers, seed),
        batch_size=None if encoder.packing else micro_batch_size,  # a pack is one micro-batch
        packing_buffer_size=packing_buffer_size if encoder.packing else None,
        task_encoder=encoder,
    )
    if split is not None:
        return get_savable_loader(get_val_dataset(data_path, split_part=split, **common))
    dataset = get_train_dataset(
        data_path,
        **common,
        shuffle_buffer_size=None,  # the packing buffer already mixes samples of many shards
        max_samples_per_sequence=None,
        repeat=repeat,
    )
    return get_savable_loader(dataset)


class DiTDataLoader:
    """Packs for this rank, with the bad-data accounting and limits of the run."""

    def __init__(
        self,
        loader: SavableDataLoader,
        layout: RankPlace,
        *,
        max_bad_sample_fraction: float,
        num_workers: int,
        buffer_size: int,
        reject_oversize: bool = False,
        stall_samples: int = STALL_SAMPLES,
    ):
        self.loader = loader
        self.num_workers = num_workers
        self.buffer_size = buffer_size  # samples a worker reads before its packs come (1 without packing)
        self.layout = layout
        self.max_bad_sample_fraction = max_bad_sample_fraction
        self.reject_oversize = reject_oversize
        self.stall_samples = stall_samples
        self.stats = DataStats()  # over every pack this rank has consumed, restored with the state
        self._here = DataStats()  # over the packs of this process only: the stall check's view
        self._packs: Generator[LoadedPack, None, None] | None = None
        self._furthest: dict[
            int, int
        ] = {}  # loader worker -> samples it has read: to the end of the furthest buffer seen

    def __iter__(self) -> DiTDataLoader:
        return self

    def __next__(self) -> PackedBatch:
        if self._packs is None:
            self._packs = iterate_packs(self.loader)
        while True:
            item = next(self._packs)
            self.stats.add(item.stats)
            self._here.add(item.stats)
            self._note_reads(item)
            self._check(item.stats)
            if item.batch is not None:  # a pack of only skipped samples brings counts, no data
                return shard_for_rank(item.batch, self.layout)

    def _check(self, pack: DataStats) -> None:
        sizing = [e for e in pack.examples if SkipKind(e.kind) in SIZING]
        if self.reject_oversize and sizing:
            raise BadDataError(
                f"--oversize-policy error: {sizing[0].key} has {sizing[0].detail}; raise that flag "
                "or pass --oversize-policy skip"
            )
        self.stats.check(self.max_bad_sample_fraction, read=sum(self._furthest.values()))
        if self._here.trained == 0 and self._here.read >= self.stall_samples:
            raise self._stalled()

    def _note_reads(self, item: LoadedPack) -> None:
        """How far each worker has read. energon fills a worker's packing buffer with the places
        ``[k * B, (k + 1) * B)`` of its read order and packs it whole, and a buffer's skips all come with
        its first pack: judged over the packs' samples alone, a dataset with 0.5% broken samples stopped
        a run at 2 of 157 read. A pack from buffer k means the worker read to its end. Places count from
        the run's start (energon restores them), so repeated samples count as often as they were read."""
        workers = max(self.num_workers, 1)
        for index in (*item.read_indices, *item.skipped_read_indices):
            worker, place = index % workers, index // workers
            end = (place // self.buffer_size + 1) * self.buffer_size
            self._furthest[worker] = max(self._furthest.get(worker, 0), end)

    def _stalled(self) -> ConfigError:
        """The line for a stream in which nothing trains: the flag the skips point at."""
        here = self._here
        kind = max(here.skipped, key=lambda k: here.skipped[k])
        first = next((e for e in here.examples if e.kind == kind), None)
        detail = f" ({first.detail})" if first else ""
        if kind == SkipKind.OVERSIZE.value:
            return ConfigError(
                "--max-seq-length",
                f"none of the {here.read} samples read fits{detail}; the longest "
                f"takes {here.longest} tokens: raise --max-seq-length",
            )
        if kind == SkipKind.TEXT_OVERSIZE.value:
            return ConfigError(
                "--max-text-length",
                f"none of the {here.read} samples read has a text embedding "
                f"that short{detail}: raise --max-text-length",
            )
        return ConfigError(
            "--data-path",
            f"none of the {here.read} samples read can train: {here.describe()}; "
            "python -m data.report DATASET lists them",
        )

    def close(self) -> None:
        """Stop the worker processes now."""
        if self._packs is not None:
            self._packs.close()
            self._packs = None

    def state_dict(self) -> dict[str, Any]:
        """energon's per-rank state and the counts so far (store both in the training checkpoint)."""
        return {"loader": self.loader.save_state_rank(), "stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore before the first ``next``: iteration continues on exactly the next pack."""
        if self._packs is not None:
            raise RuntimeError("restore the loader state before iterating")
        self.loader.restore_state_rank(state["loader"])
        self.stats = DataStats.from_state_dict(state["stats"])


def build_train_loader(run: RunConfig) -> DiTDataLoader:
    """The training loader of a run; Megatron's parallel state must be initialised."""
    data = run.data
    return _build_loader(
        run,
        data.data_path,
        None,
        reject_oversize=data.oversize_policy == "error",
        stall_samples=stall_limit(data.packing_buffer_size, data.num_workers),
    )


def build_valid_loader(run: RunConfig) -> DiTDataLoader:
    """The validation loader: the same packs in the same order every time it is built."""
    assert run.data.validation is not None, "the run has no validation dataset"
    path, split = run.data.validation
    return _build_loader(run, path, split)


def _build_loader(
    run: RunConfig,
    path: str | Path,
    split: str | None,
    reject_oversize: bool = False,
    stall_samples: int = STALL_SAMPLES,
) -> DiTDataLoader:
    """The loader of this rank's replica over ``path`` (its ``split``, or the shuffled train split)."""
    data = run.data
    layout = RankPlace.from_parallel_state(run.model)
    loader = energon_loader(
        path,
        build_task_encoder(run.model, data, layout.pad_multiple),
        layout,
        num_workers=data.num_workers,
        seed=run.training.seed,
        packing_buffer_size=data.packing_buffer_size,
        micro_batch_size=run.training.micro_batch_size,
        split=split,
    )
    return DiTDataLoader(
        loader,
        layout,
        max_bad_sample_fraction=data.max_bad_sample_fraction,
        num_workers=data.num_workers,
        buffer_size=data.buffer_samples,
        reject_oversize=reject_oversize,
        stall_samples=stall_samples,
    )
