"""Matching the data to Megatron's ranks: who reads what, how samples are padded, what each rank keeps.

- energon's :class:`WorkerConfig` gets the pure data-parallel rank and size, so every TP, CP and
  PP rank of one model replica reads the same packs, and replicas read disjoint ones.
- Each sample is padded to :func:`pad_multiple`: a multiple of 2*cp so that it splits into 2*cp
  equal chunks, times tp under sequence parallelism so that each CP share splits over TP ranks,
  and under FP8 so that every rank's linear inputs hold TE's row multiple (:mod:`dit.model.fp8`).
- After loading, a CP rank keeps chunks r and 2cp-1-r of every sample (TE's THD scheme), and a
  pipeline stage that is neither first nor last drops the latent tokens and the loss mask: it
  needs only the conditioning (text, positions, timesteps from the keys) and the cu_seqlens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from megatron.core import parallel_state as ps
from megatron.energon import WorkerConfig
from megatron.energon.errors import reraise_exception

from dit.model.fp8 import fp8_rows
from dit.model.packed import PackedBatch, thd_partition_indices

if TYPE_CHECKING:
    from dit.model.config import DiTConfig


def pad_multiple(cp_size: int, tp_size: int, sequence_parallel: bool, fp8_recipe: str | None = None) -> int:
    """The smallest multiple every sample's token count must be padded to for this layout.

    Under FP8, TE's GEMMs also need the rows of every linear's input on each rank, S/cp (S/cp/tp under
    sequence parallelism), in multiples of :func:`dit.model.fp8.fp8_rows`: each sample then gives every rank
    a multiple of that many.
    """
    slices = tp_size if sequence_parallel else 1
    multiple = (2 * cp_size if cp_size > 1 else 1) * slices
    return math.lcm(multiple, fp8_rows(fp8_recipe) * cp_size * slices)


@dataclass(frozen=True)
class RankPlace:
    """This rank's place in the parallel layout, as far as the data path cares."""

    dp_rank: int = 0
    dp_size: int = 1
    cp_rank: int = 0
    cp_size: int = 1
    tp_size: int = 1
    sequence_parallel: bool = False
    fp8_recipe: str | None = None  # None without FP8
    first_stage: bool = True
    last_stage: bool = True

    @classmethod
    def from_parallel_state(cls, config: DiTConfig) -> RankPlace:
        """Read Megatron's initialised parallel state (DP without CP: CP ranks share the data); the model's
        config gives sequence parallelism and the FP8 recipe."""
        return cls(
            dp_rank=ps.get_data_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(),
            cp_rank=ps.get_context_parallel_rank(),
            cp_size=ps.get_context_parallel_world_size(),
            tp_size=ps.get_tensor_model_parallel_world_size(),
            sequence_parallel=config.sequence_parallel,
            fp8_recipe=config.active_fp8_recipe,
            first_stage=ps.is_pipeline_first_stage(ignore_virtual=True),
            last_stage=ps.is_pipeline_last_stage(ignore_virtual=True),
        )

    @property
    def pad_multiple(self) -> int:
        return pad_multiple(self.cp_size, self.tp_size, self.sequence_parallel, self.fp8_recipe)

    def worker_config(self, num_workers: int, seed: int) -> WorkerConfig:
        """energon's config for this replica. Data faults never reach energon's error handler (the
        task encoder turns them into counted skips, shard read errors included: see
        :mod:`data.loader.shard_reads`), so whatever does is a bug and is raised."""
        return WorkerConfig(
            rank=self.dp_rank,
            world_size=self.dp_size,
            num_workers=num_workers,
            seed_offset=seed,
            global_error_handler=reraise_exception,
        )


def shard_for_rank(batch: PackedBatch, layout: RankPlace) -> PackedBatch:
    """This rank's part of a pack: its CP share of the latent tokens; none on middle PP stages.

    The pack is still on the host: the indices come from its layout there (TE's
    ``thd_get_partitioned_indices`` gives the same, tests/unit/data/test_data_rank_split.py, but would cost a copy to
    the GPU and a read back per pack)."""
    if layout.cp_size > 1:
        assert batch.tokens is not None and batch.loss_mask is not None  # a whole pack from the loader
        idx = thd_partition_indices(batch.cu_seqlens_padded, layout.cp_size, layout.cp_rank)  # [S / cp]
        batch = replace(batch, tokens=batch.tokens[idx], positions=batch.positions[idx], loss_mask=batch.loss_mask[idx])
    if not (layout.first_stage or layout.last_stage):
        batch = replace(batch, tokens=None, loss_mask=None)
    return batch
