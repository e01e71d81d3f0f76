"""Counting host reads of device tensors (device-to-host syncs), on a GPU and on the CPU alike.

On a GPU, reading a device tensor on the host (``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)``, ``nonzero``,
``.cpu()``, a ``repeat_interleave`` without ``output_size``, a boolean-mask index, ...) makes the host wait until the
GPU has run everything queued before it, so the host can no longer run ahead of the GPU. A CPU run cannot feel
that, so :class:`HostSyncCounter` (a ``TorchFunctionMode``) records every such read of a tensor that lives, or on
a GPU would live, on the device:

- on a GPU: any CUDA tensor;
- on the CPU (``simulate=True``): tensors registered with :meth:`HostSyncCounter.on_device` (the model's
  parameters, buffers and gradient buffers, the optimizer's state), tensors moved or created with a CUDA device
  (the step then runs with ``device = cuda``, which ``dit.runtime.cpu_backend`` maps to the CPU; a move copies, as it
  would to GPU memory), and every tensor computed from one of those, whose ``.device`` then answers ``cuda``.
  Everything else is host data (the loader's packs, their layout, the draws).

Backward runs with the counter on (torch 2.13 runs ``torch.autograd.backward`` with the modes popped): reads
there, in Megatron's autograd functions or a recomputed layer, count too.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.autograd import Variable
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

if TYPE_CHECKING:
    from dit.training.pretrain import TrainingLoop

ROOT = Path(__file__).resolve().parents[2]  # the repository: sites read dit/training/step.py
_TORCH = str(Path(torch.__file__).parent)

# Reads of the tensor whatever the arguments; repeat_interleave, moves and indexing are judged by their arguments.
_READS = {
    Tensor.item: "item",
    Tensor.tolist: "tolist",
    Tensor.__bool__: "bool",
    Tensor.__int__: "int",
    Tensor.__float__: "float",
    Tensor.__index__: "index",
    Tensor.nonzero: "nonzero",
    torch.nonzero: "nonzero",
    Tensor.numpy: "numpy",
    Tensor.cpu: "cpu",
    Tensor.masked_select: "masked_select",
    torch.masked_select: "masked_select",
    Tensor.unique: "unique",
    torch.unique: "unique",
    torch.equal: "equal",
    torch.allclose: "allclose",
    Tensor.__array__: "numpy",
}


@dataclass(frozen=True)
class HostRead:
    """One host read: the op, where our code asked for it (and the library frame that did it), and whether it
    happened inside one of the counter's ``inside`` functions or during backward."""

    op: str
    site: str
    inside: bool
    backward: bool


def _is_cuda(device: Any) -> bool:
    if isinstance(device, (str, torch.device)):
        return torch.device(device).type == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)  # a bare ordinal names a CUDA device


def _is_host(device: Any) -> bool:
    return isinstance(device, (str, torch.device)) and torch.device(device).type == "cpu"


def _move_target(func: Callable, args: tuple, kwargs: dict) -> Any:
    """The device a ``Tensor.to`` / ``Tensor.cuda`` call moves to (None: not a move)."""
    if func is Tensor.cuda:
        return "cuda"
    if func is not Tensor.to:
        return None
    target = kwargs.get("device")
    if target is None and len(args) > 1 and not isinstance(args[1], torch.dtype):
        target = args[1]
    return target  # a device, or a tensor whose device it is


def _site(frame: Any) -> str:
    """``repo/file.py (function)`` of our innermost frame, with the library frame that read, if another."""
    ours = library = None
    while frame is not None and ours is None:
        name = frame.f_code.co_filename
        if name.startswith(str(ROOT)) and "site-packages" not in name and name != __file__:
            ours = frame
        elif library is None and not name.startswith(_TORCH) and name != __file__:
            library = frame
        frame = frame.f_back
    text = "?" if ours is None else _where(ours, Path(ours.f_code.co_filename).relative_to(ROOT))
    return text if library is None else f"{text} <- {_where(library, Path(library.f_code.co_filename).name)}"


def _where(frame: Any, path: Path | str) -> str:
    return f"{path} ({frame.f_code.co_name})"  # no line: the names below stay valid as the code moves


class HostSyncCounter(TorchFunctionMode):
    """Records the host reads of device tensors while it is entered (``with counter:``); see the module docstring.

    ``inside``: functions (e.g. ``DiTLayer.forward``) whose reads are flagged ``inside``, forward and recompute.
    """

    def __init__(self, simulate: bool, inside: Iterable[Callable] = ()):
        super().__init__()
        self.simulate = simulate
        self.inside: set[CodeType] = {fn.__code__ for fn in inside}
        self.reads: list[HostRead] = []
        self._device = WeakIdKeyDictionary()
        self._backward = False
        self.cuda_sync_warnings: int | None = None  # set by count_iterations on a GPU

    def on_device(self, *objects: Any) -> None:
        """Mark what would live on the GPU: tensors, modules (parameters, buffers, ``main_grad``, Megatron DDP's
        buffers) and optimizers (parameters and state; not torch's ``step`` counts, which stay on the host)."""
        for obj in objects:
            for tensor in _device_tensors(obj):
                self._device[tensor] = True

    def is_device(self, t: Tensor) -> bool:
        if not self.simulate:
            return t.device.type == "cuda"
        return t in self._device or (t._base is not None and t._base in self._device)

    def by_site(self, **where: bool) -> Counter[str]:
        """``op at site`` -> count, over the reads whose flags (``inside``, ``backward``) match ``where``."""
        return Counter(f"{r.op} at {r.site}" for r in self.reads if all(getattr(r, k) == v for k, v in where.items()))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.autograd.backward:
            return self._run_backward(*args, **kwargs)
        if self.simulate and getattr(func, "__self__", None) is Tensor.device and self.is_device(args[0]):
            return torch.device("cuda")  # so that ``.to(x.device)`` and ``device=x.device`` ask for the device
        from_device = any(self.is_device(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor))
        target = _move_target(func, args, kwargs)
        if isinstance(target, Tensor):  # ``.to(other)``: other's device, as the counter sees it
            target = "cuda" if self.is_device(target) else target.device
        op = self._read(func, args, kwargs, from_device, target)
        if op is not None:
            self._record(op)
        out = func(*args, **kwargs)
        if self.simulate:
            to_device = _is_cuda(target) or _is_cuda(kwargs.get("device"))
            if to_device and isinstance(out, Tensor) and args and out is args[0]:
                out = out.clone()  # GPU memory is not the host tensor's (the CPU backend returns it as is)
            if to_device or (from_device and not _is_host(target) and func is not Tensor.cpu):
                for t in tree_flatten(out)[0]:
                    if isinstance(t, Tensor):
                        self._device[t] = True
        return out

    def _read(self, func: Callable, args: tuple, kwargs: dict, from_device: bool, target: Any) -> str | None:
        """The kind of host read ``func`` makes of a device tensor, or None."""
        if func in _READS:
            return _READS[func] if from_device else None
        if func in (torch.tensor, torch.as_tensor) and from_device:
            return "torch.tensor of device tensors"  # one read per element
        if func in (torch.repeat_interleave, Tensor.repeat_interleave):
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats", args[0] if args else None)
            sized = kwargs.get("output_size") is not None
            return (
                "repeat_interleave without output_size"
                if (isinstance(repeats, Tensor) and self.is_device(repeats) and not sized)
                else None
            )
        if target is not None:
            return "copy to host" if from_device and _is_host(target) else None
        if func in (Tensor.__getitem__, Tensor.__setitem__) and from_device:
            index = tree_flatten(args[1])[0] if len(args) > 1 else []
            masks = [i for i in index if isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8)]
            return "boolean-mask index" if masks else None
        return None

    def _record(self, op: str) -> None:
        frame = sys._getframe(1)
        inside = False
        probe: FrameType | None = frame
        while probe is not None and not inside:
            inside, probe = probe.f_code in self.inside, probe.f_back
        self.reads.append(HostRead(op, _site(frame), inside, self._backward))

    def _run_backward(
        self,
        tensors: Tensor | tuple[Tensor, ...],
        grad_tensors: Any = None,
        retain_graph: bool | None = None,
        create_graph: bool = False,
        inputs: Any = None,
    ) -> None:
        """``torch.autograd.backward`` with this mode on, through the engine call Megatron's ``custom_backward``
        makes (calling ``torch.autograd.backward`` again would reach the modes and run with them popped)."""
        tensors = (tensors,) if isinstance(tensors, Tensor) else tuple(tensors)
        grads = grad_tensors if isinstance(grad_tensors, (tuple, list)) else (grad_tensors,) * len(tensors)
        grads = tuple(torch.ones_like(t) if g is None else g for t, g in zip(tensors, grads))
        inputs = () if inputs is None else ((inputs,) if isinstance(inputs, Tensor) else tuple(inputs))
        self._backward = True
        try:
            with self:
                Variable._execution_engine.run_backward(
                    tensors,
                    grads,
                    create_graph if retain_graph is None else retain_graph,
                    create_graph,
                    inputs,
                    allow_unreachable=True,
                    accumulate_grad=True,
                )
        finally:
            self._backward = False


def _device_tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
        return
    if isinstance(obj, nn.Module):
        for param in obj.parameters():
            yield param
            if getattr(param, "main_grad", None) is not None:
                yield param.main_grad  # type: ignore[attr-defined]  # Megatron's DDP attaches it at run time
        yield from nn.Module.buffers(obj)  # Megatron's DDP shadows the method with a list
        for module in obj.modules():  # Megatron's DDP keeps its flat parameter and gradient buffers in a list
            flat = getattr(module, "buffers", None)
            for buffer in flat if isinstance(flat, list) else ():
                yield from (t for t in (buffer.param_data, buffer.grad_data) if t is not None)
        return
    for chained in getattr(obj, "chained_optimizers", [obj]):  # a Megatron optimizer, or a torch one
        inner = getattr(chained, "optimizer", chained)
        for group in inner.param_groups:
            yield from group["params"]
        for state in inner.state.values():
            yield from (v for k, v in state.items() if isinstance(v, Tensor) and k != "step")


def count_iterations(loop: TrainingLoop, steps: int) -> HostSyncCounter:
    """Run ``steps`` iterations of the training loop under a counter whose ``inside`` is ``DiTLayer.forward``.

    Without a GPU the iterations run as on one (``simulate``): the step's device is ``cuda``, which
    ``dit.runtime.cpu_backend`` maps to the CPU, and the model, the optimizer and the EMA are registered as device
    tensors.
    On a GPU, CUDA's own count comes too (``cuda_sync_warnings``: ``torch.cuda.set_sync_debug_mode("warn")``
    also sees syncs no Python call shows, such as blocking copies from pageable host memory).
    """
    from dit.model.layer_spec import DiTLayer

    simulate = not torch.cuda.is_available()
    counter = HostSyncCounter(simulate, inside=[DiTLayer.forward])
    counter.on_device(*loop.setup.model, loop.setup.optimizer, *(loop.ema.buffers if loop.ema else ()))
    saved = loop.setup.device, loop.exits.device
    if simulate:
        loop.setup.device = loop.exits.device = torch.device("cuda")
    try:
        with counter, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if not simulate:
                torch.cuda.set_sync_debug_mode("warn")
            for _ in range(steps):
                loop.iterate()
    finally:
        if not simulate:
            torch.cuda.set_sync_debug_mode("default")
        loop.setup.device, loop.exits.device = saved
    if not simulate:
        counter.cuda_sync_warnings = sum("synchronizing CUDA operation" in str(w.message) for w in caught)
    return counter
