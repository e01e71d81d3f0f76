"""TensorBoard and Weights & Biases, each only when asked for (``--tensorboard-dir``, ``--wandb-project``).

Both come with the ``log`` extra; the flag check refuses them where the package is missing. W&B reads
``WANDB_MODE`` (``offline`` on clusters without internet) and ``WANDB_DIR`` itself.
"""

from __future__ import annotations

from typing import Any

from dit.training.run_config import LoggingConfig


class MetricWriters:
    """The metric sinks of the logging rank (Megatron writes them on the last rank)."""

    def __init__(self, logging: LoggingConfig, run_summary: dict[str, Any]):
        """``run_summary``: the run's settings, which W&B records with the run."""
        self.tensorboard = self.wandb = None
        if logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=logging.tensorboard_dir)
        if logging.wandb_project:
            import wandb

            self.wandb = wandb.init(
                project=logging.wandb_project,
                name=logging.wandb_exp_name,
                config={k: v for k, v in run_summary.items() if _plain(v)},
            )

    def write(self, iteration: int, metrics: dict[str, float]) -> None:
        if self.tensorboard is not None:
            for name, value in metrics.items():
                self.tensorboard.add_scalar(name, value, iteration)
        if self.wandb is not None:
            self.wandb.log(metrics, step=iteration)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, list, tuple))
