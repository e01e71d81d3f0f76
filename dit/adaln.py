"""adaLN-Zero: per-sample shift/scale/gate vectors from the conditioning, applied to each sample's tokens.

The modulation linear is column-parallel over TP (it is the largest matrix of a DiT layer) and its output
is all-gathered, so every TP rank holds the full vectors of every sample ``[N, k*h]``. Each token then
picks its sample's row. Under sequence parallelism a TP rank modulates only its own slice of the tokens,
so the gradient of the per-sample vectors is partial on each rank and is summed over TP before it reaches
the linear; without SP every rank sees every token and the gradients are already complete.
"""

from __future__ import annotations

import dataclasses

import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule
from torch import Tensor, nn

from dit.config import DiTConfig


class AdaLNModulation(MegatronModule):
    """``cond [N, h]`` -> ``num_chunks`` tensors ``[s, 1, h]``, one row per token of this rank.

    Zero-initialised, so every modulated block starts as the identity (adaLN-Zero).
    """

    def __init__(self, config: DiTConfig, num_chunks: int):
        super().__init__(config=config)
        self.num_chunks = num_chunks
        width, rank = config.hidden_size, config.adaln_lora_rank
        # The input is one vector per sample, not a sequence: never all-gather it as SP would.
        per_sample = dataclasses.replace(config, sequence_parallel=False)
        self.down = nn.Linear(width, rank, bias=False, dtype=config.params_dtype) if rank else nn.Identity()  # replicated, rank << h
        self.up = ColumnParallelLinear(
            rank or width, num_chunks * width, config=per_sample, init_method=nn.init.zeros_, bias=True,
            gather_output=True)  # Megatron zeroes the bias

    def forward(self, cond: Tensor, token_sample: Tensor) -> list[Tensor]:
        mods, _ = self.up(self.down(F.silu(cond)))  # [N, k*h], full width on every TP rank
        if self.config.sequence_parallel:
            mods = copy_to_tensor_model_parallel_region(mods)  # backward: sum the TP ranks' token slices
        return mods[token_sample].unsqueeze(1).chunk(self.num_chunks, dim=-1)  # k x [s, 1, h]


class ModulatedNorm(nn.Module):
    """LayerNorm without affine parameters; the modulation supplies scale and shift."""

    def __init__(self, config: DiTConfig, hidden_size: int, eps: float):
        super().__init__()
        self.hidden_size, self.eps = hidden_size, eps

    def forward(self, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        return F.layer_norm(x, (self.hidden_size,), eps=self.eps) * (1 + scale) + shift
