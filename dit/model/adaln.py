"""adaLN-Zero: per-sample shift/scale/gate vectors from the conditioning, applied to each sample's tokens.

The modulation linear is column-parallel over TP (it is the largest matrix of a DiT layer) and its output
is all-gathered, so every TP rank holds the full vectors of every sample ``[N, k*h]``. They reach the
tokens by broadcasting: the tokens of a run of equal-length samples (:class:`dit.model.packed.SampleRun`) are viewed
``[B, L, h]`` and each sample's vector ``[B, 1, h]`` is broadcast over its L tokens, so no per-token copy
``[s, k*h]`` is made in the forward or kept for the backward. Under sequence parallelism a TP rank
modulates only its own slice of the tokens, so the gradient of the per-sample vectors is partial on each
rank and is summed over TP before it reaches the linear; without SP every rank sees every token and the
gradients are already complete.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule
from torch import Tensor, nn

from dit.model.config import DiTConfig
from dit.model.packed import SampleRun, split_rows


def per_sample(
    fn: Callable[..., Tensor], runs: list[SampleRun], tokens: tuple[Tensor, ...], vectors: tuple[Tensor, ...]
) -> Tensor:
    """``fn(*token_views, *sample_vectors)`` over each run of samples, back in token order.

    tokens: ``[s, 1, h]`` tensors whose rows follow ``runs``; vectors: ``[N, h]`` per-sample tensors.
    ``fn`` sees the tokens of a run as ``[B, L, h]`` and the vectors of its samples as ``[B, 1, h]``.
    """
    pieces = [split_rows(t, [run.count * run.rows for run in runs]) for t in tokens]
    outs = [
        fn(
            *(p[j].view(run.count, run.rows, -1) for p in pieces),
            *(v[run.first : run.first + run.count, None] for v in vectors),
        )
        for j, run in enumerate(runs)
    ]  # each [B, L, h']
    out = outs[0] if len(outs) == 1 else torch.cat([o.flatten(0, 1) for o in outs])
    return out.reshape(tokens[0].shape[0], 1, -1)  # [s, 1, h']


def gated_residual(x: Tensor, update: Tensor, gate: Tensor, runs: list[SampleRun]) -> Tensor:
    """``x + gate * update``, tokens ``[s, 1, h]``, ``gate`` one row per sample ``[N, h]``."""
    return per_sample(lambda x, u, g: torch.addcmul(x, g, u), runs, (x, update), (gate,))


class AdaLNModulation(MegatronModule):
    """``cond [N, h]`` -> ``num_chunks`` per-sample vectors ``[N, h]`` (shift, scale, gate, ...).

    ``dit.model.init.initialize_weights`` zeroes it, so every modulated block starts as the identity (adaLN-Zero).
    """

    def __init__(self, config: DiTConfig, num_chunks: int):
        super().__init__(config=config)
        self.num_chunks = num_chunks
        width, rank = config.hidden_size, config.adaln_lora_rank
        # The input is one vector per sample, not a sequence: never all-gather it as SP would.
        # (a field of Megatron's TransformerConfig, which mypy does not see)
        per_sample_config = dataclasses.replace(config, sequence_parallel=False)  # type: ignore[call-arg]
        self.down = (
            nn.Linear(width, rank, bias=False, dtype=config.params_dtype) if rank else nn.Identity()
        )  # replicated, rank << h
        self.up = ColumnParallelLinear(
            rank or width,
            num_chunks * width,
            config=per_sample_config,
            init_method=config.init_method,
            bias=True,
            gather_output=True,
        )

    def forward(self, cond: Tensor) -> tuple[Tensor, ...]:
        mods, _ = self.up(self.down(F.silu(cond)))  # [N, k*h], full width on every TP rank
        if self.config.sequence_parallel:
            mods = copy_to_tensor_model_parallel_region(mods)  # backward: sum the TP ranks' token slices
        return mods.chunk(self.num_chunks, dim=-1)  # k x [N, h]


class ModulatedNorm(nn.Module):
    """LayerNorm without affine parameters; each sample's modulation supplies scale and shift."""

    def __init__(self, config: DiTConfig, hidden_size: int, eps: float):
        super().__init__()
        self.hidden_size, self.eps = hidden_size, eps

    def forward(self, x: Tensor, shift: Tensor, scale: Tensor, runs: list[SampleRun]) -> Tensor:
        """x ``[s, 1, h]``; shift, scale ``[N, h]`` -> ``[s, 1, h]``."""
        return per_sample(self._modulate, runs, (x,), (shift, scale))

    def _modulate(self, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        return torch.addcmul(shift, F.layer_norm(x, (self.hidden_size,), eps=self.eps), 1 + scale)  # [B, L, h]
