"""What examples/ ships: every recipe of examples/configs/ passes pretrain_dit.py's launch check at the world
size its header declares, against a real energon dataset of its latent channels and text width; a layout
the world size does not fit fails with the one line; every launcher fails fast on a missing variable, naming
it, and shows the command it launches (torchrun, srun and scontrol are fakes that record their arguments;
the launch check before them is the real one)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import pretrain_dit
from dit.training.main import main
from tests.launch import ROOT
from tests.tiny_data import payloads, write_dataset

CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
LAUNCHERS = ["train_single_node.sh", "train_multi_node.sh", "train_slurm.sbatch", "prepare_dataset.sh", "generate.sh"]
REQUIRED = {  # the variables each launcher cannot run without
    "train_single_node.sh": ["DATA"],
    "train_multi_node.sh": ["NNODES", "NODE_RANK", "MASTER_ADDR", "DATA", "SAVE"],
    "train_slurm.sbatch": ["SLURM_JOB_ID", "CONTAINER_IMAGE", "DATA", "SAVE"],
    "prepare_dataset.sh": ["RAW", "DATA", "VAE", "TEXT_ENCODER"],
    "generate.sh": ["CKPT", "LATENT_SHAPE", "OUTPUT"],
}


def recipe(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def header(path: Path) -> str:
    return "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))


def declared_world_size(path: Path) -> int:
    found = re.search(r"^# world-size: (\d+)$", path.read_text(), re.M)
    assert found, f"{path.name} has no '# world-size: N' line"
    return int(found[1])


def data_format(path: Path) -> tuple[int, int]:
    r = recipe(path)
    return r["latent-channels"], r["text-embed-dim"]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[tuple[int, int], Path]:
    """One real dataset (shards + `energon prepare`) per (latent channels, text width) of the recipes: images
    [C, 4, 4] and videos [C, 2, 4, 4] (4 and 8 tokens at patch 2), text [3, D]."""
    out = {}
    for channels, width in sorted({data_format(c) for c in CONFIGS}):
        text = np.zeros((3, width), np.float32)
        entries = [
            (f"s{i:02d}", payloads((channels, 4, 4) if i % 2 else (channels, 2, 4, 4), seed=i, text=text))
            for i in range(8)
        ]
        out[channels, width] = write_dataset(tmp_path_factory.mktemp(f"c{channels}_d{width}"), entries)
    return out


def launch_check(capsys, *argv: str) -> tuple[int, str, str]:
    """pretrain_dit.py's own main, as `python pretrain_dit.py ARGV` runs it (in this process, to be fast)."""
    status = main(pretrain_dit.HOOKS, list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_there_is_a_recipe_per_size_and_workload():
    assert {c.stem for c in CONFIGS} >= {
        "dit-s_image256",
        "dit-b_image256",
        "dit-l_image256",
        "dit-xl_image256",
        "dit-xl_image512",
        "dit-xl_video",
        "dit-7b_image256",
        "dit-7b_image512",
        "dit-7b_video",
        "dit-7b_video_long",
    }


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_recipe_passes_the_launch_check_at_its_declared_world_size(config, datasets, capsys):
    world = declared_world_size(config)
    status, out, err = launch_check(
        capsys,
        "--config",
        str(config),
        "--data-path",
        str(datasets[data_format(config)]),
        "--validate-only",
        "--world-size",
        str(world),
    )
    assert status == 0, err
    layout = re.search(rf"ok: {world} processes as tp=(\d+) pp=(\d+) cp=(\d+) dp=(\d+);", out)
    assert layout, out
    # the header says what the check found: the layout, the dataset's format and a launcher that exists
    text = header(config)
    tp, pp, cp, dp = layout.groups()
    nodes = re.search(r"^# nodes: (.*)$", text, re.M)[1]
    assert f"tp={tp}" in nodes and f"cp={cp}" in nodes and f"pp={pp}" in nodes and f"dp={dp}" in nodes, nodes
    channels, width = data_format(config)
    assert f"[{channels}, " in text and f"text-embed-dim {width}" in text
    launch = re.search(r"^# launch: (.*?)(?=^# [a-z-]+:|\Z)", text, re.M | re.S)[1]
    assert f"examples/configs/{config.name}" in launch
    assert any(f"examples/{name}" in launch for name in LAUNCHERS[:3]), launch


@pytest.mark.parametrize(
    "config, world, line",
    [
        (
            "dit-7b_video_long",
            60,
            "--tensor-model-parallel-size: world size 60 is not divisible by tp*pp*cp = 2*1*4 = 8",
        ),
        ("dit-xl_image256", 16, "--global-batch-size: 8 is not a multiple of micro batch x DP = 1x16"),
    ],
)
def test_a_recipe_at_a_world_size_its_layout_does_not_fit_fails_with_one_line(datasets, capsys, config, world, line):
    path = ROOT / "examples" / "configs" / f"{config}.yaml"
    status, out, err = launch_check(
        capsys,
        "--config",
        str(path),
        "--data-path",
        str(datasets[data_format(path)]),
        "--validate-only",
        "--world-size",
        str(world),
    )
    assert status == 2 and out == ""
    assert err.splitlines() == [err.rstrip("\n")] and err.startswith(f"pretrain_dit.py: error: {line}"), err


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launcher_is_valid_bash(launcher):
    subprocess.run(["bash", "-n", str(ROOT / "examples" / launcher)], check=True)


RECORDER = """#!/usr/bin/env bash
# a stand-in for a cluster command: records its name, arguments, folder and PYTHONPATH, one JSON line a call
"{python}" -c 'import json, os, sys; print(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(),
    "pythonpath": os.environ.get("PYTHONPATH", "")}}))' "$(basename "$0")" "$@" >> "{log}"
"""
FAKE_SRUN = """
# like pyxis without the container: into --container-workdir, then the command after srun's own options
while [[ $1 == -* ]]; do [[ $1 == --container-workdir=* ]] && cd "${1#*=}"; shift; done
exec "$@"
"""
FAKE_SCONTROL = 'printf "%s\\n" node-a node-b node-c node-d\n'


class Launchers:
    """Runs examples/ launchers with fake torchrun, srun, scontrol (and python, for the non-training ones)."""

    def __init__(self, tmp: Path):
        self.bin, self.log, self.cwd = tmp / "bin", tmp / "calls.jsonl", tmp / "elsewhere"
        self.bin.mkdir()
        self.cwd.mkdir()
        recorder = RECORDER.format(python=sys.executable, log=self.log)
        for name, rest in (("torchrun", ""), ("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("python", "")):
            (self.bin / name).write_text(recorder + rest)
            (self.bin / name).chmod(0o755)

    def run(self, launcher: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
        """From a folder that is not the checkout, with only ``env`` (and PATH, HOME) set."""
        base = {
            "PATH": f"{self.bin}:{os.environ['PATH']}",
            "HOME": os.environ.get("HOME", "/tmp"),
            "OMP_NUM_THREADS": "1",
            "PYTHON": sys.executable,
        }
        return subprocess.run(
            ["bash", str(ROOT / "examples" / launcher), *args],
            cwd=self.cwd,
            env={**base, **env},
            capture_output=True,
            text=True,
            timeout=300,
        )

    def calls(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []


@pytest.fixture
def launchers(tmp_path) -> Launchers:
    return Launchers(tmp_path)


def complete_env(launcher: str, tmp: Path) -> dict[str, str]:
    return {var: str(tmp / var.lower()) if var in ("DATA", "SAVE") else "1" for var in REQUIRED[launcher]}


@pytest.mark.parametrize("launcher, missing", [(launcher, v) for launcher, names in REQUIRED.items() for v in names])
def test_launcher_without_a_required_variable_stops_naming_it(launchers, tmp_path, launcher, missing):
    env = complete_env(launcher, tmp_path)
    del env[missing]
    result = launchers.run(launcher, env)
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and f"{missing}: " in result.stderr, result.stderr  # bash's own line
    assert launchers.calls() == []  # nothing ran


def test_slurm_launcher_refuses_a_relative_data_path(launchers, tmp_path):
    result = launchers.run("train_slurm.sbatch", {**complete_env("train_slurm.sbatch", tmp_path), "DATA": "ds"})
    assert result.returncode == 2 and result.stderr == "train_slurm.sbatch: DATA=ds must be an absolute path\n"


def pretrain_argv(config: str, data: Path, *rest: str) -> list[str]:
    return ["--config", config, "--data-path", str(data), *rest]


@pytest.mark.slow  # the real launch check: one python process with Megatron's imports
def test_single_node_launcher_checks_then_shows_and_runs_torchrun(launchers, datasets):
    config, data = str(ROOT / "examples/configs/dit-xl_image256.yaml"), datasets[4, 1024]
    result = launchers.run("train_single_node.sh", {"DATA": str(data), "CONFIG": config}, "--train-iters", "5")
    assert result.returncode == 0, result.stderr
    assert "pretrain_dit.py: ok: 8 processes as tp=1 pp=1 cp=1 dp=8;" in result.stdout
    script = str(ROOT / "pretrain_dit.py")
    expected = [
        "torchrun",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "8",
        script,
        *pretrain_argv(config, data, "--train-iters", "5"),
    ]
    assert [c["argv"] for c in launchers.calls()] == [expected]
    assert "+ exec " + " ".join(expected) in result.stderr


@pytest.mark.parametrize("launcher", LAUNCHERS[:3])
def test_a_failed_launch_check_stops_the_launcher_before_torchrun(launchers, tmp_path, launcher):
    """The check's status is the launcher's, and nothing is launched (a stand-in check that fails, to be fast:
    the real one's line is tests/integration/test_launch.py's)."""
    failing = tmp_path / "failing_check"
    line = "pretrain_dit.py: error: --lr: must be a positive number"
    failing.write_text(f"#!/usr/bin/env bash\necho '{line}' >&2\nexit 2\n")
    failing.chmod(0o755)
    env = {
        **complete_env(launcher, tmp_path),
        "SLURM_JOB_NUM_NODES": "4",
        "SLURM_JOB_NODELIST": "node-[a-d]",
        "CONTAINER_WORKDIR": str(ROOT),
        "PYTHON": str(failing),
    }
    result = launchers.run(launcher, env, "--lr", "-1")
    assert result.returncode == 2 and result.stderr.endswith(line + "\n")
    assert "torchrun" not in {arg for call in launchers.calls() for arg in call["argv"]}


@pytest.mark.slow
def test_multi_node_launcher_checks_the_whole_launch_then_runs_torchrun_with_c10d(launchers, datasets, tmp_path):
    data, save = datasets[16, 4096], tmp_path / "save"
    env = {"NNODES": "4", "NODE_RANK": "0", "MASTER_ADDR": "10.0.0.1", "DATA": str(data), "SAVE": str(save)}
    result = launchers.run("train_multi_node.sh", env, "--log-interval", "1")
    assert result.returncode == 0, result.stderr
    assert "pretrain_dit.py: ok: 32 processes as tp=2 pp=1 cp=1 dp=16;" in result.stdout  # the default recipe
    config = str(ROOT / "examples/configs/dit-7b_image256.yaml")
    assert [c["argv"] for c in launchers.calls()] == [
        [
            "torchrun",
            "--nnodes",
            "4",
            "--nproc-per-node",
            "8",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            "10.0.0.1:29500",
            "--rdzv-id",
            "dit",
            "--rdzv-conf",
            "is_host=1",
            str(ROOT / "pretrain_dit.py"),
            *pretrain_argv(config, data, "--save", str(save), "--log-interval", "1"),
        ]
    ]
    assert "+ exec torchrun --nnodes 4" in result.stderr


@pytest.mark.slow
def test_slurm_launcher_checks_in_the_container_then_runs_one_torchrun_per_node(launchers, datasets, tmp_path):
    data, save = datasets[16, 4096], tmp_path / "runs" / "x"
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "4",
        "SLURM_JOB_NODELIST": "node-[a-d]",
        "CONTAINER_IMAGE": "/images/megatron-dit.sqsh",
        "DATA": str(data),
        "SAVE": str(save),
        "CONTAINER_WORKDIR": str(ROOT),
    }
    result = launchers.run("train_slurm.sbatch", env, "--seed", "7")
    assert result.returncode == 0, result.stderr
    assert "pretrain_dit.py: ok: 32 processes as tp=2 pp=1 cp=1 dp=16;" in result.stdout
    assert save.is_dir()  # created before it is mounted
    container = [
        "--container-image=/images/megatron-dit.sqsh",
        f"--container-workdir={ROOT}",
        f"--container-mounts={data}:{data},{save}:{save}",
    ]
    args = pretrain_argv("examples/configs/dit-7b_image256.yaml", data, "--save", str(save), "--seed", "7")
    torchrun = [
        "torchrun",
        "--nnodes=4",
        "--nproc-per-node=8",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=node-a:29500",
        "--rdzv-id=4242",
        "pretrain_dit.py",
        *args,
    ]
    calls = launchers.calls()
    assert [c["argv"] for c in calls] == [
        ["scontrol", "show", "hostnames", "node-[a-d]"],
        [
            "srun",
            "--nodes=1",
            "--ntasks=1",
            *container,
            sys.executable,
            "pretrain_dit.py",
            *args,
            "--validate-only",
            "--world-size",
            "32",
        ],
        ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", *container, *torchrun],
        torchrun,
    ]
    assert calls[-1]["cwd"] == str(ROOT)
    assert "+ exec srun --ntasks-per-node=1" in result.stderr
    # the header's allocation is the default recipe's world size
    script = (ROOT / "examples" / "train_slurm.sbatch").read_text()
    nodes, gpus = (int(re.search(rf"^#SBATCH --{k}=(\d+)$", script, re.M)[1]) for k in ("nodes", "gpus-per-node"))
    assert nodes * gpus == declared_world_size(ROOT / "examples/configs/dit-7b_image256.yaml")


def test_prepare_launcher_runs_data_prepare_from_the_checkout(launchers, tmp_path):
    env = {
        "RAW": "raw",
        "DATA": "out/ds",
        "VAE": "stabilityai/sd-vae-ft-ema",
        "TEXT_ENCODER": "google/t5-v1_1-large",
        "PYTHON": str(launchers.bin / "python"),
    }
    result = launchers.run("prepare_dataset.sh", env, "--resolution", "256")
    assert result.returncode == 0, result.stderr
    expected = [
        "python",
        "-m",
        "data.prepare",
        "raw",
        "out/ds",
        "--vae",
        "stabilityai/sd-vae-ft-ema",
        "--text-encoder",
        "google/t5-v1_1-large",
        "--resolution",
        "256",
    ]
    (call,) = launchers.calls()
    assert call["argv"] == expected and call["cwd"] == str(launchers.cwd)  # paths stay the caller's
    assert call["pythonpath"].split(":")[0] == str(ROOT)  # data/ imports from the checkout
    assert f"+ exec {launchers.bin / 'python'} -m data.prepare raw out/ds" in result.stderr


@pytest.mark.parametrize(
    "nproc, launch", [("1", ["python", "-m"]), ("2", ["torchrun", "--standalone", "--nproc-per-node", "2", "-m"])]
)
def test_generate_launcher_runs_dit_generate(launchers, nproc, launch):
    env = {
        "CKPT": "runs/x",
        "LATENT_SHAPE": "4,32,32",
        "OUTPUT": "fox.pt",
        "TEXT_ENCODER": "google/t5-v1_1-large",
        "NPROC": nproc,
        "PYTHON": str(launchers.bin / "python"),
    }
    result = launchers.run("generate.sh", env, "--caption", "a red fox in the snow")
    assert result.returncode == 0, result.stderr
    (call,) = launchers.calls()
    assert call["argv"] == [
        *launch,
        "dit.generate",
        "--load",
        "runs/x",
        "--latent-shape",
        "4,32,32",
        "--output",
        "fox.pt",
        "--text-encoder",
        "google/t5-v1_1-large",
        "--caption",
        "a red fox in the snow",
    ]
    assert call["pythonpath"].split(":")[0] == str(ROOT)
    assert "+ exec " in result.stderr and "dit.generate --load runs/x" in result.stderr
