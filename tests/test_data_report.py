"""The packing report against hand counts, and the synthetic dataset's shapes."""

import io
import json
import subprocess
import sys
from collections import Counter

import pytest
import torch

from data.packing import padded_length
from data.report import histogram, main, simulated_efficiency
from data.shards import shard_name
from data.synthetic import synthetic_samples, write_synthetic
from tests.tiny_data import DEFECTS, GOOD, good_entries, mixed_dataset  # noqa: F401 (a fixture)


def _tokens(files):
    latent = torch.load(io.BytesIO(files["pth"]))
    t = latent.shape[1] if latent.dim() == 4 else 1
    return t * latent.shape[-2] * latent.shape[-1] // 4


def test_report_json_matches_hand_counts(mixed_dataset, capsys):
    main([str(mixed_dataset), "--json", "--max-seq-length", "32", "--patch-size", "2", "--temporal-patch-size", "1",
          "--context-parallel-size", "2", "--latent-channels", "4", "--text-embed-dim", "8",
          "--packing-buffer-size", "6", "--num-workers", "0"])
    r = json.loads(capsys.readouterr().out)
    lengths = [_tokens(files) for _, files in good_entries(GOOD, seed=1)]
    assert r["samples_read"] == GOOD + len(DEFECTS) and r["samples_trained"] == GOOD
    assert r["samples_skipped"] == dict(Counter(kind.value for _, kind in DEFECTS.values()))
    assert r["real_tokens"] == sum(lengths)
    assert r["padded_tokens"] == sum(padded_length(n, 4) for n in lengths)  # cp=2: multiples of 4
    assert r["layout"]["pad_multiple"] == 4
    assert r["packing_efficiency"] == sum(lengths) / (r["packs"] * 32)
    assert r["alignment_padding_fraction"] == (r["padded_tokens"] - r["real_tokens"]) / r["padded_tokens"]
    assert sum(r["length_histogram"].values()) == GOOD
    assert r["comparison"]["nemo_pad_to_max_unpacked"] == sum(lengths) / (GOOD * 32)
    assert r["loader_tokens_per_s"] > 0


def test_simulated_efficiency_and_histogram_by_hand():
    # multiple 4: 5 -> 8, 3 -> 4, 6 -> 8, 9 -> 12; windows of 2: [8, 4] -> 1 pack, [8, 12] -> 2 packs
    assert simulated_efficiency([5, 3, 6, 9], multiple=4, buffer_size=2, max_seq_length=16) == 23 / (3 * 16)
    assert histogram([1, 2, 3, 4, 8, 9, 16], 16, bins=3) == {"1-4": 4, "5-8": 1, "9-16": 2}


def test_synthetic_shapes(tmp_path):
    write_synthetic(tmp_path, samples=12, video_fraction=0.5, seed=1, samples_per_shard=5, text_embed_dim=16)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [shard_name(i) for i in range(3)]
    for _, s in synthetic_samples(12, 0.5, 1, text_embed_dim=16):
        meta = s.metadata
        assert s.latent.dtype == torch.bfloat16 and s.latent.shape[0] == 16 and s.text_embedding.shape[1] == 16
        if "num_frames" in meta:
            assert s.latent.shape == (16, (meta["num_frames"] - 1) // 4 + 1, meta["height"] // 8, meta["width"] // 8)
            assert 17 <= meta["num_frames"] <= 121
        else:
            assert meta["image_height"] in (256, 512) and s.latent.shape == (16, meta["image_height"] // 8,
                                                                             meta["image_width"] // 8)


def _report(*argv):
    return subprocess.run([sys.executable, "-m", "data.report", *argv], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("mistake", ["missing dataset", "missing --config"])
def test_user_mistakes_are_one_line_naming_the_flag_and_exit_2(tmp_path, mixed_dataset, mistake):
    if mistake == "missing dataset":
        result, flag = _report(str(tmp_path / "nowhere"), "--max-seq-length", "32"), "DATASET"
    else:
        result, flag = _report(str(mixed_dataset), "--config", str(tmp_path / "nope.yaml")), "--config"
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"data.report: error: {flag}: ") and result.stderr.count("\n") == 1, result.stderr


def test_a_folder_that_energon_never_prepared_is_a_user_mistake(tmp_path, capsys):
    assert main([str(tmp_path), "--max-seq-length", "32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("data.report: error: DATASET: ") and "energon prepare" in err and err.count("\n") == 1
