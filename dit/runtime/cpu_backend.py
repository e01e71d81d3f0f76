"""Megatron-Core on a machine without CUDA: the one compatibility layer.

Megatron-Core (0.16 to 0.19) assumes CUDA in a few places: it allocates with ``device="cuda"`` or
``device=torch.cuda.current_device()``, calls ``torch.cuda.synchronize()`` in p2p, waits on
``torch.cuda.current_stream()`` before each gradient reduction (0.17 and later), runs Megatron-FSDP's
collectives on side streams of its own (``torch.cuda.Stream``, ``torch.cuda.stream``, ``torch.cuda.Event``),
asserts ``param.type() == "torch.cuda.FloatTensor"`` in its optimizers and grad clipping, and keeps its
dropout RNG states with ``torch.cuda.get_rng_state`` (Megatron-FSDP copies them across TP ranks).
This module maps all of that onto the CPU. On the CPU every stream is the one host stream, whose events are
complete when recorded; so that this holds, a collective called through ``torch.distributed`` runs to its end
where it is issued (gloo would run an ``async_op`` one on a thread of its own, and Megatron-FSDP frees and
reallocates bucket storage right after an event that on a GPU orders that after the collective: on the CPU the
collective would then write into freed memory, a rare heap corruption). Megatron's DDP buffers and TP layers bind
some collectives at import, beyond this reach, and wait on their handles before they use the data.
It is enabled only when no CUDA device exists and never touches a GPU run.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from dit.runtime.console import is_main_process

log = logging.getLogger(__name__)

_state: dict[str, Any] = {"mode": None, "saved": {}}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # a bare ordinal means a CUDA device to torch
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    """Rewrites every CUDA device request (``device=`` keyword, ``.cuda()``, ``.to("cuda")``) to cpu."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda_device(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _cuda_style_type(self: torch.Tensor, dtype=None, non_blocking: bool = False, **kwargs):
    """``Tensor.type()`` with no argument answers ``torch.cuda.*`` names, as Megatron's asserts expect."""
    original = _state["saved"]["Tensor.type"]
    if dtype is None and not kwargs:
        name = original(self)
        return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
    return original(self, dtype, non_blocking, **kwargs)


class _HostEvent:
    """An event on the host stream: recorded work has already run, so it is always complete."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _HostStream:
    """The stream CPU work runs on: in order, so every wait and record is already satisfied. Every side stream
    that Megatron creates is this one stream, and ``with torch.cuda.stream(s)`` enters nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _HostStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _HostEvent:
        return event or _HostEvent()

    def synchronize(self) -> None:
        pass


_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "all_to_all_single",
)
_MEGATRON_FSDP_BUFFERS = "megatron.core.distributed.fsdp.src.megatron_fsdp.param_and_grad_buffer"


def _synchronous(collective: Callable) -> Callable:
    """``collective`` waited for before it returns, ``async_op`` or not (its work is returned, complete)."""
    signature = inspect.signature(collective)

    @functools.wraps(collective)
    def run(*args: Any, **kwargs: Any) -> Any:
        work = collective(*args, **kwargs)
        asynchronous = signature.bind(*args, **kwargs).arguments.get("async_op", False)
        # inside a coalescing block the collective is only recorded (its work is illegal to wait on)
        if asynchronous and work is not None and not isinstance(work, dist.distributed_c10d._IllegalWork):
            work.wait()
        return work

    return run


def _synchronous_coalescing(coalescing: Callable) -> Callable:
    """``_coalescing_manager`` whose block's collectives have run when the block ends, ``async_ops`` or not."""

    @contextlib.contextmanager
    def manager(group: Any = None, device: Any = None, async_ops: bool = False) -> Iterator[Any]:
        with coalescing(group, device, async_ops=False) as cm:
            yield cm

    return manager


def _tracker_class():
    from megatron.core.tensor_parallel import random as mcore_random

    class CPURNGStatesTracker(mcore_random.CudaRNGStatesTracker):
        """Megatron's RNG tracker over the CPU default generator, which is what CPU dropout draws from."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return CPURNGStatesTracker


@contextlib.contextmanager
def cuda_ordinal_device() -> Iterator[None]:
    """``torch.cuda.current_device()`` answers the ordinal 0 inside the block (the device mode maps device 0
    to the CPU): Megatron-FSDP builds ``torch.device(f"cuda:{torch.cuda.current_device()}")`` when it is
    constructed, which the ``cpu`` device that :func:`enable` answers with would turn into ``"cuda:cpu"``.
    Outside the block the answer stays a device (see :func:`enable`, backward runs outside the mode)."""
    if not is_active():
        yield
        return
    as_device = torch.cuda.current_device
    torch.cuda.current_device = lambda: 0
    try:
        yield
    finally:
        torch.cuda.current_device = as_device


def is_active() -> bool:
    return _state["mode"] is not None


def enable() -> bool:
    """Turn the layer on when there is no CUDA device; return whether it is on. Idempotent."""
    if torch.cuda.is_available():
        return False
    if is_active():
        return True
    from megatron.core.tensor_parallel import random as mcore_random

    saved = _state["saved"]
    saved["Tensor.type"] = torch.Tensor.type
    saved["patches"] = []

    def patch(owner, name, value):
        saved["patches"].append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    patch(torch.Tensor, "type", _cuda_style_type)
    # A device, not the ordinal 0: since torch 2.13 torch.autograd.backward dispatches to torch-function
    # modes, so backward runs with _CudaToCpu switched off, and Megatron's autograd functions allocate
    # their backward buffers with device=torch.cuda.current_device() (sequence/context-parallel gathers).
    patch(torch.cuda, "current_device", lambda: torch.device("cpu"))
    patch(torch.cuda, "synchronize", lambda device=None: None)
    patch(torch.cuda, "current_stream", lambda device=None: _HostStream())
    patch(torch.cuda, "empty_cache", lambda: None)
    patch(torch.cuda, "Stream", _HostStream)
    patch(torch.cuda, "Event", _HostEvent)
    patch(torch.cuda, "stream", lambda stream=None: _HostStream())
    # Checkpointed recomputation saves and restores "the CUDA RNG": on CPU that is the CPU generator.
    patch(mcore_random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    patch(mcore_random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    # Megatron-FSDP copies TP rank 0's RNG states, "the CUDA RNG" among them, to the other TP ranks
    patch(torch.cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state())
    patch(torch.cuda, "set_rng_state", lambda state, device="cuda": torch.set_rng_state(state))
    patch(mcore_random, "CudaRNGStatesTracker", _tracker_class())
    for name in _COLLECTIVES:
        patch(dist, name, _synchronous(getattr(dist, name)))
    coalescing = _synchronous_coalescing(dist.distributed_c10d._coalescing_manager)
    patch(dist, "_coalescing_manager", coalescing)
    patch(dist.distributed_c10d, "_coalescing_manager", coalescing)
    if _MEGATRON_FSDP_BUFFERS in sys.modules:  # imported already (0.17+), with the name bound at its import
        patch(sys.modules[_MEGATRON_FSDP_BUFFERS], "_coalescing_manager", coalescing)
    mcore_random.initialize_rng_tracker(force_reset=True)

    mode = _CudaToCpu()
    mode.__enter__()
    _state["mode"] = mode
    if is_main_process():  # once per job, not once per rank
        log.warning("No CUDA device: Megatron-Core runs on CPU through dit.runtime.cpu_backend (gloo, local kernels).")
    return True


def disable() -> None:
    """Undo :func:`enable` (used by tests)."""
    if not is_active():
        return
    _state["mode"].__exit__(None, None, None)
    _state["mode"] = None
    for owner, name, value in reversed(_state["saved"].pop("patches")):
        setattr(owner, name, value)
    _state["saved"].clear()
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random.initialize_rng_tracker(force_reset=True)
