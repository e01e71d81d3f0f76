"""Run-time detection of the optional GPU libraries (never required)."""

from __future__ import annotations

import functools
import importlib.util


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
