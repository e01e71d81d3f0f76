"""GPU tests (marked ``gpu``) skip where no CUDA GPU is visible. ``DIT_GPU_TESTS_ON_CPU=1`` (what
``run_gpu_checks.sh --dry-run`` sets) runs them on the CPU instead, so that a machine without a GPU proves
their code; what needs CUDA itself (Transformer Engine, FP8) still skips there."""

import os

import pytest
import torch

ON_CPU = os.environ.get("DIT_GPU_TESTS_ON_CPU") == "1"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or ON_CPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (bash tests/gpu/run_gpu_checks.sh runs these on one)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """The GPU, or the CPU under DIT_GPU_TESTS_ON_CPU=1."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
