"""No silent hang: a stream in which nothing can train stops the run with one line naming the likely flag, and
a loader worker that dies stops it with one line too.

No timing asserts: a hang would show as the pytest timeout or the subprocess timeout, both generous.
"""

import os
import signal
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest

from data.loader.bad_data import BadDataError
from data.loader.dataloader import STALL_SAMPLES, stall_limit
from data.loader.task_encoder import DiTTaskEncoder
from data.report import main as report_main
from dit.errors import ConfigError
from tests.tiny_data import payloads, tiny_loader, write_dataset

ROOT = Path(__file__).resolve().parents[3]
BUFFER = 6  # tiny_loader's packing buffer: each LoadedPack brings the counts of 6 samples


@pytest.fixture(scope="module")
def oversize_dataset(tmp_path_factory):
    """12 samples of 16 and 24 tokens (latents [4, 8, 8] and [4, 2, 6, 8] at patch 2), 4 a shard."""
    entries = [(f"s{i:02d}", payloads((4, 8, 8) if i % 2 else (4, 2, 6, 8), seed=i)) for i in range(12)]
    return write_dataset(tmp_path_factory.mktemp("oversize"), entries, per_shard=4)


def test_the_limit_is_a_buffer_from_every_worker_and_never_below_the_minimum():
    assert stall_limit(200, 2) == STALL_SAMPLES
    assert stall_limit(800, 4) == 3200
    assert stall_limit(2000, 0) == 2000


@pytest.mark.slow
def test_when_no_sample_fits_the_loader_stops_naming_max_seq_length(oversize_dataset):
    with closing(tiny_loader(oversize_dataset, "--max-seq-length", "12")) as loader, pytest.raises(ConfigError) as e:
        next(loader)  # the stream repeats: without the check this would never return
    first_multiple = -(-STALL_SAMPLES // BUFFER) * BUFFER  # checked after each pack of 6
    assert e.value.flag == "--max-seq-length"
    assert str(e.value).startswith(f"--max-seq-length: none of the {first_multiple} samples read fits (")
    assert str(e.value).endswith("the longest takes 24 tokens: raise --max-seq-length")
    assert loader.stats.skipped == {"oversize": first_multiple}


@pytest.mark.slow
def test_when_every_sample_is_broken_and_the_limit_allows_it_the_loader_names_the_data(tmp_path):
    entries = [(f"s{i}", {**payloads((4, 2, 4), seed=i), "pth": b"not a zip"}) for i in range(6)]
    with closing(tiny_loader(write_dataset(tmp_path / "ds", entries), max_bad=1.0, stall_samples=60)) as loader:
        with pytest.raises(
            ConfigError,
            match=r"^--data-path: none of the 60 samples read can train: skipped 60 of 60 "
            r"read \[corrupt_member=60\]",
        ):
            next(loader)


@pytest.mark.slow
def test_a_run_that_trained_is_not_stopped_by_a_long_stretch_of_skips(tmp_path):
    """Once something trained, the stream (which repeats) will come back to it: no stall."""
    entries = [("fits", payloads((4, 2, 4)))] + [(f"long{i:02d}", payloads((4, 8, 8), seed=i)) for i in range(23)]
    with closing(
        tiny_loader(write_dataset(tmp_path / "ds", entries), "--max-seq-length", "12", stall_samples=24)
    ) as loader:  # the first epoch holds "fits"
        for _ in range(4):  # one sample fits per epoch of 24: the 4th comes in the 4th epoch
            next(loader)
    assert loader.stats.trained == 4 and loader.stats.read > 3 * 24  # ~70 skips, far past the limit of 24
    assert loader.stats.skipped == {"oversize": loader.stats.read - 4}


@pytest.mark.slow
def test_a_launch_whose_every_sample_is_oversize_stops_with_one_line(oversize_dataset):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "pretrain_dit.py"),
            "--model-size",
            "DiT-debug",
            "--latent-channels",
            "4",
            "--text-embed-dim",
            "8",
            "--max-seq-length",
            "12",
            "--num-workers",
            "0",
            "--data-path",
            str(oversize_dataset),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == (
        f"pretrain_dit.py: error: --max-seq-length: none of the 12 samples probed in {oversize_dataset} "
        "fits: they take 16 to 24 tokens in this layout; pass --max-seq-length 24 (at least 16)\n"
    )


def _cooked_or_die(encoder, crude):
    if crude["__key__"].endswith("s05"):
        os.kill(os.getpid(), signal.SIGKILL)  # a worker killed mid-read: the OOM killer's way
    return _COOKED(encoder, crude)


_COOKED = DiTTaskEncoder.cooked


@pytest.mark.slow
def test_a_loader_worker_that_dies_ends_the_run_with_one_line_within_a_minute(oversize_dataset, monkeypatch, capsys):
    monkeypatch.setattr(DiTTaskEncoder, "cooked", _cooked_or_die)  # the workers fork: they inherit it
    start = time.monotonic()
    with closing(tiny_loader(oversize_dataset, "--max-seq-length", "32", workers=2)) as loader:
        with pytest.raises(
            BadDataError,
            match=r"^a data loader worker process died \(RuntimeError: DataLoader worker "
            r"\(pid.*\bdata.report DATASET reads the dataset alone",
        ):
            for _ in range(100):
                next(loader)
    assert time.monotonic() - start < 60
    flags = ["--max-seq-length", "32", "--patch-size", "2", "--latent-channels", "4", "--text-embed-dim", "8"]
    assert report_main([str(oversize_dataset), *flags, "--num-workers", "2"]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("data.report: error: a data loader worker process died (RuntimeError: DataLoader worker (pid")
