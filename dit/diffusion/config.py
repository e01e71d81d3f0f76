"""The diffusion objective's parameters: what a run trains with, what a checkpoint stores for sampling."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from dit.diffusion.objective import Objective


@dataclass(frozen=True)
class ObjectiveConfig:
    """The diffusion objective's parameters (also saved in checkpoints, for sampling)."""

    objective: Literal["edm", "flow"] = "flow"
    """EDM or rectified flow."""
    edm_p_mean: float = -1.2
    """EDM: mean of ln(sigma)."""
    edm_p_std: float = 1.2
    """EDM: standard deviation of ln(sigma)."""
    sigma_data: float = 0.5
    """EDM: standard deviation of the data."""
    flow_logit_mean: float = 0.0
    """Flow: mean of logit(t)."""
    flow_logit_std: float = 1.0
    """Flow: standard deviation of logit(t)."""
    flow_shift: float | str = "auto"
    """Flow: time shift, or 'auto' for SD3's resolution rule."""
    text_drop_prob: float = 0.1
    """Guidance dropout: chance a sample trains unconditionally."""

    def build(self) -> Objective:
        """The objective these parameters describe (``dit.diffusion.build_objective``)."""
        from dit.diffusion import build_objective

        return build_objective(
            self.objective,
            edm_p_mean=self.edm_p_mean,
            edm_p_std=self.edm_p_std,
            sigma_data=self.sigma_data,
            flow_logit_mean=self.flow_logit_mean,
            flow_logit_std=self.flow_logit_std,
            flow_shift=self.flow_shift,
        )

    def to_dict(self) -> dict[str, Any]:
        """The form a checkpoint stores."""
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> ObjectiveConfig:
        """From a checkpoint's dict, or the flags an older checkpoint saved (their other keys ignored)."""
        return cls(**{name: saved[name] for name in cls.__dataclass_fields__ if name in saved})
