"""Embeddings: patches, timesteps (and fps), class labels, text, and 3D positions (RoPE or sin-cos).

Conditioning embedders (timestep, fps, class, text) exist on every pipeline stage, are recomputed there
from the batch, and mark their parameters ``pipeline_parallel`` so Megatron's ``finalize_model_grads``
sums their gradients across stages (``DiTConfig.has_cond_embedder``). Under PP,
:func:`tie_pipeline_replicated` makes the stages' copies one parameter for the rest of Megatron.
"""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule
from torch import Tensor, nn

from dit.config import DiTConfig

FREQUENCY_EMBEDDING_SIZE = 256  # sinusoid width of a scalar before its MLP, as in DiT


def sinusoid(values: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """``[n]`` scalars -> ``[n, dim]`` fp32 [cos | sin] features, frequencies geometric in ``max_period``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    angles = values.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def mark_pipeline_replicated(module: nn.Module) -> nn.Module:
    """Tag every parameter for the cross-stage gradient all-reduce of ``finalize_model_grads``."""
    for param in module.parameters():
        param.pipeline_parallel = True
    return module


def tie_pipeline_replicated(module: nn.Module) -> None:
    """Make the ``pipeline_parallel`` copies on the PP stages act as one parameter (call it when PP > 1).

    - Initial values: the first stage's, broadcast over the PP group (each stage draws its own weights,
      as ``dit.runtime.set_random_seed`` offsets the seed per stage);
    - ``shared`` on every stage but the first, so Megatron's gradient norm (clipping) counts them once;
    - ``shared_embedding``, so Megatron's DDP gives each a gradient bucket of its own: with the
      distributed optimizer such a bucket splits into the same DP shards on every stage, and the
      cross-stage sum of ``finalize_model_grads`` (after the DP reduce-scatter) then adds up shards that
      were reduced over DP on both sides (as Megatron does for tied word embeddings).
    """
    group = parallel_state.get_pipeline_model_parallel_group()
    first_rank = parallel_state.get_pipeline_model_parallel_first_rank()
    first_stage = parallel_state.get_pipeline_model_parallel_rank() == 0
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    for param in module.parameters():
        if not getattr(param, "pipeline_parallel", False):
            continue
        with torch.no_grad():
            value = param.data.to(device)  # NCCL needs a GPU tensor; parameters may still be on the CPU
            torch.distributed.broadcast(value, src=first_rank, group=group)
            param.data.copy_(value)
        param.shared_embedding = True
        param.shared = not first_stage


class ScalarEmbedder(MegatronModule):
    """A per-sample scalar (diffusion timestep, video fps) -> ``[n, h]``: sinusoid, then a 2-layer MLP."""

    def __init__(self, config: DiTConfig):
        super().__init__(config=config)
        self.mlp = nn.Sequential(
            nn.Linear(FREQUENCY_EMBEDDING_SIZE, config.hidden_size, dtype=config.params_dtype), nn.SiLU(),
            nn.Linear(config.hidden_size, config.hidden_size, dtype=config.params_dtype))
        mark_pipeline_replicated(self)

    def forward(self, values: Tensor) -> Tensor:
        features = sinusoid(values, FREQUENCY_EMBEDDING_SIZE).to(self.mlp[0].weight.dtype)  # [n, 256]
        return self.mlp(features)  # [n, h]


class ClassEmbedder(MegatronModule):
    """Class label -> ``[n, h]``; label ``num_classes`` is the null (unconditional) class for guidance."""

    def __init__(self, config: DiTConfig):
        super().__init__(config=config)
        self.table = nn.Embedding(config.num_classes + 1, config.hidden_size, dtype=config.params_dtype)
        mark_pipeline_replicated(self)

    def forward(self, labels: Tensor) -> Tensor:
        return self.table(labels)  # [n, h]


class TextProjection(MegatronModule):
    """Text-encoder embeddings ``[K, D]`` -> ``[K, h]``, the keys and values of cross-attention."""

    def __init__(self, config: DiTConfig):
        super().__init__(config=config)
        self.linear = nn.Linear(config.text_embed_dim, config.hidden_size, dtype=config.params_dtype)
        mark_pipeline_replicated(self)

    def forward(self, text: Tensor) -> Tensor:
        return self.linear(text.to(self.linear.weight.dtype))


def axis_split(dim: int) -> tuple[int, int, int]:
    """Split ``dim`` features over (t, h, w): h and w get equal even shares, t the rest."""
    spatial = dim // 3 // 2 * 2
    return dim - 2 * spatial, spatial, spatial


def rope3d_angles(positions: Tensor, head_dim: int, theta: float = 10000.0) -> Tensor:
    """Per-token RoPE angles ``[S, 1, 1, head_dim]`` in Megatron's layout (two equal halves).

    The ``head_dim/2`` rotary pairs are split over (t, h, w); each axis rotates by its own coordinate.
    """
    parts = []
    for axis, pairs in enumerate(axis_split(head_dim // 2)):
        inv_freq = theta ** (-torch.arange(pairs, dtype=torch.float32, device=positions.device) / max(pairs, 1))
        parts.append(positions[:, axis, None].float() * inv_freq[None])  # [S, pairs]
    angles = torch.cat(parts, dim=-1)  # [S, head_dim/2]
    return torch.cat([angles, angles], dim=-1)[:, None, None, :]


class SinCos3D(nn.Module):
    """Fixed 3D sin-cos position embedding from per-axis tables of ``max_latent_grid`` rows.

    Positions past the table raise instead of wrapping around (the reference implementations alias).
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        tables = [sinusoid(torch.arange(n), d) for n, d in zip(config.max_latent_grid, axis_split(config.hidden_size))]
        for name, table in zip("thw", tables):
            self.register_buffer(f"table_{name}", table, persistent=False)  # [grid_axis, dim_axis]

    def forward(self, positions: Tensor) -> Tensor:
        """``[S, 3]`` int (t, h, w) -> ``[S, h]``."""
        tables = (self.table_t, self.table_h, self.table_w)
        limits = torch.tensor([t.shape[0] for t in tables], device=positions.device)
        if positions.numel() and ((positions < 0) | (positions >= limits)).any():
            raise ValueError(f"latent positions up to {positions.max(0).values.tolist()} exceed the sin-cos "
                             f"table of max_latent_grid={limits.tolist()}; raise --max-latent-grid")
        return torch.cat([table[positions[:, axis]] for axis, table in enumerate(tables)], dim=-1)
