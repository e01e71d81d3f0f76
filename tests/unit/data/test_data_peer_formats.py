"""The datasets NeMo's, DFM's and Megatron-Bridge's scripts write, as written (tests/peer_writers.py): the
report, the launch check and a 2-process training run read every sample, each normalisation counted."""

from __future__ import annotations

import json
from contextlib import closing

import numpy as np
import pytest
import torch

import pretrain_dit
from data.loader.peer_formats import NORMALISATIONS
from data.report import main as report_main
from data.shards import ShardSample, encode_sample, energon_prepare, write_shard
from dit.training.main import main as train_main
from tests import peer_writers
from tests.distributed import pretrain_main, run_distributed
from tests.peer_writers import CHANNELS, FLAGS, TEXT_DIM, caption_rows
from tests.tiny_data import TINY_RUN, tiny_loader

N = 12  # samples of each format

# what each writer's samples need, by normalisation (every sample needs each one listed)
EXPECTED = {
    "NeMo DiT": {
        "doubled_dot_member_names",
        "latent_batch_dim_squeezed",
        "text_batch_dim_squeezed",
        "text_zero_padding_trimmed",
        "no_caption",
    },
    "DFM DiT": {
        "latent_batch_dim_squeezed",
        "text_batch_dim_squeezed",
        "text_zero_padding_trimmed",
        "no_caption",
        "sizes_contradict_latent",
    },
    "Wan": {"text_zero_padding_trimmed"},
    "Wan frames": {"text_zero_padding_trimmed"},
    "Flux": {"text_from_dict", "text_padding_not_zero"},
}
RECOGNISED = {"Wan frames": "Wan"}  # the writer's name in the report, where it differs


@pytest.fixture(scope="module")
def peer_datasets(tmp_path_factory):
    return {
        name: peer_writers.write(name, tmp_path_factory.mktemp(name.replace(" ", "_")), N)
        for name in peer_writers.WRITERS
    }


def _report(path, *extra, capsys):
    report_main(
        [
            str(path),
            "--json",
            "--max-seq-length",
            "64",
            "--patch-size",
            "2",
            "--num-workers",
            "0",
            "--packing-buffer-size",
            "8",
            *FLAGS,
            *extra,
        ]
    )
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(peer_writers.WRITERS))
def test_the_report_reads_every_sample_and_names_the_format_and_what_it_normalised(peer_datasets, name, capsys):
    r = _report(peer_datasets[name], capsys=capsys)
    assert (r["samples_read"], r["samples_trained"], r["samples_skipped"]) == (N, N, {})
    assert r["formats"] == {RECOGNISED.get(name, name): N}
    assert r["normalised"] == {kind: N for kind in EXPECTED[name]}


@pytest.mark.parametrize("name", list(peer_writers.WRITERS))
def test_the_launch_check_passes_with_only_the_models_own_flags(peer_datasets, name, capsys):
    status = train_main(
        pretrain_dit.HOOKS,
        [*TINY_RUN, *FLAGS, "--max-seq-length", "64", "--validate-only", "--data-path", str(peer_datasets[name])],
    )
    out = capsys.readouterr().out
    assert status == 0 and "4 of 4 samples probed could train" in out, out


def test_padding_rows_are_trimmed_to_the_caption_or_kept(peer_datasets):
    """Wan's [226, D] texts train on the caption's rows; --text-padding keep trains on all 226 (as Wan does)."""
    for extra, rows in (((), [caption_rows(i) for i in range(N)]), (("--text-padding", "keep"), [226] * N)):
        with closing(
            tiny_loader(
                peer_datasets["Wan"], *FLAGS, "--max-seq-length", "64", "--max-text-length", "512", *extra, repeat=False
            )
        ) as loader:
            lengths = {
                key.rsplit("/", 1)[-1]: n
                for pack in loader
                for key, n in zip(pack.keys, pack.cu_seqlens_text.diff().tolist())
            }
        assert [lengths[f"{i:06}"] for i in range(N)] == rows


def test_videos_without_fps_under_fps_conditioning_are_their_own_skip_and_the_launch_names_the_fix(
    peer_datasets, capsys
):
    r = _report(peer_datasets["Wan"], "--fps-conditioning", capsys=capsys)
    assert (r["samples_trained"], r["samples_skipped"]) == (0, {"missing_fps": N})
    frames = _report(peer_datasets["Wan frames"], "--fps-conditioning", capsys=capsys)  # 1-frame videos: images
    assert (frames["samples_trained"], frames["samples_skipped"]) == (N, {})
    status = train_main(
        pretrain_dit.HOOKS,
        [
            *TINY_RUN,
            *FLAGS,
            "--max-seq-length",
            "64",
            "--validate-only",
            "--fps-conditioning",
            "--data-path",
            str(peer_datasets["Wan"]),
        ],
    )
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert err.startswith(
        f"pretrain_dit.py: error: --fps-conditioning: the videos of {peer_datasets['Wan']} have no "
        "'fps' in their .json, which --fps-conditioning conditions on: drop --fps-conditioning, or "
        "add fps to the metadata"
    ), err


def _ours(out, n):
    """This recipe's own format, 16 channels: images [16, 4, 6] and videos [16, 2, 4, 4] with fps."""

    def sample(i):
        latent = torch.randn(CHANNELS, 4, 6) if i % 2 else torch.randn(CHANNELS, 2, 4, 4)
        meta = {"caption": f"ours {i}"} | ({} if i % 2 else {"fps": 16, "num_frames": 5})
        return f"ours_{i:04d}", encode_sample(ShardSample(latent, np.ones((2 + i % 3, TEXT_DIM), np.float32), meta))

    write_shard(out / "ours-000000.tar", (sample(i) for i in range(n)))


@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory):
    """Our format and every peer's in one dataset: N samples of each writer, shards side by side."""
    root = tmp_path_factory.mktemp("mixed_peers")
    for k, (name, writer) in enumerate(peer_writers.WRITERS.items()):
        (root / name.replace(" ", "_")).mkdir()
        writer(root / name.replace(" ", "_"), N, k * 100)  # keys apart: energon refuses a key seen twice
    _ours(root, N)
    energon_prepare(root)
    return root


@pytest.mark.dist
@pytest.mark.slow
def test_a_dataset_mixing_our_format_with_the_peers_trains_on_two_processes(mixed_dataset, capfd):
    iters = 6  # 2 ranks x 2 packs a step of up to 64 tokens: about 6 samples a pack, the 60 samples and more
    flags = [
        *TINY_RUN,
        *FLAGS,
        "--max-seq-length",
        "64",
        "--data-path",
        str(mixed_dataset),
        "--train-iters",
        str(iters),
        "--global-batch-size",
        "4",
        "--lr",
        "1e-3",
        "--max-bad-sample-fraction",
        "0",
    ]
    assert run_distributed(pretrain_main, 2, flags) == [0, 0]
    out = capfd.readouterr().out
    last = [line for line in out.splitlines() if f"iteration {iters:>8}/" in line][0]
    consumed = int(last.split("consumed samples:")[1].split("|")[0])
    assert consumed >= 6 * N and "bad samples: 0 |" in last, last
    for name in ("this recipe's", "NeMo DiT", "DFM DiT", "Wan", "Flux"):
        assert f" data format: {name} (" in out, out
    for warning in ("sizes_contradict_latent", "text_from_dict", "text_padding_not_zero"):
        assert sum(" data warning: " in line and NORMALISATIONS[warning] in line for line in out.splitlines()) == 1


def test_a_dict_pickle_without_the_key_names_its_keys_and_the_flag(peer_datasets, capsys):
    status = train_main(
        pretrain_dit.HOOKS,
        [
            *TINY_RUN,
            *FLAGS,
            "--max-seq-length",
            "64",
            "--validate-only",
            "--text-embedding-key",
            "t5_embeds",
            "--data-path",
            str(peer_datasets["Flux"]),
        ],
    )
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert err.startswith(
        f"pretrain_dit.py: error: --text-embedding-key: the .pickle members of {peer_datasets['Flux']} "
        "hold dicts without the text embedding's key (.pickle holds a dict of ['pooled_prompt_embeds', "
        "'prompt_embeds'], none of them --text-embedding-key 't5_embeds'): pass --text-embedding-key"
    ), err
