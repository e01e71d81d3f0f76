"""The benchmarks and the GPU check script run here, on the CPU: ``run_gpu_checks.sh --dry-run`` takes every
step of the GPU run (install check, GPU tests, synthetic dataset, training saved and resumed, Megatron-FSDP,
both benchmarks; FP8 and the 2-rank TE check skip, the latter's wiring being a test of its own) at tiny sizes
and writes the summary the GPU run writes; ``bench_data.py`` prints its JSON line."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dit.runtime.mcore019 import megatron_fsdp_missing

ROOT = Path(__file__).resolve().parents[2]


def _run(command: list[str], timeout: int, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHON": sys.executable, **env},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.dist
@pytest.mark.slow
def test_gpu_checks_dry_run_writes_every_part(tmp_path):
    _run(["bash", "tests/gpu/run_gpu_checks.sh", "--dry-run"], timeout=600, OUT=str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    parts = {p["part"]: p for p in summary["parts"]}
    assert summary["ok"], [p for p in summary["parts"] if p["status"] not in ("ok", "skipped")]
    assert {
        "install",
        "tests",
        "dataset",
        "train",
        "resume",
        "fp8",
        "te_parallel",
        "train_fsdp",
        "bench_step_DiT-B",
        "bench_model_DiT-B",
    } <= parts.keys()
    assert parts["fp8"]["status"] == "skipped"  # no TE here
    fsdp = parts["train_fsdp"]  # 2 gloo ranks on 0.17+, skipped on megatron-core 0.16
    assert fsdp["status"] == "skipped" if megatron_fsdp_missing() else fsdp["result"]["last"]["iteration"] == 2
    resume = parts["resume"]["result"]  # from the checkpoint of iteration 1, with its EMA, to iteration 3
    assert resume["last"]["iteration"] == 3 and resume["max_loss_difference"] == 0.0  # bit-exact on the CPU
    assert parts["te_parallel"]["status"] == "skipped"  # its wiring is a test of its own (test_gpu_te_parallel.py)
    assert parts["install"]["status"] == "skipped"  # everything imports here
    tests = parts["tests"]["result"]
    assert tests["passed"] >= 2 and not tests["failed"]  # the local-spec GPU tests ran on the CPU
    train = parts["train"]["result"]["last"]
    assert train["iteration"] == 3 and math.isfinite(train["loss"]) and train["tokens_per_s"] > 0
    step = parts["bench_step_DiT-B"]["result"]
    assert (step["model_size"], step["num_layers"], step["device"]) == ("DiT-B", 1, "cpu")
    assert step["recipe"]["tokens_per_s"] > 0 and step["bare"]["tflops"] > 0 and step["recipe"]["mfu"] is None
    assert step["host_syncs_in_layers_per_step"] == 0 and 0 < step["host_syncs_per_step"] <= 5  # host_syncs
    model = parts["bench_model_DiT-B"]["result"]
    assert (model["model_size"], model["tokens"], model["transformer_impl"]) == ("DiT-B", 256, "local")
    assert model["rates"]["ours"]["tokens_per_s"] > 0 and set(model["attention_peak_mib"]) == {"256", "512"}
    assert "===== bench_model_DiT-B" in (tmp_path / "logs.txt").read_text()


@pytest.mark.slow
def test_bench_data_prints_one_json_line(tmp_path):
    out = _run(
        [
            sys.executable,
            "benchmarks/bench_data.py",
            "--samples",
            "40",
            "--data",
            str(tmp_path / "data"),
            "--packing-buffer-size",
            "20",
            "--num-workers",
            "1",
        ],
        timeout=300,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["benchmark"] == "bench_data" and result["samples_trained"] == 40
    assert 0 < result["packing_efficiency"] <= 1 and result["loader_tokens_per_s"] > 0
    assert (
        set(result["baselines"])
        == set(result["efficiency_ratio"])
        == {"nemo_dfm_pad64_packed", "dfm_pad64_buffer40", "nemo_pad_to_max_unpacked"}
    )
    assert result["efficiency_ratio"]["nemo_pad_to_max_unpacked"] > 1  # packing beats padding every sample to 8192
    assert "| NeMo without packing" in out  # the table
