"""TE's context parallel (CP=2) and tensor parallel with sequence parallelism (TP=2 + SP) against one rank, on
packs padded only at their end (``tests/gpu/te_parallel.py``); 2 GPUs and Transformer Engine, else skipped.
The same script's wiring runs on the CPU with the local layers over gloo."""

import json
import subprocess
import sys

import pytest
import torch

from dit.model.te import have_transformer_engine
from tests.gpu.gpu_setup import BF16_TOL
from tests.launch import ROOT


def _te_parallel(transformer_impl: str) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "tests/gpu/te_parallel.py",
            "--transformer-impl",
            transformer_impl,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith('{"te_parallel"'))
    return json.loads(line)["te_parallel"]


@pytest.mark.gpu
@pytest.mark.skipif(
    torch.cuda.device_count() < 2 or not have_transformer_engine(), reason="needs 2 GPUs and Transformer Engine"
)
def test_te_cp2_and_tp2_sp_match_one_rank_on_packs_padded_at_their_end():
    errors = _te_parallel("transformer_engine")
    assert errors.keys() == {"cp2_vs_cp1", "tp2_sp_vs_tp1"}
    assert max(errors.values()) < BF16_TOL, errors  # dropped keys (TE <= 2.17 without pad_between_seqs): O(1)


@pytest.mark.slow
def test_the_parallel_check_wiring_on_the_cpu():
    errors = _te_parallel("local")
    assert errors.keys() == {"cp2_vs_cp1", "tp2_sp_vs_tp1"}
    assert max(errors.values()) < 1e-5, errors  # fp32, only the summation order differs
