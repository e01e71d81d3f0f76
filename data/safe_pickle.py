"""Unpickling a shard's ``.pickle`` member without running anything it names.

A pickle is a small program: each global it references is imported and may be called, so a plain
``pickle.loads`` of a crafted file runs its author's code (``os.system`` through ``__reduce__``) in
the loader workers. :func:`loads` admits only the globals a pickled numpy array or torch tensor
needs; any other is refused before it is imported, and the sample becomes a counted skip.

A torch tensor pickles its storage as ``torch.storage._load_from_bytes(torch.save bytes)``, which
calls ``torch.load(weights_only=False)``: that one global is replaced by a ``weights_only`` load. A process
that imported megatron-core 0.17 or later pickles it as ``megatron.core.safe_globals.safe_load_from_bytes``
(Megatron swaps torch's function for its own ``weights_only`` one): the same bytes, replaced the same way.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, Callable

import torch


def _storage_from_bytes(payload: bytes) -> Any:
    return torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")


# the globals a pickled numpy array or torch tensor references (numpy 1 wrote `numpy.core`, numpy 2 `numpy._core`)
ALLOWED = frozenset({
    *((core + ".multiarray", "_reconstruct") for core in ("numpy.core", "numpy._core")),
    *((core + ".numeric", "_frombuffer") for core in ("numpy.core", "numpy._core")),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # protocol 2 stores bytes as latin-1 text
    ("torch._utils", "_rebuild_tensor_v2"),
    ("collections", "OrderedDict"),  # a tensor's (empty) backward hooks
})
REPLACED: dict[tuple[str, str], Callable[[bytes], Any]] = {
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("megatron.core.safe_globals", "safe_load_from_bytes"): _storage_from_bytes,
}


class UnsafePickle(pickle.UnpicklingError):
    """The pickle references a global that array data never needs; ``name`` is that global."""

    def __init__(self, name: str):
        super().__init__(f"{name} is not allowed")
        self.name = name


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in REPLACED:
            return REPLACED[module, name]
        if (module, name) not in ALLOWED:
            raise UnsafePickle(f"{module}.{name}")
        return super().find_class(module, name)


def loads(payload: bytes) -> Any:
    """The object of a pickle made of numpy arrays, torch tensors and plain containers only."""
    return _Unpickler(io.BytesIO(payload)).load()
