"""Run-time detection of the optional GPU libraries (never required)."""

from __future__ import annotations

import functools
import importlib.util

from dit.errors import ConfigError


@functools.cache
def have_transformer_engine() -> bool:
    """True when ``import transformer_engine.pytorch`` works (as in the NGC container)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a broken TE install counts as absent; the caller's flag check says so
        return False
    return True


@functools.cache
def have_apex() -> bool:
    return importlib.util.find_spec("apex") is not None


def check_backend(transformer_impl: str, fp8_format: str | None) -> None:
    """Raise :class:`ConfigError` when this machine cannot run the asked backend or FP8."""
    if transformer_impl == "transformer_engine" and not have_transformer_engine():
        raise ConfigError("--transformer-impl",
                          "transformer_engine is not importable here; use --transformer-impl local "
                          "or run in the NGC PyTorch container")
    if fp8_format is None:
        return
    if transformer_impl != "transformer_engine":
        raise ConfigError("--fp8-format",
                          "FP8 needs Transformer Engine (--transformer-impl transformer_engine) on a GPU; "
                          "drop --fp8-format here")
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("--fp8-format", "FP8 needs a CUDA GPU; drop --fp8-format on CPU")
