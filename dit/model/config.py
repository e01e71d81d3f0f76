"""DiTConfig (a Megatron ``TransformerConfig`` with DiT's own fields), its architecture as checkpoints store
it (:data:`ARCHITECTURE_FIELDS`), and a named size -> config (:func:`dit_config`, sizes in ``dit/model/sizes.py``).

Its checks raise :class:`ConfigError` named after its own fields (``timestep_freq_shift``); the command
line (``dit.training.arguments``) maps them to flags."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from dit.errors import ConfigError
from dit.model import te
from dit.model.fp8 import active_recipe, check_fp8_widths
from dit.model.sizes import MODEL_SIZES

ARCHITECTURE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "latent_channels",
    "patch_size",
    "temporal_patch_size",
    "text_embed_dim",
    "max_latent_grid",
    "conditioning",
    "num_classes",
    "position_embedding",
    "adaln_lora_rank",
    "fps_conditioning",
    "qk_layernorm",
    "learn_sigma",
    "timestep_freq_shift",
    "layernorm_epsilon",
    "pre_mlp_layernorm_epsilon",
)
"""The DiTConfig fields that define the model's function; a checkpoint stores them, and sampling, export
and a resumed run rebuild or check the model from them. The rest is run-time choice (layout, precision)."""
RESIZABLE_FIELDS = ("max_latent_grid",)
"""Architecture fields a resumed run may change: they size tables computed, never trained."""


@dataclass
class DiTConfig(TransformerConfig):
    """Everything that shapes a DiT; Megatron's fields keep their meaning, some get DiT defaults."""

    latent_channels: int = 16
    """Channels C of the VAE latent [C, T, H, W]."""

    patch_size: int = 2
    """Spatial patch (height and width) of a token."""

    temporal_patch_size: int = 1
    """Frames per token; tokens are pt*p*p*C wide."""

    text_embed_dim: int = 1024
    """Width D of the text-encoder embeddings cross-attention reads (T5: 1024)."""

    max_latent_grid: tuple[int, int, int] = (64, 256, 256)
    """Largest (T', H', W') patch grid; bounds the sin-cos tables, which never alias past it."""

    conditioning: Literal["text", "class"] = "text"
    """``text``: cross-attention to the text embeddings; ``class``: a label embedding (no cross-attention)."""

    num_classes: int = 1000
    """Classes of ``class`` conditioning; label ``num_classes`` is the null class used for guidance."""

    position_embedding: Literal["rope3d", "sincos3d"] = "rope3d"
    """``rope3d``: rotary over (t, h, w) in self-attention; ``sincos3d``: fixed, added after the patch embedding."""

    adaln_lora_rank: int = 0
    """0: each layer maps the conditioning to its modulation with a full linear; r > 0: a rank-r factorisation."""

    fps_conditioning: bool = False
    """Add an embedding of the video frame rate to the timestep embedding."""

    learn_sigma: bool = False
    """Also predict per-channel variances (the DiT paper's learned sigma, improved DDPM): the output is
    ``[s, 2*token_width]``, the prediction first; see ``prediction_width``."""

    timestep_freq_shift: float = 0.0
    """Timestep sinusoid frequencies ``10000^(-i/(128 - shift))``, i < 128 (the [cos | sin] features of 256
    channels): 0 is the DiT paper's, 1 diffusers' ``downscale_freq_shift=1`` of its DiT port."""

    pre_mlp_layernorm_epsilon: float | None = None
    """Epsilon of the norm before the MLP; None: ``layernorm_epsilon`` (diffusers' DiT port: 1e-5 there,
    1e-6 in its other norms)."""

    has_cond_embedder: bool = True
    """Read by Megatron's ``finalize_model_grads``: conditioning embedders live on every pipeline stage and
    their gradients are all-reduced across stages (parameters marked ``pipeline_parallel``)."""

    # Megatron fields with DiT defaults.
    qk_layernorm: bool = True
    normalization: Literal["LayerNorm", "RMSNorm"] = "RMSNorm"  # the QK-norm; adaLN norms have no parameters
    layernorm_epsilon: float = 1e-6
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_func: Callable = functools.partial(F.gelu, approximate="tanh")
    variable_seq_lengths: bool = True  # packs differ in length, so pipeline p2p sends shapes first
    moe_token_dispatcher_type: str = "alltoall"  # no MoE; Megatron rejects its default with variable lengths
    cuda_graph_scope: list = field(default_factory=list)  # the whole layer; Megatron's default "full" is deprecated
    transformer_impl: Literal["transformer_engine", "local"] = field(
        default_factory=lambda: "transformer_engine" if te.have_transformer_engine() else "local"
    )

    def __post_init__(self) -> None:
        if self.pipeline_dtype is None:  # type: ignore[has-type]  # a TransformerConfig field (Megatron, untyped here)
            self.pipeline_dtype = self.params_dtype  # stages exchange activations in the parameter dtype
        if self.pre_mlp_layernorm_epsilon is None:
            self.pre_mlp_layernorm_epsilon = self.layernorm_epsilon
        super().__post_init__()
        if self.conditioning not in ("text", "class"):
            raise ValueError(f"conditioning must be 'text' or 'class', got {self.conditioning!r}")
        if self.position_embedding not in ("rope3d", "sincos3d"):
            raise ValueError(f"position_embedding must be 'rope3d' or 'sincos3d', got {self.position_embedding!r}")
        if self.position_embedding == "sincos3d" and self.hidden_size % 4:
            raise ConfigError(
                "hidden_size",
                f"sincos3d splits the channels into (w, h) sin-cos quarters: "
                f"{self.hidden_size} must be a multiple of 4",
            )
        if not 0 <= self.timestep_freq_shift < 128:  # 128: half the timestep sinusoid's 256 channels
            raise ConfigError("timestep_freq_shift", f"must be in [0, 128), got {self.timestep_freq_shift}")
        if self.normalization != "RMSNorm":
            raise ValueError("normalization names the QK-norm, which is RMSNorm in both backends")
        if self.hidden_dropout or self.attention_dropout:
            raise ValueError("DiT layers have no dropout; set hidden_dropout and attention_dropout to 0")
        if self.virtual_pipeline_model_parallel_size is not None:  # each chunk would hold its own conditioning
            raise ConfigError(
                "virtual_pipeline_model_parallel_size",
                "virtual pipeline stages are not supported (the conditioning embedders are not "
                "tied across model chunks)",
            )
        if self.apply_rope_fusion:
            raise ValueError(
                "apply_rope_fusion must be off: fused THD RoPE restarts positions per sequence, "
                "3D RoPE needs the per-token (t, h, w) frequencies"
            )
        # each pipeline stage is one TransformerBlock that recomputes
        layers_per_chunk = self.num_layers // self.pipeline_model_parallel_size
        full_uniform = self.recompute_granularity == "full" and self.recompute_method == "uniform"
        if full_uniform and layers_per_chunk % self.recompute_num_layers:
            raise ConfigError(
                "recompute_num_layers",
                f"uniform recompute groups {self.recompute_num_layers} layers, which does not divide "
                f"the {layers_per_chunk} layers of a pipeline stage; pick a divisor",
            )
        if self.recompute_granularity == "selective" and set(self.recompute_modules) != {"core_attn"}:
            raise ValueError(
                f"selective recompute supports recompute_modules=['core_attn'] only, got {self.recompute_modules}"
            )
        if self.fp8:  # TE's shape rule, which holds on any machine (the next check needs TE and a GPU)
            tp = self.tensor_model_parallel_size
            check_fp8_widths(
                self.fp8_recipe,
                {
                    "hidden width": self.hidden_size,
                    f"MLP width / tp={tp}": self.ffn_hidden_size // tp,
                    f"query width / tp={tp}": self.num_attention_heads * self.kv_channels // tp,
                    f"key/value width / tp={tp}": self.num_query_groups * self.kv_channels // tp,
                },
            )
        # the machine- and precision-dependent choices, as flag errors
        te.check_backend(
            self.transformer_impl, self.fp8, half_precision=self.bf16 or self.fp16, fp8_recipe=self.fp8_recipe
        )

    @property
    def active_fp8_recipe(self) -> str | None:
        """The FP8 recipe whose shape rule the packs follow, None without FP8 (``dit.model.fp8.active_recipe``)."""
        return active_recipe(self.fp8, self.fp8_recipe)

    @property
    def token_width(self) -> int:
        """Width of a patchified latent token, pt*p*p*C."""
        return self.temporal_patch_size * self.patch_size**2 * self.latent_channels

    @property
    def prediction_width(self) -> int:
        """Width of the model's output per token: ``token_width``, doubled by ``learn_sigma`` (the
        prediction is the first ``token_width`` channels, the variances the rest, in the same token layout)."""
        return self.token_width * (2 if self.learn_sigma else 1)

    def architecture(self) -> dict[str, Any]:
        """The :data:`ARCHITECTURE_FIELDS` as plain values: what a checkpoint stores."""
        return {name: list(v) if isinstance(v := getattr(self, name), tuple) else v for name in ARCHITECTURE_FIELDS}

    @classmethod
    def from_architecture(cls, saved: dict[str, Any], **fields) -> DiTConfig:
        """The config a checkpoint's stored architecture describes; ``fields`` set layout and precision. A field
        missing from ``saved`` (a checkpoint written before it existed) keeps its default."""
        arch = {name: saved[name] for name in ARCHITECTURE_FIELDS if name in saved}
        if "max_latent_grid" in arch:
            arch["max_latent_grid"] = tuple(arch["max_latent_grid"])
        return cls(**arch, **fields)

    def check_architecture(self, saved: dict[str, Any], source: str) -> None:
        """Refuse weights of another model: every non-resizable architecture field of ``saved`` must be ours."""
        ours = self.architecture()
        for name in ARCHITECTURE_FIELDS:
            if name in RESIZABLE_FIELDS or name not in saved:
                continue
            if saved[name] != ours[name]:
                raise ConfigError(
                    name,
                    f"the checkpoint {source} was trained with {saved[name]}, this run has "
                    f"{ours[name]}; set it to {saved[name]} (or start from scratch)",
                )


def dit_config(size: str, **fields) -> DiTConfig:
    """A DiTConfig of the named size (``MODEL_SIZES``); ``fields`` set the rest."""
    return DiTConfig(**MODEL_SIZES[size]._asdict(), **fields)
