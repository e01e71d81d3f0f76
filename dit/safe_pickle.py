"""Unpickling a shard's ``.pickle`` member without running anything it names.

A pickle is a small program: each global it references is imported and may be called, so a plain
``pickle.loads`` of a crafted file runs its author's code (``os.system`` through ``__reduce__``) in
the loader workers. :func:`loads` admits only the named globals a pickled numpy array or torch
tensor needs, never a whole module (numpy's testing helpers reach ``exec``); any other is refused
before it is imported, and the sample becomes a counted skip.

Two admitted globals are replaced, because what they would do with a crafted argument is costly:

- A torch tensor pickles its storage as ``torch.storage._load_from_bytes(torch.save bytes)``, which
  calls ``torch.load(weights_only=False)``: replaced by :func:`torch_load`, a ``weights_only`` load
  that first checks the sizes the bytes declare (a deflate bomb declares far more than it holds).
  A process that imported megatron-core 0.17 or later pickles it as
  ``megatron.core.safe_globals.safe_load_from_bytes`` (Megatron swaps torch's function for its own
  ``weights_only`` one): the same bytes, replaced the same way.
- Protocol 2 stores bytes as ``_codecs.encode(text, "latin1")``; other codecs are refused (punycode
  takes minutes on a few kilobytes).
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections.abc import Callable
from typing import Any

import torch


class UnsafePickle(pickle.UnpicklingError):
    """The pickle references a global that array data never needs; ``name`` is that global."""

    def __init__(self, name: str):
        super().__init__(f"{name} is not allowed")
        self.name = name


class DeclaredTooLarge(ValueError):
    """``torch.save`` bytes whose entries declare more bytes than the payload holds (compressed)."""


def torch_load(payload: bytes, map_location: str = "cpu") -> Any:
    """``torch.load(weights_only=True)``, detached, after checking that no entry of the archive declares
    more bytes than the payload has: ``torch.save`` stores entries uncompressed, so only a crafted
    archive (a deflate bomb) can, and it would be inflated before any other check."""
    if zipfile.is_zipfile(io.BytesIO(payload)):
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            largest = max((info.file_size for info in archive.infolist()), default=0)
        if largest > len(payload):
            raise DeclaredTooLarge(f"an entry declares {largest} bytes in a payload of {len(payload)}")
    value = torch.load(io.BytesIO(payload), weights_only=True, map_location=map_location)
    return value.detach() if isinstance(value, torch.Tensor) else value  # saved with requires_grad: unsendable


def _latin1(text: str, encoding: str) -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise UnsafePickle(f"_codecs.encode(..., {encoding!r})")
    return text.encode("latin1")


# the globals a pickled numpy array or torch tensor references (numpy 1 wrote `numpy.core`, numpy 2 `numpy._core`)
ALLOWED = frozenset(
    {
        *((core + ".multiarray", "_reconstruct") for core in ("numpy.core", "numpy._core")),
        *((core + ".numeric", "_frombuffer") for core in ("numpy.core", "numpy._core")),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("collections", "OrderedDict"),  # a tensor's (empty) backward hooks
    }
)
REPLACED: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch.storage", "_load_from_bytes"): torch_load,
    ("megatron.core.safe_globals", "safe_load_from_bytes"): torch_load,
    ("_codecs", "encode"): _latin1,
}


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
