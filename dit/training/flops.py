"""Model FLOPs of one pack from its ``cu_seqlens``, and the accelerator peaks that MFU divides by.

A multiply-add counts as 2 FLOPs. Linear layers run over the pack's padded tokens; self-attention
costs 4 L_i^2 h over each sample's own real length L_i (never the pack's), cross-attention
4 L_i K_i h against its K_i text tokens. Training is 3x the forward (backward = 2x), and these are
model FLOPs: activation recomputation is not counted, as in Megatron-LM. The conditioning, which
every pipeline stage recomputes, is counted once.
"""

from __future__ import annotations

from dit.model.config import DiTConfig
from dit.model.embeddings import FREQUENCY_EMBEDDING_SIZE

# Dense (no sparsity) peak TFLOP/s by device name: (bf16, fp8). MFU uses the bf16 peak, or fp8 under --fp8-format.
PEAK_TFLOPS = {
    "H100": (989.0, 1979.0),
    "H200": (989.0, 1979.0),
    "H800": (989.0, 1979.0),
    "GB200": (2500.0, 5000.0),
    "B200": (2250.0, 4500.0),
    "A100": (312.0, None),
}


def _adaln_flops(config: DiTConfig, num_samples: int, chunks: int) -> float:
    h, r = config.hidden_size, config.adaln_lora_rank
    return 2.0 * num_samples * (h * r + r * chunks * h if r else h * chunks * h)


def forward_flops(config: DiTConfig, lengths: list[int], padded_tokens: int, text_lengths: list[int]) -> float:
    """Forward FLOPs of one pack: samples of ``lengths`` real tokens in ``padded_tokens`` rows, with
    ``text_lengths`` text tokens each (ignored under class conditioning)."""
    h, s, n = config.hidden_size, padded_tokens, len(lengths)
    hq = config.num_attention_heads * config.kv_channels  # query / output width of attention
    hkv = (config.num_query_groups or config.num_attention_heads) * config.kv_channels
    fc1 = config.ffn_hidden_size * (2 if config.gated_linear_unit else 1)
    text = config.conditioning == "text"
    k = sum(text_lengths) if text else 0

    self_attention = 2.0 * s * h * (hq + 2 * hkv) + 4.0 * hq * sum(L * L for L in lengths) + 2.0 * s * hq * h
    mlp = 2.0 * s * h * fc1 + 2.0 * s * config.ffn_hidden_size * h
    cross_attention = 0.0
    if text:
        cross_attention = (
            2.0 * s * h * hq
            + 2.0 * k * h * 2 * hkv
            + 4.0 * hq * sum(L * K for L, K in zip(lengths, text_lengths))
            + 2.0 * s * hq * h
        )
    layer = self_attention + cross_attention + mlp + _adaln_flops(config, n, 9 if text else 6)

    scalar_embedder = 2.0 * n * (FREQUENCY_EMBEDDING_SIZE * h + h * h)
    conditioning = scalar_embedder * (2 if config.fps_conditioning else 1) + (2.0 * k * config.text_embed_dim * h)
    width = config.token_width
    ends = 2.0 * s * width * h + _adaln_flops(config, n, 2) + 2.0 * s * h * width  # patch embed, final layer
    return config.num_layers * layer + conditioning + ends


def pack_flops(
    config: DiTConfig, cu_seqlens: list[int], cu_seqlens_padded: list[int], cu_seqlens_text: list[int]
) -> float:
    """Training (forward + backward) model FLOPs of a pack given its cumulative lengths."""
    lengths = [b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    text = [b - a for a, b in zip(cu_seqlens_text[:-1], cu_seqlens_text[1:])]
    return 3.0 * forward_flops(config, lengths, cu_seqlens_padded[-1], text)


def peak_tflops(device_name: str, fp8: bool) -> float | None:
    """The dense peak of an accelerator named ``device_name`` (torch.cuda.get_device_name), or None."""
    for name, (bf16, fp8_peak) in PEAK_TFLOPS.items():
        if name in device_name.upper():
            return fp8_peak if fp8 and fp8_peak else bf16
    return None
