"""DiTModel: packed latent tokens + per-sample timesteps (+ text or class, fps) -> per-token prediction.

Data flow on this rank (s = tokens this CP rank holds; with sequence parallelism the block sees s/tp):
    tokens [s, pt*p*p*C] --patch embed (first stage)--> [s, 1, h] --DiT layers--> [s, 1, h]
    --final adaLN + linear (last stage)--> [s, pt*p*p*C]
Every stage recomputes the conditioning from the batch: c = t_embed(timesteps) (+ fps or class) ``[N, h]``,
one row per sample, and the projected text ``[K, 1, h]``. Megatron's ``finalize_model_grads`` sums the
conditioning gradients across pipeline stages (``DiTConfig.has_cond_embedder``).

Precision: only the transformer block runs under FP8 (Megatron's FP8 context wraps the block, and only its
TE linears quantise). The embedders, the adaLN modulations and the final layer are plain Megatron/torch
linears outside that context, so they stay in the parameter dtype; sinusoids and RoPE angles are fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.enums import ModelType
from megatron.core.models.common.vision_module.vision_module import VisionModule
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from torch import Tensor, nn

from dit.model.adaln import AdaLNModulation, ModulatedNorm
from dit.model.config import DiTConfig
from dit.model.embeddings import (
    ClassEmbedder,
    ScalarEmbedder,
    SinCos3D,
    TextProjection,
    rope3d_angles,
    tie_pipeline_replicated,
)
from dit.model.init import initialize_weights
from dit.model.layer_spec import get_dit_layer_spec
from dit.model.packed import PackedBatch, SampleRun
from dit.model.patchify import unpatchify
from dit.model.sequence import packed_sequence, text_padding


class FinalLayer(MegatronModule):
    """adaLN-modulated norm and a (zero-initialised) linear to the prediction width (replicated over TP).

    Under sequence parallelism it runs on this rank's token slice, so its gradients are partial and carry
    Megatron's ``sequence_parallel`` mark, which makes ``finalize_model_grads`` sum them over TP.
    """

    def __init__(self, config: DiTConfig):
        super().__init__(config=config)
        self.adaln = AdaLNModulation(config, num_chunks=2)
        self.norm = ModulatedNorm(config, config.hidden_size, config.layernorm_epsilon)
        self.linear = nn.Linear(config.hidden_size, config.prediction_width, dtype=config.params_dtype)
        for param in self.linear.parameters():
            param.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]  # Megatron's parameter attribute

    def forward(self, x: Tensor, cond: Tensor, runs: list[SampleRun]) -> Tensor:
        shift, scale = self.adaln(cond)  # 2 x [N, h]
        return self.linear(self.norm(x, shift, scale, runs))  # [s, 1, prediction_width]


class DiTModel(VisionModule):
    """A diffusion transformer on Megatron-Core; one instance per pipeline stage (``pre/post_process``)."""

    model_type = ModelType.encoder_or_decoder  # read by Megatron's pipeline schedules
    share_embeddings_and_output_weights = False  # read by finalize_model_grads on the first/last stages

    def __init__(self, config: DiTConfig, pre_process: bool = True, post_process: bool = True):
        super().__init__(config=config)
        self.pre_process, self.post_process = pre_process, post_process
        self.fp8_recipe = config.active_fp8_recipe  # the shape rule the packs follow (dit.fp8)
        self.t_embedder = ScalarEmbedder(config, freq_shift=config.timestep_freq_shift)
        self.fps_embedder = ScalarEmbedder(config) if config.fps_conditioning else None
        self.class_embedder = ClassEmbedder(config) if config.conditioning == "class" else None
        self.text_projection = TextProjection(config) if config.conditioning == "text" else None
        if pre_process:
            self.patch_embed = nn.Linear(
                config.token_width, config.hidden_size, dtype=config.params_dtype
            )  # pt*p*p*C -> h
            self.pos_embed = SinCos3D(config) if config.position_embedding == "sincos3d" else None
        spec = get_dit_layer_spec(
            config.transformer_impl, cross_attention=config.conditioning == "text", qk_layernorm=config.qk_layernorm
        )
        self.decoder = TransformerBlock(
            config, spec, post_layer_norm=False, pre_process=pre_process, post_process=post_process
        )
        if post_process:
            self.final_layer = FinalLayer(config)
        if config.perform_initialization:
            initialize_weights(self, config)
        if config.pipeline_model_parallel_size > 1:
            tie_pipeline_replicated(self)  # the conditioning: the same weights on every stage, counted once

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> ShardedStateDict:
        """Megatron's dist-checkpoint view; the conditioning, held by every stage under one key, is saved by
        the first stage: the pipeline rank leads its ``replica_id``, so only stage 0 holds the main replica."""
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        for name, param in self.named_parameters():
            if getattr(param, "pipeline_parallel", False):
                tensor = sharded[f"{prefix}{name}"]
                tensor.replica_id = (pp_rank, *tensor.replica_id[1:])  # (pp, tp, dp) instead of (0, tp, dp)
        return sharded

    def set_input_tensor(self, input_tensor: Tensor | list[Tensor]) -> None:
        """Pipeline schedules hand a non-first stage its input here instead of through ``forward``."""
        tensors = input_tensor if isinstance(input_tensor, list) else [input_tensor]
        assert len(tensors) == 1, "DiTModel takes one input tensor per stage"
        self.decoder.set_input_tensor(tensors[0])

    def forward(self, tokens: Tensor | None, timesteps: Tensor, batch: PackedBatch) -> Tensor:
        """tokens ``[s, pt*p*p*C]`` (noisy, this CP rank's share; ignored after the first stage), timesteps
        ``[N]`` (one per sample) -> ``[s, pt*p*p*C]`` on the last stage, hidden ``[s(/tp), 1, h]`` before."""
        if timesteps.shape != (batch.num_samples,):
            raise ValueError(f"need one timestep per sample: {batch.num_samples} samples, got {tuple(timesteps.shape)}")
        sp = self.config.sequence_parallel
        seq = packed_sequence(batch, sp, fp8_recipe=self.fp8_recipe).to(timesteps.device)
        cond = self._conditioning(timesteps, batch)  # [N, h]
        hidden = self._embed(tokens, batch) if self.pre_process else None  # [s(/tp), 1, h]
        hidden = self.decoder(
            hidden_states=hidden,
            attention_mask=cond,
            context=self._text(batch),
            rotary_pos_emb=self._rope(batch),
            packed_seq_params=seq,
        )
        if not self.post_process:
            return hidden
        out = self.final_layer(hidden, cond, seq.token_runs)  # [s(/tp), 1, prediction_width]
        if sp:
            out = gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False)
        return out.squeeze(1)

    def _conditioning(self, timesteps: Tensor, batch: PackedBatch) -> Tensor:
        """One conditioning vector per sample ``[N, h]``, never one per pack."""
        cond = self.t_embedder(timesteps)
        if self.fps_embedder is not None:
            if batch.fps is None:
                raise ValueError("fps_conditioning is on but the batch carries no fps")
            cond = cond + self.fps_embedder(batch.fps)
        if self.class_embedder is not None:
            if batch.labels is None:
                raise ValueError("class conditioning needs batch.labels")
            cond = cond + self.class_embedder(batch.labels)
        return cond

    def _text(self, batch: PackedBatch) -> Tensor | None:
        """Projected text ``[K, 1, h]``, zero-padded to a multiple of tp under SP (then split ``[K/tp, 1, h]``)
        and to TE's FP8 row rule (``dit.model.sequence.text_padding``)."""
        if self.text_projection is None:
            return None
        text = self.text_projection(batch.text).unsqueeze(1)  # [K, 1, h]
        pad = text_padding(text.shape[0], self.config.sequence_parallel, fp8_recipe=self.fp8_recipe)
        text = F.pad(text, (0, 0, 0, 0, 0, pad))  # [K + pad, 1, h]
        return scatter_to_sequence_parallel_region(text) if self.config.sequence_parallel else text

    def _embed(self, tokens: Tensor | None, batch: PackedBatch) -> Tensor:
        assert tokens is not None, "the first pipeline stage embeds the tokens"
        x = self.patch_embed(tokens.to(self.patch_embed.weight.dtype))  # [s, h] in the parameter dtype
        if self.pos_embed is not None:
            self.pos_embed.check_grids(batch.grid_sizes)
            x = x + self.pos_embed(batch.positions).to(x.dtype)
        x = x.unsqueeze(1)  # [s, 1, h]
        return scatter_to_sequence_parallel_region(x) if self.config.sequence_parallel else x

    def _rope(self, batch: PackedBatch) -> Tensor | None:
        """Per-token 3D RoPE angles of this rank's rows ``[s, 1, 1, hn]`` (its CP share, in row order), once per
        micro-batch on the device; every layer's self-attention applies them row by row
        (``dit.model.attention.RowRoPESelfAttention``)."""
        if self.config.position_embedding != "rope3d":
            return None
        return rope3d_angles(batch.positions, self.config.kv_channels)

    def unpatchify(self, prediction: Tensor, batch: PackedBatch) -> list[Tensor]:
        """Whole-pack prediction ``[S, prediction_width]`` -> one latent ``[C, T, H, W]`` per sample (real
        tokens); with ``learn_sigma`` ``[2C, T, H, W]``, the prediction's channels first (diffusers' layout)."""
        cu, cu_padded = batch.cu_seqlens.tolist(), batch.cu_seqlens_padded.tolist()
        if prediction.shape[0] != cu_padded[-1]:
            raise ValueError(
                f"unpatchify needs the whole pack ({cu_padded[-1]} tokens), got {prediction.shape[0]}; "
                "gather the context-parallel shares first"
            )
        c = self.config
        return [
            torch.cat(
                [
                    unpatchify(part, tuple(grid), c.patch_size, c.temporal_patch_size)
                    for part in prediction[start : start + cu[i + 1] - cu[i]].split(c.token_width, dim=-1)
                ]
            )
            for i, (start, grid) in enumerate(zip(cu_padded[:-1], batch.grid_sizes.tolist()))
        ]
