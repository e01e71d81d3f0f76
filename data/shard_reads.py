"""Shards that storage broke after ``energon prepare``: an unreadable sample becomes a counted skip.

energon reads a sample by seeking to the byte range its index recorded. When the tar was cut short
or damaged since (a copy that stopped, a bad disk), tarfile raises right there, below every error
handler energon has: the worker's generator dies and the run with it. :func:`tolerate_unreadable_shards`
wraps the dataset's tar readers so that such a read yields a crude sample that carries only the
error (under :data:`UNREADABLE`); the cooker turns it into a ``corrupt_shard`` skip, counted in its
pack like every other defect and judged by ``--max-bad-sample-fraction`` on the trainer.

Only the tar layer's read errors are caught, and only around the read: anything else is a bug and
stops the run. Like energon's own error handling, ``tolerance`` unreadable samples in a row in one
worker raise :class:`FatalSampleError`: then the dataset is gone, not damaged.
"""

from __future__ import annotations

import tarfile
from typing import Any

from megatron.energon.errors import FatalSampleError
from megatron.energon.flavors.webdataset.config import split_name_re
from megatron.energon.flavors.webdataset.sample_loader import WebdatasetSampleLoaderDataset

UNREADABLE = "__unreadable__"  # the key of a crude sample whose tar bytes did not read: the error, as text
# tarfile's errors (ReadError: "unexpected end of data", bad headers), I/O errors, and energon's own
# ValueErrors of its tar reader ("Unexpected end of tar file", "Inconsistent sample base name")
READ_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError)


class TolerantTarReader:
    """An energon tar reader whose read errors become :data:`UNREADABLE` samples."""

    def __init__(self, reader: Any, tolerance: int):
        self.reader = reader  # energon's ITarReader
        self.tolerance = tolerance  # unreadable samples in a row before the run stops; 0: never
        self._in_a_row = 0

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        try:
            sample = self.reader[index]
        except READ_ERRORS as e:
            self._in_a_row += 1
            shard, name = self._locate(index)
            if self.tolerance and self._in_a_row >= self.tolerance:
                raise FatalSampleError(
                    f"{self._in_a_row} samples in a row did not read from their shards (last: {shard}/{name}: "
                    f"{type(e).__name__}: {e}); the dataset's files no longer match its index: re-copy them, "
                    "or run `energon prepare` again") from e
            return {"__key__": name, "__shard__": shard, "__restore_key__": ("Webdataset", index),
                    "__sources__": (), UNREADABLE: f"{shard or 'its shard'} does not read ({type(e).__name__}: {e})"}
        self._in_a_row = 0
        return sample

    def _locate(self, index: int) -> tuple[str, str]:
        """The shard and sample name of an unreadable sample: the name from its first tar header
        where that still reads, else its byte offset in the shard (``@OFFSET``)."""
        try:
            pointer = self.reader._get_itar_sample_pointer(index)
            shard = self.reader.tar_filenames[pointer.tar_file_id]
        except (*READ_ERRORS, LookupError):  # the index itself is broken
            return "", f"#{index}"
        try:
            with self.reader._open_itarfile(pointer.tar_file_id) as tar:
                tar.offset = pointer.byte_offset
                info = tar.next()
            return shard, split_name_re.match(info.name).group(1)
        except (*READ_ERRORS, AttributeError):  # AttributeError: no header (None) or a name without extension
            return shard, f"@{pointer.byte_offset}"

    def __repr__(self) -> str:
        return f"TolerantTarReader({self.reader!r}, tolerance={self.tolerance})"


def tolerate_unreadable_shards(dataset: Any, tolerance: int) -> None:
    """Wrap the tar readers of the webdataset under ``dataset`` (a chain of energon wrappers)."""
    inner = dataset
    while not isinstance(inner, WebdatasetSampleLoaderDataset):
        if not hasattr(inner, "dataset"):
            raise TypeError(f"no WebdatasetSampleLoaderDataset under {dataset!r}: energon's dataset layout changed, "
                            "so unreadable shards would crash the run; update data/shard_reads.py")
        inner = inner.dataset
    inner.join_readers = [r if isinstance(r, TolerantTarReader) else TolerantTarReader(r, tolerance)
                          for r in inner.join_readers]
