"""The hooks an entry point hands to the training loop (Megatron-LM's pretrain() arguments).

Light on purpose: importing it (and ``dit.training.main``) pulls in neither torch nor Megatron, so the
command line answers ``--help`` and flag mistakes at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from dit.model.config import DiTConfig
    from dit.model.model import DiTModel
    from dit.model.packed import PackedBatch
    from dit.training.run_config import RunConfig


class TrainLoader(Protocol):
    """What the train data provider returns: this rank's packs, its bad-data counts and a savable state."""

    stats: Any  # data.loader.bad_data.DataStats: .read, .bad, .skipped, .examples, .add()

    def __iter__(self) -> Iterator[PackedBatch]: ...

    def __next__(self) -> PackedBatch: ...

    def close(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Hooks:
    """The entry point's part of a run."""

    launch_check: Callable[[RunConfig], Any]  # raises ConfigError; .summary: one line for --validate-only
    model_provider: Callable[[DiTConfig, bool, bool], DiTModel]  # (config, pre_process, post_process)
    forward_step: Callable  # Megatron's forward_step_func(iterator of DiffusionMicroBatch, model)
    train_data_provider: Callable[[RunConfig], TrainLoader]
    valid_data_provider: Callable[[RunConfig], TrainLoader] | None = None  # the same packs each call
