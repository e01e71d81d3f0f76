"""Where megatron-core 0.17 and later (tested: 0.19) differ from 0.16 for this recipe: the one place.

The recipe runs on megatron-core 0.16 (the newest for Python 3.11, the oldest supported) to 0.19 (Python 3.12,
the tested default) with the same code everywhere else; what the versions need differently is decided here,
from the installed version, and nowhere else.
"""

from __future__ import annotations

import importlib.util
from importlib.metadata import version

from packaging.version import Version

MCORE_VERSION = Version(version("megatron-core"))
SINCE_017 = MCORE_VERSION >= Version("0.17")


def async_save_options() -> dict[str, str]:
    """Options of ``dist_checkpointing.save(..., async_sharded_save=True)`` for a request that Megatron's own
    ``AsyncCallsQueue`` runs: 0.17+ defaults to NVIDIA's resiliency extension (``async_strategy="nvrx"``, a
    package this recipe does not depend on); 0.16 has only Megatron's writer and no such option."""
    return {"async_strategy": "mcore"} if SINCE_017 else {}


def megatron_fsdp_missing() -> str | None:
    """Why ``--use-megatron-fsdp`` cannot run on the installed stack, or None when it can.

    It is proven (tests/integration/test_training_layouts.py) with megatron-core 0.19 only; Megatron-Core's FSDP adapter
    also needs einops, which megatron-core itself does not require."""
    if not SINCE_017:
        return f"needs megatron-core 0.17+ (Python 3.12), found {MCORE_VERSION}; drop the flag on this stack"
    if importlib.util.find_spec("einops") is None:
        return "needs einops (Megatron-Core's FSDP adapter imports it): pip install einops"
    return None
