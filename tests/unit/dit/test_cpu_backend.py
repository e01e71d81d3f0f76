"""The CPU compatibility layer: off on a GPU machine, on (and reversible) without CUDA."""

import logging

import pytest
import torch

from dit.runtime import cpu_backend


@pytest.fixture
def layer():
    yield cpu_backend
    cpu_backend.disable()


def test_inactive_when_cuda_is_present(layer, monkeypatch):
    """Mocked: there is no GPU here. The layer must leave a CUDA machine exactly as it is."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    current_device, tensor_type = torch.cuda.current_device, torch.Tensor.type
    assert layer.enable() is False
    assert not layer.is_active()
    assert torch.cuda.current_device is current_device and torch.Tensor.type is tensor_type
    assert torch.zeros(1).type() == "torch.FloatTensor"


def test_the_backend_line_comes_from_rank_0_only(layer, caplog, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # a torchrun rank other than 0: the job's line is rank 0's
    with caplog.at_level(logging.WARNING, logger="dit.runtime.cpu_backend"):
        assert layer.enable() is True
    assert caplog.records == []


def test_active_without_cuda_maps_megatron_cuda_idioms(layer, caplog):
    assert not torch.cuda.is_available()
    with caplog.at_level(logging.WARNING, logger="dit.runtime.cpu_backend"):
        assert layer.enable() is True
        assert layer.enable() is True  # idempotent, logs once
    assert [r.getMessage() for r in caplog.records].count(
        "No CUDA device: Megatron-Core runs on CPU through dit.runtime.cpu_backend (gloo, local kernels)."
    ) == 1
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.empty(3, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.ones(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.ones(2).to("cuda").device.type == "cpu"
    torch.cuda.synchronize()
    assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.zeros(1).type(torch.float64).dtype == torch.float64  # conversions still work
    layer.disable()
    assert torch.zeros(1).type() == "torch.FloatTensor"
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")


def test_cpu_rng_tracker_forks_the_cpu_generator(layer):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    layer.enable()
    tracker = get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("a", 5)
    torch.manual_seed(0)
    with tracker.fork("a"):
        first = torch.rand(3)
    with tracker.fork("a"):
        second = torch.rand(3)
    outside = torch.rand(3)
    g = torch.Generator().manual_seed(5)
    assert torch.equal(first, torch.rand(3, generator=g)) and torch.equal(second, torch.rand(3, generator=g))
    torch.manual_seed(0)
    assert torch.equal(outside, torch.rand(3))
