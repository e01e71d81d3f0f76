"""A user's mistake reaches the terminal as one line: from --validate-only, and from real torchrun launches."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.loader.launch_check import check_launch
from dit.errors import ConfigError
from dit.runtime import console as launch
from dit.training.arguments import load_run_config
from tests.tiny_data import DEBUG_LAUNCH, good_entries, write_dataset

ROOT = Path(__file__).resolve().parents[2]
TINY = DEBUG_LAUNCH
TORCHRUN_LAUNCHES = (
    2  # one per mistake below; the 20 in a row of docs/command_line.md were measured by hand (command there)
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return str(write_dataset(tmp_path_factory.mktemp("ds"), good_entries(16, seed=9)))


def _run(*argv, launcher=(sys.executable,)):
    return subprocess.run(
        [*launcher, str(ROOT / "pretrain_dit.py"), *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.parametrize("rank", ["0", "1"])
def test_the_error_line_goes_to_stderr_and_into_torchruns_summary(tmp_path, monkeypatch, capsys, rank):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    monkeypatch.setattr(launch, "WAIT_S", 0.0)  # rank 1 would wait to be stopped by torchrun first
    assert launch.user_error("prog", ConfigError("--lr", "must be positive")) == 2
    assert capsys.readouterr().err == "prog: error: --lr: must be positive\n"
    message = json.loads((tmp_path / "error.json").read_text())["message"]
    assert message["extraInfo"]["py_callstack"] == "prog: error: --lr: must be positive"  # what torchrun shows


@pytest.mark.slow  # 40-85 s in the one-process tier on the loaded 2-core machine
def test_validate_only_checks_a_launch_of_n_processes_in_one_plain_process(dataset):
    ok = _run(*TINY, "--data-path", dataset, "--validate-only", "--world-size", "2")
    assert (ok.returncode, ok.stderr) == (0, "")
    assert ok.stdout.startswith(
        "pretrain_dit.py: ok: 2 processes as tp=1 pp=1 cp=1 dp=2; 2 layers of width 48; "
        f"--data-path {dataset}: 8 of 8 samples probed could train"
    )
    with pytest.raises(ConfigError, match="world size 3 is not divisible by tp\\*pp\\*cp = 2\\*1\\*1 = 2") as e:
        check_launch(
            load_run_config(
                [
                    *TINY,
                    "--data-path",
                    dataset,
                    "--validate-only",
                    "--world-size",
                    "3",
                    "--tensor-model-parallel-size",
                    "2",
                ]
            )
        )
    assert e.value.flag == "--tensor-model-parallel-size"


@pytest.mark.dist
@pytest.mark.slow
def test_a_mistaken_torchrun_launch_always_shows_the_line(dataset):
    """Rank 0 prints first, then exits; rank 1 waits until torchrun stops it (dit.runtime.console)."""
    mistakes = [
        (["--lr", "-1"], "--lr: must be a positive number, got -1.0"),
        (
            ["--latent-channels", "16"],
            f"--latent-channels: the latents of {dataset} have 4 channels: pass --latent-channels 4",
        ),
    ]
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
    for i in range(TORCHRUN_LAUNCHES):
        extra, message = mistakes[i % len(mistakes)]
        out = _run(*TINY, "--data-path", dataset, *extra, launcher=torchrun)
        line = f"pretrain_dit.py: error: {message}"
        assert out.returncode != 0
        assert out.stderr.splitlines().count(line) == 1, out.stderr  # printed by rank 0 only
        assert f"traceback : {line}" in out.stderr  # and in torchrun's failure summary, the last thing shown
