"""A run's state in a checkpoint: everything it needs to continue exactly, in one Megatron dist checkpoint.

A checkpoint holds the model's sharded state, the optimizer's (the distributed optimizer's included,
in Megatron's layout-independent format), the LR schedule, the run's counters (``TrainState``), every
rank's RNG states, every DP replica's energon loader state with its bad-data counts, the EMA (under
``ema.*`` keys of its own: in the model's layout, or DP-sharded beside a ``dp_reshardable`` distributed
optimizer), the model's architecture (``DiTConfig.architecture``, compared on load; ``dit.generate`` and
``dit.convert export`` rebuild the model from it) and the objective's parameters. Checkpoints written before
2026-12 stored the run's flags instead (``args``); ``dit.checkpoint.description`` reads both. Each
component gives its own ``state_dict`` / ``load_state_dict`` (or sharded form); :func:`sharded_state` gathers
them. Where the folders go and how a save is published: :mod:`dit.checkpoint.files`.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

from dit.checkpoint import files
from dit.checkpoint.description import model_description, saved_architecture
from dit.checkpoint.files import checkpoint_dir, folder_size, partial_dir, publish, retain
from dit.checkpoint.weights import DP_SHARDS, MODEL_SPACE, saved_ema_layout
from dit.errors import ConfigError
from dit.runtime.distributed import ParallelLayout
from dit.runtime.mcore019 import async_save_options
from dit.training.ema import EMA
from dit.training.hooks import TrainLoader
from dit.training.optimizer import allocate_state, publish_main_params
from dit.training.run_config import CheckpointConfig
from dit.training.state import TrainState
from dit.training.step import TrainingSetup

log = logging.getLogger(__name__)


def _rng_state() -> dict[str, Any]:
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _replica_rank() -> int:
    """This rank's place among the ranks of its DP replica (TP x CP x PP), which read the same packs."""
    tp, cp = ps.get_tensor_model_parallel_world_size(), ps.get_context_parallel_world_size()
    return ps.get_tensor_model_parallel_rank() + tp * (
        ps.get_context_parallel_rank() + cp * ps.get_pipeline_model_parallel_rank()
    )


def _per_rank(name: str, value: Any) -> ShardedObject:
    return ShardedObject(name, value, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def _per_replica(name: str, value: Any) -> ShardedObject:
    return ShardedObject(
        name, value, (ps.get_data_parallel_world_size(),), (ps.get_data_parallel_rank(),), replica_id=_replica_rank()
    )


def _fsdp(setup: TrainingSetup) -> bool:
    return setup.run.optimizer.use_megatron_fsdp


def _model_state(setup: TrainingSetup) -> dict:
    """The model's sharded state; under Megatron-FSDP over the model's own (freed) parameters, which
    ``fsdp.with_data`` fills."""
    if _fsdp(setup):
        from dit.training import fsdp  # megatron-core 0.17+ only

        return fsdp.model_sharded_state(setup.model[0])
    return setup.model[0].module.sharded_state_dict(metadata=ensure_metadata_has_dp_cp_group(None))


def optimizer_format(use_distributed_optimizer: bool, fully_reshardable: bool, megatron_fsdp: bool = False) -> str:
    """How the optimizer state is laid out on disk. Megatron's regular optimizer maps its state onto the
    model's tensors, so it loads under any layout; the distributed optimizer's default ``dp_reshardable``
    keeps each DP shard's buffers as they are (fully parallel, only DP may change), ``fully_reshardable``
    gathers them into per-parameter tensors on each DP group's first rank (TP and PP may change too).
    Megatron-FSDP saves ``fully_reshardable`` only, so that DDP runs load its checkpoints and it theirs."""
    if not use_distributed_optimizer:
        return "regular"
    return "fully_reshardable" if fully_reshardable or megatron_fsdp else "dp_reshardable"


def _optimizer_format(setup: TrainingSetup) -> str:
    run = setup.run
    return optimizer_format(
        run.optimizer.use_distributed_optimizer,
        run.checkpoint.fully_reshardable_optimizer,
        run.optimizer.use_megatron_fsdp,
    )


def _restore_adam_step(setup: TrainingSetup, loaded: dict) -> None:
    """Set torch Adam's per-parameter step to the checkpoint's: ``load_state_dict`` sets it from the saved
    param groups, but then copies the per-parameter states of the load request over it, whose step is the
    placeholder of ``dit.training.optimizer.allocate_state`` (Megatron's non-TE path; TE's and apex's Adam keep
    no step)."""
    steps = {group["step"] for group in loaded["optimizer"]["param_groups"]}
    assert len(steps) == 1, steps
    step = torch.tensor(float(steps.pop()))
    for chained in setup.optimizer.chained_optimizers:
        for state in chained.optimizer.state.values():
            state["step"] = step.clone()


def _optimizer_state(setup: TrainingSetup, model: dict, is_loading: bool, fmt: str) -> dict:
    """The optimizer's sharded state in format ``fmt`` (a load asks for the checkpoint's own)."""
    allocate_state(setup.optimizer)  # a save before the first successful step still finds every state
    if _fsdp(setup):
        from dit.training import fsdp

        return fsdp.optimizer_sharded_state(setup.optimizer, model, fsdp.shards(setup.model[0]), is_loading)
    metadata = ensure_metadata_has_dp_cp_group({"distrib_optim_sharding_type": fmt})
    return setup.optimizer.sharded_state_dict(model, is_loading=is_loading, metadata=metadata)


def ema_layout(fmt: str) -> str:
    """The EMA's checkpoint layout beside an optimizer saved in format ``fmt``: DP shards as they are beside
    ``dp_reshardable`` (fully parallel, DP may change), the model's own layout otherwise (any layout loads it)."""
    return DP_SHARDS if fmt == "dp_reshardable" else MODEL_SPACE


def sharded_state(setup: TrainingSetup, state: TrainState, loader: TrainLoader, ema: EMA | None) -> dict[str, Any]:
    """What a checkpoint holds, as a sharded state dict for ``dist_checkpointing.save``."""
    model = _model_state(setup)
    fmt = _optimizer_format(setup)
    ema_form = ema_layout(fmt)
    return {
        "model": _with_data(setup, model, is_loading=False),
        "optimizer": _optimizer_state(setup, model, is_loading=False, fmt=fmt),
        "optimizer_format": fmt,
        "scheduler": setup.scheduler.state_dict(),
        "train_state": state.state_dict(),
        "ema": None if ema is None else {**ema.state_dict(), "layout": ema_form},
        "ema_weights": {} if ema is None else ema.sharded_state_dict(model, ema_form),
        **model_description(setup.config, setup.run.objective),
        "layout": ParallelLayout.current().saved(),
        "rng": _per_rank("rng_state", _rng_state()),
        "data": _per_replica("data_state", loader.state_dict()),
    }


def _with_data(setup: TrainingSetup, model: dict, is_loading: bool) -> dict:
    """Under Megatron-FSDP the whole weights put together from the DP slices (empty ones to load into)."""
    if not _fsdp(setup):
        return model
    from dit.training import fsdp

    return fsdp.with_data(model, fsdp.shards(setup.model[0]), is_loading)


class Checkpointer:
    """Saves (in the background with ``--async-save``) and remembers the last checkpoint published."""

    def __init__(self, ckpt: CheckpointConfig):
        self.root, self.retain = (Path(ckpt.save) if ckpt.save else None), ckpt.save_retain
        self.queue = AsyncCallsQueue() if ckpt.async_save else None
        self.last: Path | None = None

    def save(self, setup: TrainingSetup, state: TrainState, loader: TrainLoader, ema: EMA | None) -> None:
        """Write ``SAVE/iter_NNNNNNN.partial``, then publish it: rename, tracker, ``--save-retain``."""
        assert self.root is not None, "save() runs only with --save"
        final = checkpoint_dir(self.root, state.iteration)
        partial = partial_dir(final)
        start = time.monotonic()
        if dist.get_rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)  # left by a save that was killed
            partial.mkdir(parents=True)
        dist.barrier()
        contents = sharded_state(setup, state, loader, ema)
        if self.queue is None:
            with _results_in_process():
                dist_checkpointing.save(contents, str(partial))
            self._publish(partial, final, state.iteration, start)
            return
        request = dist_checkpointing.save(contents, str(partial), async_sharded_save=True, **async_save_options())
        iteration = state.iteration
        request.add_finalize_fn(lambda: self._publish(partial, final, iteration, start))
        self.queue.schedule_async_request(request)

    def poll(self) -> None:
        """Publish background saves that every rank has finished (a collective: call it on every rank)."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=False)

    def finish(self) -> None:
        """Wait for a save still being written, and publish it."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=True)
            self.queue.close()

    def _publish(self, partial: Path, final: Path, iteration: int, start: float) -> None:
        dist.barrier()  # every rank's shards are on disk
        if dist.get_rank() == 0:
            assert self.root is not None  # save() ran
            publish(self.root, partial, final, iteration)
            retain(self.root, self.retain)
            print(
                f"saved checkpoint {final} ({folder_size(final) / 2**20:.1f} MiB, iteration {iteration}) in "
                f"{time.monotonic() - start:.1f} s",
                flush=True,
            )
        dist.barrier()
        self.last = final


@contextlib.contextmanager
def _results_in_process() -> Iterator[None]:
    """A synchronous save's write results passed through a queue of this process.

    Megatron-Core's file writer hands them back through one ``multiprocessing.Manager`` queue per process, made for
    the background writer of an async save. Its server is a spawned interpreter that imports torch to unpickle the
    first results: several seconds of CPU per rank at the first save (about a third of the time of the suite's
    checkpoint tests on 2 cores). A synchronous save writes in this process, so a plain queue carries the results.
    """
    shared = filesystem_async._results_queue
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = shared


def find_checkpoint(ckpt: CheckpointConfig) -> Path | None:
    """The checkpoint this run starts from: ``--load`` (it must hold one) or ``--save`` when it does."""
    root = ckpt.load or ckpt.save
    if root is None:
        return None
    return files.find_checkpoint(
        root,
        ckpt.ckpt_step,
        flag="--load" if ckpt.load else "--save",
        required=bool(ckpt.load),
        fix="point it at a --save folder of an earlier run, or drop --load to start from scratch",
    )


def check_optimizer_format(
    common: dict,
    distributed: bool,
    saved: ParallelLayout,
    layout: ParallelLayout,
    path: Path,
    megatron_fsdp: bool = False,
) -> None:
    fmt = common["optimizer_format"]
    if megatron_fsdp and fmt == "dp_reshardable":
        raise ConfigError(
            "--use-megatron-fsdp",
            f"the distributed optimizer state in {path} is dp_reshardable, which Megatron-FSDP cannot "
            "split; pass --no-load-optim, or save it with --dist-ckpt-optim-fully-reshardable",
        )
    if (fmt == "regular") != (not distributed):
        raise ConfigError(
            "--use-distributed-optimizer",
            f"the checkpoint {path} holds a {'distributed' if fmt != 'regular' else 'regular'} "
            "optimizer's state; match its --use-distributed-optimizer or pass --no-load-optim",
        )
    if fmt == "dp_reshardable" and (saved.tensor, saved.pipeline) != (layout.tensor, layout.pipeline):
        raise ConfigError(
            "--no-load-optim",
            f"the distributed optimizer state in {path} was saved for tp={saved.tensor} pp={saved.pipeline} and "
            f"loads only under that layout (this run: tp={layout.tensor} pp={layout.pipeline}); pass "
            "--no-load-optim, or save it with --dist-ckpt-optim-fully-reshardable",
        )


def _load_ddp(setup: TrainingSetup, loaded: dict, with_optimizer: bool, distributed: bool, fmt: str) -> None:
    with torch.no_grad():  # the distributed optimizer copies into views of the parameters
        setup.model[0].module.load_state_dict(loaded["model"])
        if with_optimizer:
            if fmt == "fully_reshardable":
                _load_fully_reshardable(setup, loaded["optimizer"])
            else:
                setup.optimizer.load_state_dict(loaded["optimizer"])
            if distributed:
                _restore_adam_step(setup, loaded["optimizer"])
        else:
            setup.optimizer.reload_model_params()  # fp32 main weights from the loaded model


def _load_fully_reshardable(setup: TrainingSetup, optimizer: dict) -> None:
    """The distributed optimizer's ``fully_reshardable`` state, loaded around a bug of Megatron-Core 0.19 with torch's
    Adam: ``load_state_dict`` gives each parameter's state a ``step`` tensor, then copies every tensor of that state
    from the checkpoint, which holds no ``step`` (``_set_main_param_and_optimizer_states`` raises KeyError). So the
    param groups load first, the tensors without ``step``, and :func:`_restore_adam_step` sets it after."""
    (chained,) = setup.optimizer.chained_optimizers
    param_state = optimizer.pop("param_state")
    chained.load_state_dict(optimizer)
    for state in chained.optimizer.state.values():
        state.pop("step", None)
    chained.load_parameter_state_from_fully_reshardable(param_state)


def _load_fsdp(setup: TrainingSetup, loaded: dict, with_optimizer: bool) -> None:
    """Each rank's slices of the loaded whole tensors into FSDP's main weights and Adam state, then into the
    model's weights."""
    from dit.training import fsdp

    slots = fsdp.shards(setup.model[0])
    fsdp.load_weights(slots, loaded["model"])
    if with_optimizer:
        fsdp.load_optimizer(setup.optimizer, slots, loaded["optimizer"])
    publish_main_params(setup.optimizer, setup.model)


def load_checkpoint(setup: TrainingSetup, state: TrainState, loader: TrainLoader, ema: EMA | None, path: Path) -> None:
    """Restore what the run's checkpoint config asks for from ``path`` (before the loader's first ``next``)."""
    ckpt, distributed = setup.run.checkpoint, setup.run.optimizer.use_distributed_optimizer
    start = time.monotonic()
    common = dist_checkpointing.load_common_state_dict(str(path))
    setup.config.check_architecture(saved_architecture(common, path), str(path))
    weights_only = ckpt.finetune
    layout, saved_layout = ParallelLayout.current(), ParallelLayout.from_saved(common["layout"])
    model = _model_state(setup)
    request = {"model": _with_data(setup, model, is_loading=True)}
    if not weights_only and ckpt.load_optim:
        check_optimizer_format(common, distributed, saved_layout, layout, path, _fsdp(setup))
        if ema is not None:
            ema_saved = saved_ema_layout(common, path, "--no-load-optim")
            if ema_saved is None:
                raise ConfigError(
                    "--ema-decay",
                    f"the checkpoint {path} has no EMA to continue; pass --ema-decay 0, "
                    "or --no-load-optim to start an EMA from its weights",
                )
            request["ema_weights"] = ema.sharded_state_dict(model, ema_saved, is_loading=True)
        request["optimizer"] = _optimizer_state(setup, model, is_loading=True, fmt=common["optimizer_format"])
    load_rng = not weights_only and ckpt.load_rng and saved_layout == layout
    if load_rng:
        request["rng"] = _per_rank("rng_state", None)
    load_data = not weights_only and saved_layout.data == layout.data
    if load_data:
        request["data"] = _per_replica("data_state", None)
    loaded = dist_checkpointing.load(request, str(path))
    if _fsdp(setup):
        _load_fsdp(setup, loaded, with_optimizer="optimizer" in request)
    else:
        _load_ddp(setup, loaded, "optimizer" in request, distributed, common["optimizer_format"])
    if "optimizer" in request:
        setup.scheduler.load_state_dict(loaded["scheduler"])
        if ema is not None:
            ema.load_state_dict(common["ema"])
            ema.load_sharded(loaded["ema_weights"], common["ema"]["layout"])
    elif ema is not None:
        ema.reset()  # from the loaded weights
    if not weights_only:
        restored = TrainState.from_state_dict(loaded["train_state"])
        for name, value in restored.__dict__.items():
            setattr(state, name, value)
    if load_rng:
        _set_rng_state(loaded["rng"])
    if load_data:
        loader.load_state_dict(loaded["data"])
    if dist.get_rank() == 0:
        notes = []
        if not weights_only and not load_data:
            notes.append(
                f"WARNING: the checkpoint was saved with {saved_layout.data} data-parallel replicas and this "
                f"run has {layout.data}; their loader states cannot be split differently, so the data "
                "stream restarts from the beginning of the epoch"
            )
        if not weights_only and ckpt.load_rng and not load_rng:
            notes.append("the parallel layout changed, so the per-rank RNG states were not restored")
        what = "weights only (--finetune)" if weights_only else f"iteration {state.iteration}"
        print(
            f"loaded checkpoint {path} ({folder_size(path) / 2**20:.1f} MiB, {what}) in "
            f"{time.monotonic() - start:.1f} s" + "".join(f"; {n}" for n in notes),
            flush=True,
        )
