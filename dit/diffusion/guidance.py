"""The network as a sampler sees it: latents at one noise level -> the objective's prediction, with
classifier-free guidance uncond + G (cond - uncond) from ONE forward pass over a pack that holds every
sample twice, with its condition and with the null condition (zero text, the null class: what training's
guidance dropout used). Under context parallelism each rank runs its share of the pack and the
prediction is gathered back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from megatron.core import parallel_state as ps
from torch import Tensor

from dit.diffusion.objective import Objective
from dit.model.config import DiTConfig
from dit.model.model import DiTModel
from dit.model.packed import PackedBatch, gather_cp_shares, thd_partition_indices
from dit.model.patchify import patchify, unpatchify


@dataclass(frozen=True)
class Condition:
    """What one sample is conditioned on: text ``[L, D]`` (text models) or a class label (class models)."""

    text: Tensor | None = None
    label: int | None = None
    fps: float = 0.0  # frames per second of a video (fps-conditioned models); 0 for images


def _cumulative(lengths: list[int]) -> Tensor:
    return torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).int()


class GuidedPrediction:
    """``(x [N, C, T, H, W], level) -> prediction [N, C, T, H, W]`` for the samplers (float64 in and out)."""

    def __init__(
        self,
        model: DiTModel,
        objective: Objective,
        config: DiTConfig,
        conditions: list[Condition],
        guidance: float,
        device: torch.device,
    ):
        self.model, self.objective, self.config = model, objective, config
        self.conditions, self.guidance, self.device = conditions, guidance, device
        self.cp = ps.get_context_parallel_world_size()
        null = Condition(text=torch.zeros(1, config.text_embed_dim), label=config.num_classes)
        self.pack_conditions = conditions + (
            [Condition(null.text, null.label, c.fps) for c in conditions] if guidance != 1.0 else []
        )  # G = 1 is the conditional model

    def _pack(self, x: Tensor) -> tuple[PackedBatch, list[tuple[int, int, int]], Tensor]:
        """The pack of every sample (twice under guidance): batch, per-sample patch grids, tokens [S, w]."""
        c = self.config
        tokens, positions, grids = [], [], []
        for latent in torch.cat([x, x]) if len(self.pack_conditions) > len(x) else x:
            tok, pos = patchify(latent.float(), c.patch_size, c.temporal_patch_size)
            tokens.append(tok)
            positions.append(pos)
            t, h, w = latent.shape[1:]
            grids.append((t // c.temporal_patch_size, h // c.patch_size, w // c.patch_size))
        length = tokens[0].shape[0]
        padded = -(-length // (2 * self.cp)) * (2 * self.cp) if self.cp > 1 else length
        pad = padded - length
        tokens = [torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in tokens]
        positions = [torch.cat([p, p.new_zeros(pad, 3)]) for p in positions]
        mask = torch.cat([torch.arange(padded) < length] * len(tokens))
        n = len(tokens)
        texts = [
            cond.text if cond.text is not None else torch.zeros(1, c.text_embed_dim) for cond in self.pack_conditions
        ]
        labels = [cond.label if cond.label is not None else c.num_classes for cond in self.pack_conditions]
        packed_tokens = torch.cat(tokens)
        batch = PackedBatch(
            tokens=packed_tokens,
            positions=torch.cat(positions),
            loss_mask=mask,
            cu_seqlens=_cumulative([length] * n),
            cu_seqlens_padded=_cumulative([padded] * n),
            text=torch.cat(texts).float(),
            cu_seqlens_text=_cumulative([t.shape[0] for t in texts]),
            grid_sizes=torch.tensor(grids),
            keys=[str(i) for i in range(n)],
            fps=torch.tensor([cond.fps for cond in self.pack_conditions], dtype=torch.float32),
            labels=torch.tensor(labels) if c.conditioning == "class" else None,
        )
        return batch, grids, packed_tokens

    @torch.no_grad()
    def __call__(self, x: Tensor, level: float) -> Tensor:
        batch, grids, x_tok = self._pack(x)
        whole = batch.cu_seqlens_padded
        if self.cp > 1:  # this rank's share of every sample (TE's 2*cp chunk scheme)
            rows = thd_partition_indices(whole, self.cp, ps.get_context_parallel_rank())
            assert batch.tokens is not None and batch.loss_mask is not None  # built whole by _pack
            batch = replace(
                batch, tokens=batch.tokens[rows], positions=batch.positions[rows], loss_mask=batch.loss_mask[rows]
            )
            x_tok = x_tok[rows]
        batch = batch.to(self.device)
        x_tok = x_tok.to(self.device)
        levels = torch.full((batch.num_samples,), level, device=self.device)
        level_tok = torch.full((x_tok.shape[0], 1), level, device=self.device)
        out = self.model(self.objective.network_input(x_tok, level_tok), self.objective.timestep(levels), batch)
        out = out[:, : self.config.token_width].float()
        out = self.objective.prediction(out, x_tok, level_tok)
        if self.cp > 1:
            out = gather_cp_shares(out, whole, ps.get_context_parallel_group())
        c, n = self.config, len(x)
        cu_padded, length = whole.tolist(), int(batch.cu_seqlens[1])
        samples = [
            unpatchify(out[s : s + length].cpu(), grids[i], c.patch_size, c.temporal_patch_size)
            for i, s in enumerate(cu_padded[:-1])
        ]
        cond = torch.stack(samples[:n]).double()
        if len(samples) == n:
            return cond
        uncond = torch.stack(samples[n:]).double()
        return uncond + self.guidance * (cond - uncond)
