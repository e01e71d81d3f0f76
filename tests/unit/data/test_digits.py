"""The quick-start dataset: real digits in the shard format, resumable, readable by energon."""

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from data.digits import write_digits
from data.shards import shard_name


def _members(data: bytes) -> dict:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.mark.slow
def test_digits_shards_hold_the_images_captions_and_word_embeddings(tmp_path):
    assert write_digits(tmp_path, text_embed_dim=8, samples_per_shard=600) == 1797
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [shard_name(i) for i in range(3)]  # 600 + 600 + 597
    assert (tmp_path / ".nv-meta" / "dataset.yaml").exists()
    members = _members((tmp_path / shard_name(0)).read_bytes())
    assert len(members) == 3 * 600
    digits = load_digits()
    for i in (0, 7):
        key = f"samples/digit_{i:05d}"
        latent = torch.load(io.BytesIO(members[key + ".pth"]))
        meta = json.loads(members[key + ".json"])
        assert latent.shape == (1, 8, 8) and latent.min() >= -1 and latent.max() <= 1
        torch.testing.assert_close(latent[0], torch.from_numpy(digits.images[i] / 8.0 - 1.0).float())
        assert meta["label"] == digits.target[i] and meta["caption"].startswith("a handwritten digit ")
    a = pickle.loads(members["samples/digit_00000.pickle"])  # digit 0
    b = pickle.loads(members["samples/digit_00001.pickle"])  # digit 1
    assert a.shape == b.shape == (4, 8)
    np.testing.assert_array_equal(a[:3], b[:3])  # "a handwritten digit" embeds the same
    assert not np.array_equal(a[3], b[3])  # the digit's own word differs


@pytest.mark.slow
def test_rerun_rewrites_only_missing_shards(tmp_path):
    write_digits(tmp_path, text_embed_dim=8, samples_per_shard=900)
    first, second = tmp_path / shard_name(0), tmp_path / shard_name(1)
    before = first.stat().st_mtime_ns
    original = second.read_bytes()
    second.unlink()
    (tmp_path / (shard_name(1) + ".partial")).write_bytes(b"half")  # a crash mid-write leaves this
    write_digits(tmp_path, text_embed_dim=8, samples_per_shard=900)
    assert first.stat().st_mtime_ns == before
    assert _members(second.read_bytes()) == _members(original)  # same samples, same bytes
