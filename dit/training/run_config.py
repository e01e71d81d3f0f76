"""One run's configuration: the model's ``DiTConfig`` and the run's own parts, each a dataclass.

``dit.training.arguments.run_config`` builds it once from the command line and the YAML recipe, after every
check; the training loop, the loaders, checkpoints and logs read only this, never an argparse
Namespace. Field names follow the flags (``--lr`` -> ``optimizer.lr``), so an error found past the
command line can still name the flag. Light on purpose: no torch import (``dit.training.hooks``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from dit.diffusion.config import ObjectiveConfig

if TYPE_CHECKING:
    from dit.model.config import DiTConfig


@dataclass(frozen=True)
class TrainingConfig:
    """The loop: its length, batch and seed, and when it stops early."""

    train_iters: int
    """Optimizer steps of the run."""
    micro_batch_size: int
    """Packs (or padded samples with ``data.packing`` off) per micro-batch."""
    global_batch_size: int
    """Packs per step over all DP ranks."""
    seed: int
    """Seed of the initial weights, every diffusion draw and the data order."""
    max_skipped_steps: int
    """Consecutive non-finite steps after which the run stops."""
    distributed_timeout_minutes: float
    """How long a collective waits before the process group gives up."""
    exit_interval: int | None = None
    """Save and exit at a multiple of this iteration."""
    exit_duration_in_mins: float | None = None
    """Save and exit after this many minutes of training."""
    exit_signal_handler: bool = False
    """On SIGTERM finish the step, save and exit 0."""


@dataclass(frozen=True)
class OptimizerConfig:
    """Megatron's AdamW, its gradient reduction, and the learning-rate schedule."""

    lr: float
    """Peak learning rate."""
    min_lr: float
    """Learning rate at the end of the decay."""
    lr_warmup_iters: int
    """Linear warm-up steps from 0 to ``lr``."""
    lr_decay_iters: int
    """Steps over which the rate decays to ``min_lr``."""
    lr_decay_style: Literal["constant", "linear", "cosine"]
    """Shape of the decay after warm-up."""
    weight_decay: float
    """AdamW weight decay (never on biases, norms, tables)."""
    adam_beta1: float
    """AdamW beta1."""
    adam_beta2: float
    """AdamW beta2."""
    adam_eps: float
    """AdamW epsilon."""
    clip_grad: float
    """Gradient-norm clip (0: off)."""
    use_distributed_optimizer: bool = False
    """Shard the optimizer state (and the EMA) over DP."""
    overlap_grad_reduce: bool = False
    """Overlap the DP gradient reduction with the backward pass."""
    use_megatron_fsdp: bool = False
    """Megatron-FSDP: parameters, gradients and optimizer state sharded over DP (megatron-core 0.17+)."""


@dataclass(frozen=True)
class DataConfig:
    """The datasets and the loader."""

    data_path: str
    """The training dataset (energon)."""
    max_seq_length: int
    """Tokens of a pack."""
    max_text_length: int
    """Rows a text embedding may have."""
    text_padding: Literal["trim-zeros", "keep"]
    """Trim a text embedding's trailing zero rows, or keep them."""
    text_embedding_key: str
    """The entry of a dict .pickle that holds the text embedding."""
    num_workers: int
    """Loader worker processes per rank."""
    packing_buffer_size: int
    """Samples a packing buffer holds."""
    max_bad_sample_fraction: float
    """Fraction of broken samples past which the run stops."""
    oversize_policy: Literal["skip", "error"]
    """A sample too long is skipped and counted, or stops the run."""
    packing: bool = True
    """Pack samples; off: each sample padded to ``max_seq_length``."""
    valid_data_path: str | None = None
    """A validation dataset of its own (None: the val split of ``data_path``, if any)."""
    validation: tuple[str, str] | None = None
    """(dataset, split) validation reads, None when there is none."""

    @property
    def buffer_samples(self) -> int:
        """Samples a loader worker reads before it hands over their first pack or micro-batch."""
        return self.packing_buffer_size if self.packing else 1


@dataclass(frozen=True)
class CheckpointConfig:
    """Where checkpoints go, what a run starts from and what it restores."""

    save: str | None = None
    """Folder to write checkpoints to (and to resume from)."""
    save_interval: int | None = None
    """Steps between checkpoints."""
    save_retain: int | None = None
    """Keep the newest N checkpoints."""
    async_save: bool = False
    """Write checkpoints in the background."""
    fully_reshardable_optimizer: bool = False
    """Save the distributed optimizer's state so that any TP/PP loads it."""
    load: str | None = None
    """Folder to start from (None: ``save`` when it holds one)."""
    ckpt_step: int | None = None
    """The iteration to load (None: the latest)."""
    finetune: bool = False
    """Load the weights only."""
    load_optim: bool = True
    """Restore the optimizer, the schedule and the EMA."""
    load_rng: bool = True
    """Restore every rank's RNG states."""


@dataclass(frozen=True)
class LoggingConfig:
    """What the run writes besides checkpoints."""

    log_interval: int = 10
    """Steps between log lines."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one accelerator, for MFU."""
    tensorboard_dir: str | None = None
    """TensorBoard log folder."""
    wandb_project: str | None = None
    """Weights & Biases project."""
    wandb_exp_name: str | None = None
    """Weights & Biases run name."""
    sample_log: str | None = None
    """Folder for a JSON line per step and DP replica."""


@dataclass(frozen=True)
class EvaluationConfig:
    """The EMA and the validation loss."""

    ema_decay: float = 0.9999
    """EMA decay (0: no EMA)."""
    ema_warmup: bool = True
    """Ramp the decay up over the first steps."""
    eval_interval: int | None = None
    """Steps between validations (None: none)."""
    eval_iters: int = 10
    """Validation batches of ``global_batch_size`` packs."""
    use_ema: bool = True
    """Validate the EMA (when there is one) instead of the raw weights."""
    skip_train: bool = False
    """Load, validate once and exit."""


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run reads, built once by ``dit.training.arguments.run_config``."""

    model: DiTConfig
    """The model, its parallel layout and precision."""
    training: TrainingConfig
    """The loop."""
    optimizer: OptimizerConfig
    """Optimizer and schedule."""
    objective: ObjectiveConfig
    """The diffusion objective."""
    data: DataConfig
    """Datasets and loader."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and loading."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logs and writers."""
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    """EMA and validation."""
    world_size: int = 1
    """Processes of the launch."""

    def summary(self) -> dict[str, Any]:
        """Plain values of every part but the model, for experiment trackers."""
        parts = (
            self.training,
            self.optimizer,
            self.objective,
            self.data,
            self.checkpoint,
            self.logging,
            self.evaluation,
        )
        return {k: v for part in parts for k, v in asdict(part).items()}
