"""Runs of consecutive samples with equal row counts: the unit of batched per-sample work on a pack.

A pack holds samples of different lengths; attention and the adaLN modulation must treat each sample on
its own. Doing that one sample at a time costs a Python step and a kernel launch per sample (and, for
slices, a full-pack gradient buffer per slice). Samples of a run instead share one reshaped view
``[count, rows, ...]``: one fused call per run. First-fit-decreasing packing puts equal lengths side by
side, so a pack of same-size images is a single run.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class SampleRun(NamedTuple):
    """``count`` consecutive samples from sample ``first`` on, each with ``rows`` rows of a tensor."""

    first: int
    count: int
    rows: int


def sample_runs(rows: list[int]) -> list[SampleRun]:
    """Group the samples (with ``rows[i]`` rows each, in order) into maximal runs of equal row counts."""
    runs: list[SampleRun] = []
    for i, n in enumerate(rows):
        if runs and runs[-1].rows == n:
            runs[-1] = runs[-1]._replace(count=runs[-1].count + 1)
        else:
            runs.append(SampleRun(i, 1, n))
    return runs


def split_rows(x: Tensor, sizes: list[int]) -> tuple[Tensor, ...]:
    """``x.split(sizes)`` along rows, ``(x,)`` for a single size. Splitting, not slicing: its backward is one
    concatenation, while each slice's backward would fill a zero tensor the size of ``x``."""
    return x.split(sizes) if len(sizes) > 1 else (x,)
