"""The local layer spec on one GPU: bf16 forward and backward of a small DiT on a pack against fp32 with the
same weights, and the local attention's memory, linear in the sample length."""

import pytest
import torch

from tests.gpu.gpu_setup import assert_matches_reference, device_pack, forward_backward, model_like, reference_model

pytestmark = pytest.mark.gpu


def test_bf16_forward_backward_matches_fp32(single_process, device):
    mb = device_pack(device)
    reference = reference_model(device)
    bf16 = model_like(reference, device, bf16=True, params_dtype=torch.bfloat16, transformer_impl="local")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert_matches_reference(forward_backward(bf16, mb), forward_backward(reference, mb))


def test_local_attention_memory_grows_linearly(single_process, device):
    """bf16, 6 heads x 64: the forward's peak allocation stays far below one L x L score matrix per head and
    doubles, not quadruples, from L to 2L tokens (8k to 16k on a GPU; 2k to 4k on the CPU, to stay quick)."""
    from benchmarks.bench_model import attention_peak_bytes

    short, long = (8192, 16384) if device.type == "cuda" else (2048, 4096)
    peaks = {
        n: attention_peak_bytes(n, heads=6, head_dim=64, device=device, dtype=torch.bfloat16) for n in (short, long)
    }
    # bf16 scores, 2 bytes each: far below them (CPU 4k: 0.024 of them on one Xeon, 0.056 on one with AMX, whose
    # kernel packs its blocks into buffers of its own)
    share = 0.05 if device.type == "cuda" else 0.1
    assert peaks[long] < share * long**2 * 6 * 2, peaks
    assert peaks[long] < 2.5 * peaks[short], peaks  # quadratic would be 4x
