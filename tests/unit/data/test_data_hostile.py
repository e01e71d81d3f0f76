"""Shards are untrusted input: hostile and broken samples and lost shards, on real datasets through the loader.

Each one must be counted exactly (by kind, against a hand count of what was written), nothing in a
shard may run, nothing may crash, and every other sample must train.
"""

import tarfile
from collections import Counter
from contextlib import closing
from pathlib import Path

import pytest

from data.loader.bad_data import SkipKind
from data.loader.launch_check import check_dataset
from data.loader.sample import DiffusionSample, EncodedSample, SkippedSample
from data.loader.task_encoder import DiTTaskEncoder
from data.shards import energon_prepare, shard_name
from tests.tiny_data import (
    FMT,
    HOSTILE_FLAGS,
    HOSTILE_FMT,
    crude,
    cut_shard,
    good_entries,
    hostile,
    tiny_loader,
    write_dataset,
    write_shard_with_sparse_member,
)

PER_SHARD = 8
LOST = 1  # the shard deleted after prepare


@pytest.mark.slow
@pytest.mark.parametrize("name", list(hostile(Path("markers"))))
def test_each_hostile_sample_is_its_own_kind_of_skip_or_trains(tmp_path, name):
    files, kind = hostile(tmp_path)[name]
    encoder = DiTTaskEncoder(HOSTILE_FMT, max_seq_length=32, pad_multiple=4)
    cooked = encoder.cook(crude(files))
    result = encoder.postencode_sample(cooked) if isinstance(cooked, DiffusionSample) else cooked
    if kind is None:
        assert isinstance(result, EncodedSample), result
    else:
        assert isinstance(result, SkippedSample) and result.kind == kind, result
    assert list(tmp_path.iterdir()) == []  # no pickle ran its code


@pytest.fixture(scope="module")
def hostile_dataset(tmp_path_factory):
    """Every hostile sample among 4 more good samples than there are hostile ones, 8 a shard; shard 1 deleted after
    prepare.

    Returns the dataset, the folder the pickles' code would write into, and the entries as written."""
    markers = tmp_path_factory.mktemp("markers")
    cases = hostile(markers)
    good = good_entries(len(cases) + 4, seed=5, fps=24)  # HOSTILE_FLAGS condition on fps
    odd = [(f"case_{i:02d}", files) for i, (files, _) in enumerate(cases.values())]
    entries = [e for pair in zip(good, odd) for e in pair] + good[len(odd) :]
    root = write_dataset(tmp_path_factory.mktemp("hostile"), entries, per_shard=PER_SHARD)
    (root / shard_name(LOST)).unlink()
    return root, markers, entries, list(cases.values())


@pytest.mark.slow
def test_hostile_shards_are_counted_exactly_nothing_runs_and_the_rest_trains(hostile_dataset):
    root, markers, entries, cases = hostile_dataset
    lost = {key for key, _ in entries[LOST * PER_SHARD : (LOST + 1) * PER_SHARD]}
    kinds = {f"case_{i:02d}": kind for i, (_, kind) in enumerate(cases)}
    expected_trained = sorted(key for key, _ in entries if key not in lost and kinds.get(key) is None)
    expected_skips = Counter(kinds[key].value for key, _ in entries if key in kinds and key not in lost and kinds[key])
    expected_skips[SkipKind.CORRUPT_SHARD.value] = len(lost)

    with closing(tiny_loader(root, *HOSTILE_FLAGS, workers=2, repeat=False)) as loader:
        keys = [k for pack in loader for k in pack.keys]
    assert sorted(k.rsplit("/", 1)[-1] for k in keys) == expected_trained  # each once, no other
    assert loader.stats.skipped == dict(expected_skips)
    assert (loader.stats.read, loader.stats.trained) == (len(entries), len(expected_trained))
    assert list(markers.iterdir()) == []  # the pickles' commands never ran, in any worker


@pytest.mark.slow  # 40-85 s in the one-process tier on the loaded 2-core machine
def test_a_packing_buffer_of_only_broken_samples_is_counted_exactly(tmp_path):
    """Shard 1 cut to nothing after prepare: its 8 samples in a row exceed the buffer of 4, so at least one
    buffer holds only markers; energon drops samples that no pack holds, so that pack must still come."""
    root = write_dataset(tmp_path / "ds", good_entries(24, seed=6), per_shard=8)
    lost = cut_shard(root / shard_name(1), keep=0.0)
    assert len(lost) == 8
    with closing(tiny_loader(root, "--packing-buffer-size", "4", repeat=False)) as loader:
        packs = list(loader.loader)  # energon's LoadedPacks, the empty ones included
    empty = [p for p in packs if p.batch is None]
    assert empty and all(p.stats.read == 4 and p.stats.skipped == {"corrupt_shard": 4} for p in empty)
    assert sum(p.stats.read for p in packs) == 24
    assert sum(p.stats.trained for p in packs) == 16
    assert sum(p.stats.skipped.get("corrupt_shard", 0) for p in packs) == 8


@pytest.mark.slow  # 40-85 s in the one-process tier on the loaded 2-core machine
def test_a_sparse_tar_member_declaring_a_tib_is_counted_unread(tmp_path):
    """A GNU sparse member's header can declare a TiB in 512 bytes: read, it is allocated in full (MemoryError
    in the worker). Its declared size is checked against the bytes its sample occupies before any read."""
    entries = good_entries(8, seed=7)
    root = tmp_path / "ds"
    root.mkdir()
    write_shard_with_sparse_member(root / shard_name(0), entries, "good_0003", "pickle", declared=2**40)
    with tarfile.open(root / shard_name(0)) as tar:  # what tarfile (and so energon's reader) would read
        assert tar.getmember("samples/good_0003.pickle").size == 2**40
    energon_prepare(root)
    with closing(tiny_loader(root, workers=2, repeat=False)) as loader:
        keys = sorted(k.rsplit("/", 1)[-1] for pack in loader for k in pack.keys)
    assert keys == [key for key, _ in entries if key != "good_0003"]
    assert loader.stats.skipped == {"member_too_large": 1}
    assert "declares 1099511627776 bytes" in loader.stats.examples[0].detail
    summary = check_dataset(str(root), "--data-path", DiTTaskEncoder(FMT, max_seq_length=32, pad_multiple=4))
    assert summary.endswith("could train, skipped {'member_too_large': 1}")
