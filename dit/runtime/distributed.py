"""Process start-up: distributed init, Megatron's parallel state, and the RNG contract.

RNG contract:
- model initialisation draws identically on every TP/CP/DP rank of a pipeline stage (Megatron
  then splits CPU-initialised master weights, so TP shards equal the TP=1 weights);
- Megatron's tracked "model-parallel" state (dropout inside TP regions) differs across TP ranks,
  and across DP replicas too once seeded ``per_data_parallel_rank``;
- the default generator after :func:`set_random_seed` with ``per_data_parallel_rank=True`` is
  equal across the TP/CP ranks of one replica and distinct across DP replicas;
- per-sample diffusion draws come from :func:`dit.diffusion.draws.sample_generator` and depend only on
  (seed, iteration, sample key): every rank, and every parallel layout, draws the same.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from dit.runtime import cpu_backend

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port free on this host now (single-process rendezvous, test launchers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: float = 10.0) -> str:
    """Join (or create) the default process group; return the backend used.

    Works under torchrun and as a plain single process. NCCL when CUDA is present, gloo (with the
    CPU compatibility layer) otherwise.
    """
    if dist.is_initialized():
        return dist.get_backend()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if torch.cuda.is_available():
        backend = "nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        backend = "gloo"
        cpu_backend.enable()
    dist.init_process_group(
        backend=backend,
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    return backend


def current_device() -> torch.device:
    """This rank's GPU (chosen by :func:`init_distributed` from ``LOCAL_RANK``), or the CPU where there is none."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


@dataclass(frozen=True)
class ParallelLayout:
    """The parallel sizes of a run. A run asks for the model-parallel ones; DP is what is left of the world
    (:meth:`current` reads it back, and a checkpoint records it)."""

    tensor: int = 1
    pipeline: int = 1
    context: int = 1
    data: int = 1

    @classmethod
    def current(cls) -> ParallelLayout:
        """The layout of Megatron's initialised parallel state."""
        return cls(
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_context_parallel_world_size(),
            parallel_state.get_data_parallel_world_size(),
        )

    def saved(self) -> dict[str, int]:
        """As checkpoints record it (the keys every checkpoint of this recipe has held)."""
        return {"tp": self.tensor, "pp": self.pipeline, "cp": self.context, "dp": self.data}

    @classmethod
    def from_saved(cls, saved: dict[str, int]) -> ParallelLayout:
        return cls(saved["tp"], saved["pp"], saved["cp"], saved["dp"])


def initialize_model_parallel(layout: ParallelLayout) -> None:
    """Build Megatron's process groups (TP, PP, CP, DP) for ``layout`` over the default group.

    The flags were checked against the world size already (``dit.training.arguments``); Megatron checks again.
    """
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        context_parallel_size=layout.context,
    )


def set_random_seed(seed: int, *, per_data_parallel_rank: bool) -> None:
    """Seed python, numpy, torch and Megatron's RNG tracker following the module's contract.

    Call with ``per_data_parallel_rank=False`` before building the model (identical initial
    weights on every replica) and with ``True`` afterwards (distinct dropout across replicas).
    """
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    if per_data_parallel_rank:
        stage_seed += 10 * parallel_state.get_data_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed % 2**32)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed, force_reset_rng=True)


def destroy() -> None:
    """Tear down Megatron's groups and the default group (tests, end of a run)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
