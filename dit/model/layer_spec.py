"""The adaLN-Zero DiT layer as a Megatron ``TransformerLayer`` and its ``ModuleSpec`` (TE or local backend).

One layer, on this rank's tokens ``[s, 1, h]`` (packed THD; s = tokens after the CP and SP splits):
    x = x + g_sa  * SelfAttn(modulate(LN(x), shift_sa,  scale_sa))    QK-norm, 3D RoPE, per-sample masking
    x = x + g_ca  * CrossAttn(modulate(LN(x), shift_ca, scale_ca), text)        (text conditioning only)
    x = x + g_mlp * MLP(modulate(LN(x), shift_mlp, scale_mlp))
where (shift, scale, g) come from each token's own sample conditioning (``AdaLNModulation``), broadcast
over the sample's tokens (``dit.model.adaln.per_sample``).

Megatron's ``TransformerBlock`` calls layers with a fixed set of arguments. DiT uses them as follows:
``attention_mask`` carries the per-sample conditioning ``[N, h]`` (THD attention is masked by cu_seqlens,
and this is the slot the block passes through activation checkpointing, so recompute keeps its
gradient), ``context`` the projected text, ``rotary_pos_emb`` the per-token RoPE angles, and
``packed_seq_params`` a :class:`dit.model.sequence.PackedSequence`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import (
    CrossAttention,
    CrossAttentionSubmodules,
    SelfAttentionSubmodules,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.utils import make_viewless_tensor
from torch import Tensor, nn

from dit.model.adaln import AdaLNModulation, ModulatedNorm, gated_residual
from dit.model.attention import PackedAttention, RowRoPESelfAttention
from dit.model.config import DiTConfig
from dit.model.sequence import PackedSequence


@dataclass
class DiTLayerSubmodules(TransformerLayerSubmodules):
    """Megatron's layer slots plus the adaLN modulation; the three norms are ``ModulatedNorm``."""

    adaln: ModuleSpec | type = IdentityOp


class QKNorm(nn.RMSNorm):
    """Per-head RMSNorm of queries and keys for the local backend (torch's, which Megatron's
    ``WrappedTorchNorm`` refuses under sequence parallelism although QK-norm acts after the SP gather)."""

    def __init__(self, config: DiTConfig, hidden_size: int, eps: float):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)


class _Backend(NamedTuple):
    column_linear: type
    row_linear: type
    core_attention: type
    qk_norm: type


def _backend(transformer_impl: str) -> _Backend:
    if transformer_impl == "local":
        return _Backend(ColumnParallelLinear, RowParallelLinear, PackedAttention, QKNorm)
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TENorm, TERowParallelLinear

    from dit.model.te_attention import PackedTEAttention

    return _Backend(TEColumnParallelLinear, TERowParallelLinear, PackedTEAttention, TENorm)


def get_dit_layer_spec(transformer_impl: str, *, cross_attention: bool, qk_layernorm: bool) -> ModuleSpec:
    """The DiT layer spec for ``transformer_impl`` (``transformer_engine`` or ``local``).

    ``cross_attention``: attend to the text (text conditioning); ``qk_layernorm``: RMS-normalise q and k.
    """
    b = _backend(transformer_impl)
    qk_norm = b.qk_norm if qk_layernorm else IdentityOp
    bidirectional = {"attn_mask_type": AttnMaskType.no_mask}  # Megatron's TE wrapper maps it to THD "padding"
    return ModuleSpec(
        module=DiTLayer,
        submodules=DiTLayerSubmodules(
            input_layernorm=ModulatedNorm,
            self_attention=ModuleSpec(
                module=RowRoPESelfAttention,
                params=bidirectional,
                submodules=SelfAttentionSubmodules(
                    linear_qkv=b.column_linear,
                    core_attention=b.core_attention,
                    linear_proj=b.row_linear,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            pre_cross_attn_layernorm=ModulatedNorm if cross_attention else IdentityOp,
            cross_attention=ModuleSpec(
                module=CrossAttention,
                params=bidirectional,
                submodules=CrossAttentionSubmodules(
                    linear_q=b.column_linear,
                    linear_kv=b.column_linear,
                    core_attention=b.core_attention,
                    linear_proj=b.row_linear,
                ),
            )
            if cross_attention
            else IdentityOp,
            pre_mlp_layernorm=ModulatedNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=b.column_linear, linear_fc2=b.row_linear)),
            adaln=ModuleSpec(module=AdaLNModulation, params={"num_chunks": 9 if cross_attention else 6}),
        ),
    )


class DiTLayer(TransformerLayer):
    """adaLN-Zero DiT block over packed samples (see the module docstring for the data flow)."""

    def __init__(
        self,
        config: DiTConfig,
        submodules: DiTLayerSubmodules,
        layer_number: int = 1,
        hidden_dropout: float | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        vp_stage: int | None = None,
    ):
        # The text is whole on every CP rank, so cross-attention must not run context-parallel:
        # build it below from a CP=1 copy of the config (TE's attention reads CP from the config).
        super().__init__(
            config,
            # (a field of Megatron's TransformerLayerSubmodules, which mypy does not see)
            dataclasses.replace(submodules, cross_attention=IdentityOp),  # type: ignore[call-arg]
            layer_number,
            hidden_dropout,
            pg_collection,
            vp_stage,
        )
        self.cross_attention = build_module(
            submodules.cross_attention,
            config=dataclasses.replace(config, context_parallel_size=1),  # type: ignore[call-arg]  # Megatron's field
            layer_number=self.layer_number,
            pg_collection=self.pg_collection,
        )
        self.has_cross_attention = not isinstance(self.cross_attention, IdentityOp)
        # [Module 7] its own epsilon (diffusers' DiT port normalises before the MLP with 1e-5, elsewhere 1e-6)
        self.pre_mlp_layernorm = build_module(
            submodules.pre_mlp_layernorm,
            config=config,
            hidden_size=config.hidden_size,
            eps=config.pre_mlp_layernorm_epsilon,
        )
        # [Module 10: adaLN] shift/scale/gate for self-attention, (cross-attention,) MLP
        self.adaln = build_module(submodules.adaln, config=config)

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        rotary_pos_emb: Tensor | None = None,
        packed_seq_params: PackedSequence | None = None,
        **unused,
    ) -> tuple[Tensor, Tensor | None]:
        """hidden_states ``[s, 1, h]``; attention_mask: the conditioning ``[N, h]``. ``unused``: the
        inference, RoPE cos/sin and MoE arguments the block always passes."""
        assert packed_seq_params is not None, "DiTModel always passes the pack's PackedSequence"
        seq, runs = packed_seq_params, packed_seq_params.token_runs
        mods = self.adaln(attention_mask)  # 6 or 9 x [N, h], one row per sample
        x = hidden_states

        # [Modules 1-2: modulated norm, self-attention]
        shift, scale, gate = mods[:3]
        out, bias = self.self_attention(
            self.input_layernorm(x, shift, scale, runs),
            attention_mask=None,
            rotary_pos_emb=rotary_pos_emb,
            packed_seq_params=seq.self_attention,
        )
        x = gated_residual(x, _with_bias(out, bias), gate, runs)

        # [Modules 4-5: modulated norm, cross-attention to the text]
        if self.has_cross_attention:
            shift, scale, gate = mods[3:6]
            out, bias = self.cross_attention(
                self.pre_cross_attn_layernorm(x, shift, scale, runs),
                attention_mask=None,
                key_value_states=context,
                packed_seq_params=seq.cross_attention,
            )
            x = gated_residual(x, _with_bias(out, bias), gate, runs)

        # [Modules 7-8: modulated norm, MLP]
        shift, scale, gate = mods[-3:]
        out, bias = self.mlp(self.pre_mlp_layernorm(x, shift, scale, runs))
        x = gated_residual(x, _with_bias(out, bias), gate, runs)
        return make_viewless_tensor(inp=x, requires_grad=x.requires_grad, keep_graph=True), context


def _with_bias(out: Tensor, bias: Tensor | None) -> Tensor:
    """Row-parallel linears return their bias apart (``skip_bias_add``) for fusion; DiT adds it before the gate."""
    return out if bias is None else out + bias
