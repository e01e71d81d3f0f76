"""Run-time detection of the optional GPU libraries (never required)."""

from __future__ import annotations

import functools
import importlib.util

from dit.errors import ConfigError
from dit.model.fp8 import check_fp8_device


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


def te_version() -> str:
    """The installed Transformer Engine's version (only called where it imports)."""
    from megatron.core.utils import get_te_version

    return str(get_te_version())


def check_backend(
    transformer_impl: str, fp8_format: str | None, half_precision: bool, fp8_recipe: str = "delayed"
) -> None:
    """Raise :class:`ConfigError` when this machine or the precision cannot run the asked backend or FP8.

    ``half_precision``: bf16 (or fp16) parameters and activations. TE's fused and flash attention for packed
    (THD) sequences, and its context parallelism, have no fp32 kernels. ``fp8_recipe`` must have FP8 kernels
    on this GPU (:data:`dit.model.fp8.MIN_CAPABILITY`).
    """
    if transformer_impl == "transformer_engine":
        if not have_transformer_engine():
            raise ConfigError(
                "transformer_impl",
                "transformer_engine is not importable here; use --transformer-impl local "
                "or run in the NGC PyTorch container",
            )
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "transformer_impl",
                "transformer_engine needs a CUDA GPU and there is none here; use --transformer-impl local",
            )
        from packaging.version import Version

        from dit.model.te_attention import MIN_TE_VERSION

        if Version(te_version()) < Version(MIN_TE_VERSION):
            raise ConfigError(
                "transformer_impl",
                f"Transformer Engine {te_version()} is older than {MIN_TE_VERSION}, the first to "
                "take pad_between_seqs, without which context parallel drops keys of packs padded at "
                "their end; use a newer TE (the NGC PyTorch container of the Dockerfile) or "
                "--transformer-impl local",
            )
        if not half_precision:
            raise ConfigError(
                "bf16",
                "transformer_engine runs attention on packed (THD) sequences and context parallel "
                "only in bf16/fp16; add --bf16 (or use --transformer-impl local for fp32)",
            )
    if fp8_format is not None and transformer_impl != "transformer_engine":
        raise ConfigError(
            "fp8",
            "FP8 needs Transformer Engine (--transformer-impl transformer_engine) on a GPU; drop --fp8-format here",
        )
    if fp8_format is not None:
        import torch

        check_fp8_device(fp8_recipe, torch.cuda.get_device_capability(), torch.cuda.get_device_name())
