"""Embeddings: patches, timesteps (and fps), class labels, text, and 3D positions (RoPE or sin-cos).

Conditioning embedders (timestep, fps, class, text) exist on every pipeline stage, are recomputed there
from the batch, and mark their parameters ``pipeline_parallel`` so Megatron's ``finalize_model_grads``
sums their gradients across stages (``DiTConfig.has_cond_embedder``). Under PP,
:func:`tie_pipeline_replicated` makes the stages' copies one parameter for the rest of Megatron.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule
from torch import Tensor, nn

from dit.model.config import DiTConfig
from dit.runtime.distributed import current_device

FREQUENCY_EMBEDDING_SIZE = 256  # sinusoid width of a scalar before its MLP, as in DiT


def sinusoid(
    values: Tensor, dim: int, *, cos_first: bool = True, freq_shift: float = 0.0, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``[n]`` scalars -> ``[n, dim]`` features [cos | sin] ([sin | cos] unless ``cos_first``) in ``dtype``, at
    frequencies ``10000^(-i / (dim/2 - freq_shift))`` for i < dim/2 (the DiT paper's and diffusers' formula)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=dtype, device=values.device) / (half - freq_shift))
    angles = values.to(dtype)[:, None] * freqs[None]
    cos, sin = torch.cos(angles), torch.sin(angles)
    return torch.cat([cos, sin] if cos_first else [sin, cos], dim=-1)


def mark_pipeline_replicated(module: nn.Module) -> nn.Module:
    """Tag every parameter for the cross-stage gradient all-reduce of ``finalize_model_grads``."""
    for param in module.parameters():
        param.pipeline_parallel = True  # type: ignore[attr-defined]  # Megatron's parameter attribute
    return module


def tie_pipeline_replicated(module: nn.Module) -> None:
    """Make the ``pipeline_parallel`` copies on the PP stages act as one parameter (call it when PP > 1).

    - Initial values: the first stage's, broadcast over the PP group (each stage draws its own weights,
      as ``dit.runtime.distributed.set_random_seed`` offsets the seed per stage);
    - ``shared`` on every stage but the first, so Megatron's gradient norm (clipping) counts them once;
    - ``shared_embedding``, so Megatron's DDP gives each a gradient bucket of its own: with the
      distributed optimizer such a bucket splits into the same DP shards on every stage, and the
      cross-stage sum of ``finalize_model_grads`` (after the DP reduce-scatter) then adds up shards that
      were reduced over DP on both sides (as Megatron does for tied word embeddings).
    """
    group = parallel_state.get_pipeline_model_parallel_group()
    first_rank = parallel_state.get_pipeline_model_parallel_first_rank()
    first_stage = parallel_state.get_pipeline_model_parallel_rank() == 0
    device = current_device()
    for param in module.parameters():
        if not getattr(param, "pipeline_parallel", False):
            continue
        with torch.no_grad():
            value = param.data.to(device)  # NCCL needs a GPU tensor; parameters may still be on the CPU
            torch.distributed.broadcast(value, src=first_rank, group=group)
            param.data.copy_(value)
        param.shared_embedding = True  # type: ignore[attr-defined]  # Megatron's parameter attribute
        param.shared = not first_stage  # type: ignore[attr-defined]  # Megatron's parameter attribute


class ScalarEmbedder(MegatronModule):
    """A per-sample scalar (diffusion timestep, video fps) -> ``[n, h]``: sinusoid, then a 2-layer MLP."""

    def __init__(self, config: DiTConfig, freq_shift: float = 0.0):
        super().__init__(config=config)
        self.freq_shift = freq_shift  # DiTConfig.timestep_freq_shift for the timestep
        self.mlp = nn.Sequential(
            nn.Linear(FREQUENCY_EMBEDDING_SIZE, config.hidden_size, dtype=config.params_dtype),
            nn.SiLU(),
            nn.Linear(config.hidden_size, config.hidden_size, dtype=config.params_dtype),
        )
        mark_pipeline_replicated(self)

    def forward(self, values: Tensor) -> Tensor:
        features = sinusoid(values, FREQUENCY_EMBEDDING_SIZE, freq_shift=self.freq_shift)  # [n, 256] fp32
        features = features.to(cast(nn.Linear, self.mlp[0]).weight.dtype)
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
    """Fixed sin-cos position embedding of (t, h, w); for images (t = 0) exactly the DiT paper's 2D table.

    A token at (t, h, w) gets ``[E(w) | E(h)] + F(t)``. ``E`` is the paper's 1-D table of h/2 channels,
    ``[sin(x w_k) | cos(x w_k)]`` with ``w_k = 10000^(-k/(h/4))``, so the first half of the channels encodes
    the column and the second the row, as in the paper's ``get_2d_sincos_pos_embed`` (MAE's, whose meshgrid
    puts w first), computed in float64. ``F(t) = [sin(t v_k) | cos(t v_k) - 1]`` over all h channels,
    ``v_k = 10000^(-k/(h/2))``, is zero at t = 0: images keep the paper's table, and in a video every channel
    varies with each of t, h and w. Grids past ``max_latent_grid`` raise (:meth:`check_grids`) instead of
    wrapping around (the reference implementations alias).
    """

    table_t: Tensor  # buffers, registered in __init__
    table_h: Tensor
    table_w: Tensor

    def __init__(self, config: DiTConfig):
        super().__init__()
        frames, rows, cols = (torch.arange(n, dtype=torch.float64) for n in config.max_latent_grid)
        h = config.hidden_size
        one_d = lambda x, dim: sinusoid(x, dim, cos_first=False, dtype=torch.float64)  # noqa: E731  [n, dim]
        temporal = one_d(frames, h) - one_d(frames[:1], h)  # [T', h], F(t) = E_h(t) - E_h(0)
        for name, table in (("t", temporal), ("h", one_d(rows, h // 2)), ("w", one_d(cols, h // 2))):
            self.register_buffer(f"table_{name}", table.float(), persistent=False)

    def check_grids(self, grid_sizes: Tensor) -> None:
        """Raise if a sample's latent grid ``[N, 3]`` (host: the pack's layout) exceeds the tables; its
        positions lie inside its grid, so checking them on the device (a sync) is not needed."""
        limits = [table.shape[0] for table in (self.table_t, self.table_h, self.table_w)]
        largest = grid_sizes.amax(0).tolist() if grid_sizes.numel() else [0, 0, 0]
        if any(n > limit for n, limit in zip(largest, limits)):
            raise ValueError(
                f"latent grids up to {largest} exceed the sin-cos table of max_latent_grid={limits}; "
                "raise --max-latent-grid"
            )

    def forward(self, positions: Tensor) -> Tensor:
        """``[S, 3]`` int (t, h, w) -> ``[S, h]`` fp32; see :meth:`check_grids`."""
        t, h, w = positions.unbind(-1)
        return torch.cat([self.table_w[w], self.table_h[h]], dim=-1) + self.table_t[t]
