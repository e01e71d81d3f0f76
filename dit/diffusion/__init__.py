"""The diffusion process, apart from the network: noise levels, corruption, targets and weights.

:func:`build_objective` is the one factory; the training loop and the samplers see only the
:class:`~dit.diffusion.objective.Objective` interface.
"""

from __future__ import annotations

from dit.diffusion.edm import EDM
from dit.diffusion.flow import RectifiedFlow
from dit.diffusion.objective import Objective


def build_objective(
    name: str,
    *,
    edm_p_mean: float = -1.2,
    edm_p_std: float = 1.2,
    sigma_data: float = 0.5,
    flow_logit_mean: float = 0.0,
    flow_logit_std: float = 1.0,
    flow_shift: float | str = "auto",
) -> Objective:
    """``edm`` or ``flow`` with the given parameters (the flags of the same names)."""
    if name == "edm":
        return EDM(p_mean=edm_p_mean, p_std=edm_p_std, sigma_data=sigma_data)
    if name == "flow":
        return RectifiedFlow(logit_mean=flow_logit_mean, logit_std=flow_logit_std, shift=flow_shift)
    raise ValueError(f"unknown objective {name!r}: use 'edm' or 'flow'")
