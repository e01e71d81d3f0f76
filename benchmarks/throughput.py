"""What the model benchmarks share: the device they run on, timing that waits for it, and a step's rates.

Rates: real tokens/s, model TFLOP/s (``dit.training.flops``: a multiply-add is 2 FLOPs, training is 3x the
forward, recomputation not counted) and MFU = TFLOP/s / the accelerator's dense peak from
``dit.training.flops.PEAK_TFLOPS`` (bf16, or fp8 for an FP8 run), as the training log computes them. On a
CPU there is no peak, so no MFU.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import torch


def select_device(name: str) -> None:
    """Call before anything touches CUDA. ``cpu`` hides every GPU, so that the recipe runs its CPU backend
    (gloo, the CPU layer) as on a machine without one; ``cuda`` needs a GPU."""
    if name == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible here")


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for the device's queued work (CUDA kernels run asynchronously); nothing to wait for on CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def timed(fn: Callable[[], object], sync: Callable[[], None], steps: int = 1) -> float:
    """Seconds per call of ``fn``, mean over ``steps`` calls, with the device's work finished on both ends."""
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - start) / steps


def peak(device: torch.device, fp8: bool) -> float | None:
    """The device's dense peak TFLOP/s (None on CPU or an unlisted GPU)."""
    from dit.training.flops import peak_tflops

    return peak_tflops(torch.cuda.get_device_name(device), fp8) if device.type == "cuda" else None


def rates(
    flops: float, tokens: int, seconds: float, device: torch.device, fp8: bool = False
) -> dict[str, float | None]:
    """tokens/s, model TFLOP/s and MFU of a step of ``flops`` model FLOPs over ``tokens`` real tokens."""
    tflops = flops / seconds / 1e12
    top = peak(device, fp8)
    return {
        "tokens_per_s": round(tokens / seconds, 1),
        "tflops": round(tflops, 4),
        "mfu": round(tflops / top, 4) if top else None,
    }


def max_memory_gib(device: torch.device) -> float | None:
    """The GPU's max allocated memory so far (None on CPU)."""
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def machine(device: torch.device) -> str:
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return f"{platform.machine()}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}"


def format_rates(name: str, r: dict[str, float | None]) -> str:
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
    return f"{name}: {r['tokens_per_s']:,.0f} tokens/s, {r['tflops']:.2f} TFLOP/s, MFU {mfu}"
