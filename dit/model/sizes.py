"""Named DiT sizes, apart from DiTConfig so the command line can offer them without importing Megatron."""

from __future__ import annotations

from typing import NamedTuple


class ModelSize(NamedTuple):
    num_layers: int
    hidden_size: int
    num_attention_heads: int


MODEL_SIZES: dict[str, ModelSize] = {
    "DiT-debug": ModelSize(2, 48, 4),  # runs anywhere in seconds: the tests and debugging (head dim 12: RoPE's 3 axes)
    "DiT-S": ModelSize(12, 384, 6),
    "DiT-B": ModelSize(12, 768, 12),
    "DiT-L": ModelSize(24, 1024, 16),
    "DiT-XL": ModelSize(28, 1152, 16),
    "DiT-7B": ModelSize(32, 3072, 24),
}
