"""Parameter counts of the five named sizes (text- and class-conditioned) against a hand formula, and
DiT-XL/2 class-conditioned against the DiT paper's 675M."""

import pytest
import torch

from dit.model.config import dit_config
from dit.model.model import DiTModel
from dit.model.sizes import MODEL_SIZES


def hand_count(layers, h, heads, *, conditioning, token_width, text_dim=1024, num_classes=1000, qk_norm=True):
    """Written out from the architecture, independently of the model code."""
    linear = lambda n_in, n_out: n_in * n_out + n_out  # noqa: E731  weight + bias
    head_dim = h // heads
    per_layer = (
        linear(h, 3 * h)
        + linear(h, h)  # self-attention qkv, out projection
        + (2 * head_dim if qk_norm else 0)  # q and k RMSNorm weights
        + linear(h, 4 * h)
        + linear(4 * h, h)
    )  # MLP
    chunks = 6
    if conditioning == "text":
        per_layer += linear(h, h) + linear(h, 2 * h) + linear(h, h)  # cross-attention q, kv, out
        chunks = 9
    per_layer += linear(h, chunks * h)  # adaLN shift/scale/gate
    total = layers * per_layer
    total += linear(token_width, h)  # patch embedding
    total += linear(256, h) + linear(h, h)  # timestep: sinusoid 256 -> MLP
    total += linear(text_dim, h) if conditioning == "text" else (num_classes + 1) * h  # text or labels
    total += linear(h, 2 * h) + linear(h, token_width)  # final adaLN and linear
    return total


def _count(size, **fields):
    config = dit_config(
        size, use_cpu_initialization=True, perform_initialization=False, transformer_impl="local", **fields
    )
    with torch.device("meta"):  # DiT-7B does not fit in this machine's memory, and need not
        model = DiTModel(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size", sorted(MODEL_SIZES))
@pytest.mark.parametrize("conditioning", ["text", "class"])
def test_named_size_parameter_count(single_process, size, conditioning):
    layers, h, heads = MODEL_SIZES[size]
    expected = hand_count(layers, h, heads, conditioning=conditioning, token_width=2 * 2 * 16)
    assert _count(size, conditioning=conditioning) == expected


def test_dit_xl_2_class_conditioned_is_675m(single_process):
    count = _count("DiT-XL", conditioning="class", latent_channels=4, patch_size=2, max_latent_grid=(1, 32, 32))
    # DiT-XL/2 has 675,129,632 parameters; ours differs by the learned-sigma output channels and the fixed
    # position table (DiT stores both as parameters) and by QK-norm weights.
    assert abs(count - 675_129_632) / 675_129_632 < 0.01, count
    assert count == hand_count(28, 1152, 16, conditioning="class", token_width=2 * 2 * 4)
