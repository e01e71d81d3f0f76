"""The launch check against the layout and the dataset: a dataset that does not match the flags says which
flag to set and to what, computed here by hand from what was written."""

import pickle

import numpy as np
import pytest
import torch

from data.loader.launch_check import PROBE_PER_SHARD, check_dataset, check_launch
from data.loader.task_encoder import DiTTaskEncoder
from data.shards import shard_name
from dit.errors import ConfigError
from dit.training.arguments import load_run_config
from tests.tiny_data import DEBUG_LAUNCH, FMT, good_entries, payloads, torch_bytes, with_members, write_dataset

FLAGS = DEBUG_LAUNCH


def launch(data, *extra):
    return check_launch(load_run_config([*FLAGS, "--data-path", str(data), *extra]))


def mistake(data, *extra) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        launch(data, *extra)
    assert "\n" not in str(e.value)
    return e.value


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """24 samples of 4 to 24 tokens, channels 4, text [1..5, 8], in 3 shards of 8."""
    return write_dataset(tmp_path_factory.mktemp("ds"), good_entries(24, seed=7))


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, flag, words",
    [
        (["--latent-channels", "16"], "--latent-channels", "have 4 channels: pass --latent-channels 4"),
        (["--text-embed-dim", "1024"], "--text-embed-dim", "are 8 wide: pass --text-embed-dim 8"),
        (["--conditioning", "class"], "--conditioning", "have no 'label' in their .json: pass --conditioning text"),
        (["--patch-size", "5"], "--patch-size", "do not divide into patches (latent height"),
    ],
)
def test_a_dataset_that_contradicts_a_flag_names_the_flag_and_the_value(dataset, extra, flag, words):
    e = mistake(dataset, *extra)
    assert e.flag == flag and words in str(e), str(e)


@pytest.mark.slow
def test_no_probed_sample_fits_max_seq_length(tmp_path):
    # 12 samples of 16 and 24 tokens (latents [4, 8, 8] and [4, 2, 6, 8] at patch 2): none fits 12
    entries = [(f"s{i}", payloads((4, 8, 8) if i % 2 else (4, 2, 6, 8), seed=i)) for i in range(12)]
    e = mistake(write_dataset(tmp_path / "ds", entries, per_shard=4), "--max-seq-length", "12")
    assert e.flag == "--max-seq-length"
    assert "they take 16 to 24 tokens in this layout; pass --max-seq-length 24 (at least 16)" in str(e)


@pytest.mark.slow
def test_text_longer_than_max_text_length(tmp_path):
    entries = [(f"s{i}", payloads((4, 2, 4), seed=i, text_len=3 + i % 3)) for i in range(6)]  # 3 to 5 rows
    e = mistake(write_dataset(tmp_path / "ds", entries), "--max-text-length", "2")
    assert e.flag == "--max-text-length" and "have 3 to 5 rows: pass --max-text-length 5" in str(e), str(e)


@pytest.mark.slow
def test_labels_outside_num_classes_name_the_count_needed(tmp_path):
    entries = [(f"s{i}", payloads((4, 2, 4), seed=i, meta={"caption": "c", "label": 10 + i})) for i in range(4)]
    e = mistake(write_dataset(tmp_path / "ds", entries), "--conditioning", "class", "--num-classes", "10")
    assert e.flag == "--num-classes" and "need --num-classes 14 (or more)" in str(e)


@pytest.mark.slow
def test_broken_samples_only_name_the_data_path(tmp_path):
    entries = [(f"s{i}", {**payloads((4, 2, 4), seed=i), "pth": b"not a zip"}) for i in range(4)]
    e = mistake(write_dataset(tmp_path / "ds", entries), "--max-seq-length", "32")
    assert e.flag == "--data-path" and "none of the 4 samples probed" in str(e) and "[corrupt_member=4]" in str(e)


@pytest.mark.slow
def test_lost_shards_pass_while_one_reads_and_fail_when_none_does(tmp_path):
    root = write_dataset(tmp_path / "ds", good_entries(24, seed=8), per_shard=8)
    (root / shard_name(0)).unlink()
    summary = launch(root).summary
    assert f"{2 * PROBE_PER_SHARD} of {2 * PROBE_PER_SHARD} samples probed could train, 1 shards unreadable" in summary
    for i in (1, 2):
        (root / shard_name(i)).write_bytes(b"")
    e = mistake(root)
    assert e.flag == "--data-path" and "none of the 3 shards probed" in str(e) and "re-copy the dataset" in str(e)


@pytest.mark.parametrize(
    "extra, words",
    [
        (
            ["--max-seq-length", "3", "--context-parallel-size", "2"],
            "3 is shorter than one patch padded for this layout (cp=2: 4 tokens); use at least 4",
        ),
        (
            ["--no-packing", "--max-seq-length", "30", "--context-parallel-size", "2"],
            "--no-packing pads every sample to 30 tokens, which must split into multiples of 4 for this layout (cp=2);"
            " use 28",
        ),
    ],
)
def test_max_seq_length_against_the_layout(dataset, extra, words):
    e = mistake(dataset, "--validate-only", "--world-size", "2", *extra)
    assert e.flag == "--max-seq-length" and words in str(e), str(e)


def test_validation_needs_a_val_split_or_a_valid_data_path(dataset):
    e = mistake(dataset, "--eval-interval", "10")
    assert e.flag == "--eval-interval" and "has no val split: pass --valid-data-path DATASET" in str(e)
    assert "--valid-data-path" in launch(dataset, "--eval-interval", "10", "--valid-data-path", str(dataset)).summary


def test_the_summary_counts_the_probed_samples(dataset):
    expected = 3 * PROBE_PER_SHARD  # 3 shards, the first samples of each
    assert f"{expected} of {expected} samples probed could train" in launch(dataset).summary


@pytest.mark.slow
def test_the_launch_line_lists_every_problem_of_the_samples_probed(tmp_path):
    files = with_members(
        json=b"[]",
        pth=torch_bytes(torch.zeros(4, 2, 4, dtype=torch.int64)),
        pickle=pickle.dumps(np.zeros((3, 7), np.float32)),
    )
    root = write_dataset(tmp_path / "ds", [(f"s{i}", files) for i in range(4)])
    with pytest.raises(ConfigError) as e:
        check_dataset(str(root), "--data-path", DiTTaskEncoder(FMT, max_seq_length=32, pad_multiple=4))
    assert e.value.flag == "--text-embed-dim"
    assert str(e.value).startswith(
        f"--text-embed-dim: the text embeddings of {root} are 7 wide: pass --text-embed-dim 7 "
        "(12 problems in the 4 samples probed [invalid_json=4, not_a_latent=4, "
        "bad_text_embedding=4]; first sample: invalid_json: not a JSON object but a list; "
        "not_a_latent: .pth holds a torch.strided torch.int64 tensor"
    ), str(e.value)
