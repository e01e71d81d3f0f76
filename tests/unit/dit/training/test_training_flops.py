"""FLOPs of a pack: the DiT paper's count, and torch's own FLOP counter on the real model."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from data.loader.bad_data import DataStats
from dit.model.config import dit_config
from dit.model.model import DiTModel
from dit.training.arguments import load_run_config
from dit.training.flops import forward_flops, pack_flops, peak_tflops
from dit.training.metrics import TrainingLogger
from dit.training.state import TrainState
from dit.training.step import StepCounts, StepResult
from tests.model_setup import make_microbatch, randomize, tiny_config


def test_dit_xl2_at_256px_is_the_papers_count():
    """DiT paper, Table 4: DiT-XL/2 at 256 x 256 (32 x 32 x 4 latent, 256 tokens) is 118.6 GFLOPs, counting a
    multiply-add as one; we count it as two."""
    config = dit_config("DiT-XL", conditioning="class", latent_channels=4, patch_size=2, transformer_impl="local")
    assert forward_flops(config, [256], 256, [0]) == pytest.approx(2 * 118.6e9, rel=0.01)
    assert pack_flops(config, [0, 256], [0, 256], [0, 0]) == pytest.approx(3 * forward_flops(config, [256], 256, [0]))


def test_attention_counts_each_samples_own_length():
    """Two samples of 128 tokens cost less attention than one of 256: 4 L_i^2 h each, never the pack's."""
    config = dit_config("DiT-S", conditioning="class", latent_channels=4, transformer_impl="local")
    one, two = forward_flops(config, [256], 256, [0]), forward_flops(config, [128, 128], 256, [0, 0])
    h, layers = config.hidden_size, config.num_layers
    adaln = 2 * h * 6 * h * layers + 2 * h * 2 * h + 2 * (256 * h + h * h)  # per extra sample
    assert one - two == pytest.approx(layers * 4 * h * (256**2 - 2 * 128**2) - adaln)


@pytest.mark.parametrize(
    "fields",
    [
        dict(conditioning="text"),
        dict(conditioning="class", fps_conditioning=True),
        dict(conditioning="text", adaln_lora_rank=4),
    ],
)
def test_forward_flops_equal_torchs_count_on_the_model(single_process, fields):  # noqa: F811
    """torch counts every matmul the real forward runs (attention through SDPA's math path, whose matmuls it
    sees); with no padding in the pack our formula must give exactly that."""
    config = tiny_config(**fields)
    model = DiTModel(config)
    randomize(model, seed=0)
    mb = make_microbatch(3, [(1, 4, 4), (2, 4, 2), (1, 2, 6)], pad_multiple=1)
    b = mb.batch
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        model(b.tokens, mb.timesteps, b)
    lengths = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).tolist()
    text = (b.cu_seqlens_text[1:] - b.cu_seqlens_text[:-1]).tolist()
    assert counter.get_total_flops() == forward_flops(config, lengths, int(b.cu_seqlens_padded[-1]), text)


def test_peak_by_device_name():
    assert peak_tflops("NVIDIA H100 80GB HBM3", fp8=False) == 989.0
    assert peak_tflops("NVIDIA H200", fp8=True) == 1979.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", fp8=True) == 312.0  # no FP8 on A100: its bf16 peak
    assert peak_tflops("Some GPU", fp8=False) is None


def test_the_logged_tflops_and_mfu_are_per_gpu(capsys):
    """A step of 8e12 model FLOPs over all ranks in 2 s on a world of 4 GPUs of peak 10 TFLOP/s: 1 TFLOP/s
    per GPU and 10% MFU (not 4 TFLOP/s and 40%: the world's total)."""
    run = load_run_config(["--train-iters", "10", "--peak-tflops", "10"], need_data=False)
    logger = TrainingLogger(run, world_size=4, peak_tflops=10.0, pack_capacity=32, logging_rank=True, objective="flow")
    counts = StepCounts(packs=8, samples=32, real_tokens=1000, flops=8e12)
    logger.record(StepResult(loss=0.5, grad_norm=1.0, skipped=False, counts=counts, keys=[]), seconds=2.0)
    metrics = logger.log(TrainState(iteration=1), 1e-4, DataStats())
    assert metrics["tflops_per_gpu"] == pytest.approx(8e12 / 2.0 / 4 / 1e12)
    assert metrics["mfu"] == pytest.approx(0.1)
    line = capsys.readouterr().out
    assert "TFLOP/s per GPU: 1.000" in line and "MFU: 10.0%" in line and "tokens/s: 500 (125 per GPU)" in line
