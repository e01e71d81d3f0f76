"""The packing report against hand counts, and the synthetic dataset's shapes."""

import io
import json
import subprocess
import sys
from collections import Counter

import pytest
import torch
from megatron.energon import stateless

from data.loader.dataloader import build_task_encoder, energon_loader
from data.loader.packing import padded_length
from data.loader.rank_split import RankPlace
from data.loader.sample import sample_key
from data.loader.task_encoder import DiTTaskEncoder
from data.report import histogram, main, read_order, simulated_efficiency
from data.shards import shard_name
from data.synthetic import synthetic_samples, write_synthetic
from dit.training.arguments import load_run_config
from tests.tiny_data import DATA_FLAGS, DEFECTS, GOOD, good_entries


def _tokens(files):
    latent = torch.load(io.BytesIO(files["pth"]))
    t = latent.shape[1] if latent.dim() == 4 else 1
    return t * latent.shape[-2] * latent.shape[-1] // 4


def test_report_json_matches_hand_counts(mixed_dataset, capsys):
    main(
        [
            str(mixed_dataset),
            "--json",
            *DATA_FLAGS,
            "--context-parallel-size",
            "2",
            "--num-workers",
            "0",
        ]
    )
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


def test_report_simulates_the_buffer_windows_of_the_stream_as_read(truncated_dataset, capsys):
    """Simulated over the same windows as energon's packing buffer (each worker's read order, a
    skipped sample holding its slot), our own padding must give exactly the packs the loader built."""
    main(
        [
            str(truncated_dataset[0]),
            "--json",
            *DATA_FLAGS,
            "--context-parallel-size",
            "2",
            "--num-workers",
            "2",
        ]
    )
    r = json.loads(capsys.readouterr().out)
    assert r["samples_skipped"] == {"corrupt_shard": len(truncated_dataset[1])}
    assert r["comparison"]["this_recipe_simulated"] == r["packing_efficiency"]


def test_packs_carry_each_samples_place_in_the_read_order(mixed_dataset, monkeypatch):
    """The report's stream is the order the cooker read samples in, not the packs' (sorted) order."""
    read = []
    cook = DiTTaskEncoder.cook

    @stateless
    def recording_cook(self, crude):
        read.append(sample_key(crude))
        return cook(self, crude)

    monkeypatch.setattr(DiTTaskEncoder, "cook", recording_cook)
    run = load_run_config(
        ["--max-seq-length", "32", "--patch-size", "2", "--latent-channels", "4", "--text-embed-dim", "8"],
        need_data=False,
    )
    loader = energon_loader(
        mixed_dataset,
        build_task_encoder(run.model, run.data, 4),
        RankPlace(),
        num_workers=0,
        seed=3,
        packing_buffer_size=6,
        micro_batch_size=1,
        repeat=False,
    )
    packs = [item for item in loader if item.batch is not None]
    assert all(item.read_indices == [read.index(k) for k in item.batch.keys] for item in packs)
    in_pack_order = [i for item in packs for i in item.read_indices]
    assert sorted(in_pack_order) != in_pack_order  # the packer reorders: pack order is not the stream


def test_simulated_efficiency_and_histogram_by_hand():
    # multiple 4: 5 -> 8, 3 -> 4, 6 -> 8, 9 -> 12; windows of 2: [8, 4] -> 1 pack, [8, 12] -> 2 packs
    one_worker = [(0, place, n) for place, n in enumerate([5, 3, 6, 9])]
    assert simulated_efficiency(one_worker, multiple=4, buffer_size=2, max_seq_length=16) == 23 / (3 * 16)
    # two workers: each its own windows; worker 0's place 1 was skipped but held its slot
    reads = [(0, 0, 5), (0, 2, 6), (0, 3, 9), (1, 0, 3), (1, 1, 3)]  # windows [8], [8, 12], [4, 4] -> 1 + 2 + 1
    assert simulated_efficiency(reads, multiple=4, buffer_size=2, max_seq_length=16) == 26 / (4 * 16)
    assert read_order([0, 3, 4, 7], [5, 6, 9, 3], num_workers=2) == [(0, 0, 5), (1, 1, 6), (0, 2, 9), (1, 3, 3)]
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
            assert meta["image_height"] in (256, 512) and s.latent.shape == (
                16,
                meta["image_height"] // 8,
                meta["image_width"] // 8,
            )


def _report(*argv):
    return subprocess.run([sys.executable, "-m", "data.report", *argv], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("mistake", ["missing dataset", "missing --config"])
def test_user_mistakes_are_one_line_naming_the_flag_and_exit_2(tmp_path, mixed_dataset, mistake):
    if mistake == "missing dataset":
        result, flag = _report(str(tmp_path / "nowhere"), "--max-seq-length", "32"), "DATASET"
    else:
        result, flag = _report(str(mixed_dataset), "--config", str(tmp_path / "nope.yaml")), "--config"
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"data.report: error: {flag}: ") and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.slow  # 40-85 s in the one-process tier on the loaded 2-core machine
def test_report_shows_no_library_warnings_and_names_itself_in_flag_mistakes(mixed_dataset):
    ok = _report(
        str(mixed_dataset),
        *DATA_FLAGS,
    )
    assert ok.returncode == 0 and "samples read" in ok.stdout
    assert "Warning" not in ok.stderr and "Transformer Engine" not in ok.stderr, ok.stderr
    bad = _report(str(mixed_dataset), "--lr", "fast")
    assert (bad.returncode, bad.stderr) == (2, "data.report: error: --lr: invalid float value: 'fast'\n")


def test_a_folder_that_energon_never_prepared_is_a_user_mistake(tmp_path, capsys):
    assert main([str(tmp_path), "--max-seq-length", "32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("data.report: error: DATASET: ") and "energon prepare" in err and err.count("\n") == 1
