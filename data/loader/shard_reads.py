"""Shards that storage broke after ``energon prepare``: an unreadable sample becomes a counted skip.

energon reads a sample by seeking to the byte range its index recorded. When the tar was cut short
or damaged since (a copy that stopped, a bad disk), tarfile raises right there, below every error
handler energon has: the worker's generator dies and the run with it. :func:`tolerate_unreadable_shards`
wraps the dataset's tar readers so that such a read yields a crude sample that carries only the
error (under :data:`UNREADABLE`); the cooker turns it into a ``corrupt_shard`` skip, counted in its
pack like every other defect and judged by ``--max-bad-sample-fraction`` on the trainer.

A member whose header declares more bytes than the sample occupies in the shard (a GNU sparse
member declaring a TiB, a forged size) would be read into memory before any check: its sample
becomes a crude sample that carries only the reason (under :data:`TOO_LARGE`), counted as
``member_too_large``; :func:`declared_size_error` is the check, before any member is read.

Only the tar layer's read errors are caught, and only around the read: anything else is a bug and
stops the run. There is no limit on unreadable samples in a row (energon's own is 100): a shard
deleted or emptied after prepare makes every sample it held one ``corrupt_shard`` skip, however
many it held, and the run goes on with the other shards. If the whole dataset is gone, the bad
fraction limit, or the loader's check that something trains, stops the run (:mod:`data.loader.dataloader`).
"""

from __future__ import annotations

import tarfile
from typing import Any

from megatron.energon.flavors.webdataset.config import split_name_re
from megatron.energon.flavors.webdataset.sample_loader import WebdatasetSampleLoaderDataset

UNREADABLE = "__unreadable__"  # the key of a crude sample whose tar bytes did not read: the error, as text
TOO_LARGE = "__member_too_large__"  # the key of a crude sample with a member larger than its bytes: the reason
# tarfile's errors (ReadError: "unexpected end of data", bad headers), I/O errors, and energon's own
# ValueErrors of its tar reader ("Unexpected end of tar file", "Inconsistent sample base name")
READ_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError)


class TolerantTarReader:
    """An energon tar reader whose read errors become :data:`UNREADABLE` samples."""

    def __init__(self, reader: Any):
        self.reader = reader  # energon's ITarReader

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        try:
            too_large = self._declared_too_large(index)
            if too_large is None:
                return self.reader[index]
        except READ_ERRORS as e:
            return self._marker(index, UNREADABLE, f"does not read ({type(e).__name__}: {e})")
        return self._marker(index, TOO_LARGE, too_large)

    def _marker(self, index: int, key: str, reason: str) -> dict[str, Any]:
        shard, name = self._locate(index)
        return {
            "__key__": name,
            "__shard__": shard,
            "__restore_key__": ("Webdataset", index),
            "__sources__": (),
            key: f"{shard or 'its shard'} {reason}",
        }

    def _declared_too_large(self, index: int) -> str | None:
        """Why a member of the sample must not be read (it declares more than the sample's bytes), or None.
        Reads the headers only, as energon's reader then does again."""
        try:
            pointer = self.reader._get_itar_sample_pointer(index)
        except LookupError:  # a broken index: energon's own read reports it
            return None
        end = pointer.byte_offset + pointer.byte_size
        with self.reader._open_itarfile(pointer.tar_file_id) as tar:
            tar.offset = pointer.byte_offset
            while tar.offset < end and (info := tar.next()) is not None:
                reason = declared_size_error(info, end)
                if reason:
                    return reason
        return None

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
        return f"TolerantTarReader({self.reader!r})"


def declared_size_error(info: tarfile.TarInfo, end: int) -> str | None:
    """Why ``info`` must not be read when the bytes that may hold it end at ``end``, or None."""
    if info.isfile() and info.offset_data + info.size > end:
        kind = "a sparse member" if info.issparse() else "a member"
        return (
            f"holds {kind} {info.name} that declares {info.size} bytes, more than the {end - info.offset_data} "
            "bytes that follow its header; not read"
        )
    return None


def tolerate_unreadable_shards(dataset: Any) -> None:
    """Wrap the tar readers of the webdataset under ``dataset`` (a chain of energon wrappers)."""
    inner = dataset
    while not isinstance(inner, WebdatasetSampleLoaderDataset):
        if not hasattr(inner, "dataset"):
            raise TypeError(
                f"no WebdatasetSampleLoaderDataset under {dataset!r}: energon's dataset layout changed, "
                "so unreadable shards would crash the run; update data/loader/shard_reads.py"
            )
        inner = inner.dataset
    inner.join_readers = [r if isinstance(r, TolerantTarReader) else TolerantTarReader(r) for r in inner.join_readers]
