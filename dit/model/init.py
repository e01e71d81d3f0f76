"""The DiT paper's weight initialisation, for every parameter of a DiTModel, in one place.

As facebookresearch/DiT's ``initialize_weights``: xavier-uniform linears (the patch embedding included)
with zero biases; the timestep (and fps) MLP, the class table and the text projection N(0, 0.02); the
adaLN modulations and the final linear zero, so that every block starts as the identity and the model
outputs zero (adaLN-Zero). Norm weights (QK-norm) are one.

Megatron's layers draw their weights when they are built (its ``init_method``); this overwrites them.
A tensor-parallel weight gets the xavier bound of the FULL matrix, whatever the TP size:
- with ``use_cpu_initialization`` the full matrix is drawn on every TP rank and each keeps its shard, so
  the shards are exactly the TP=1 weights drawn from the same seed;
- otherwise each rank draws its shard from Megatron's model-parallel RNG state (distinct per TP rank),
  as Megatron does on the GPU: the same distribution without materialising the full matrix.
Replicated parameters are drawn from the default generator, which is equal on every rank of a stage.
"""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state, tensor_parallel
from torch import nn

from dit.model.adaln import AdaLNModulation
from dit.model.config import DiTConfig
from dit.model.embeddings import ClassEmbedder, ScalarEmbedder, TextProjection

EMBEDDING_STD = 0.02  # the DiT paper's N(0, 0.02) for the timestep MLP and the class table


def initialize_weights(model: nn.Module, config: DiTConfig) -> None:
    """Set every parameter of ``model`` (one pipeline stage of a DiTModel) to the paper's initial value."""
    rules: dict[int, str] = {}  # id(parameter) -> rule, where the default below does not apply
    for module in model.modules():
        if isinstance(module, (ScalarEmbedder, ClassEmbedder, TextProjection)):
            rules.update((id(p), "normal") for p in module.parameters() if p.dim() > 1)
        elif isinstance(module, AdaLNModulation):
            rules.update((id(p), "zero") for p in module.up.parameters())
    final_layer = getattr(model, "final_layer", None)
    if final_layer is not None:
        rules.update((id(p), "zero") for p in final_layer.linear.parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            rule = rules.get(id(param)) or ("xavier" if param.dim() > 1 else "zero" if name.endswith("bias") else "one")
            if rule == "xavier":
                _xavier_uniform(param, config)
            elif rule == "normal":
                param.normal_(0.0, EMBEDDING_STD)
            else:
                param.fill_(0.0 if rule == "zero" else 1.0)


def full_shape(param: nn.Parameter) -> list[int]:
    """The shape of the whole matrix a (possibly tensor-parallel) weight is a shard of."""
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= parallel_state.get_tensor_model_parallel_world_size()  # type: ignore[attr-defined]  # Megatron's parameter attribute
    return shape


def xavier_bound(shape: list[int]) -> float:
    """Glorot & Bengio's uniform bound sqrt(6 / (fan_in + fan_out)) of a weight ``[out, in, ...]``."""
    fan_out, fan_in = shape[0], math.prod(shape[1:])
    return math.sqrt(6.0 / (fan_in + fan_out))


def _xavier_uniform(param: nn.Parameter, config: DiTConfig) -> None:
    shape = full_shape(param)
    bound = xavier_bound(shape)
    if shape == list(param.shape):  # replicated
        param.uniform_(-bound, bound)
    elif config.use_cpu_initialization:
        if param.partition_stride != 1:  # type: ignore[attr-defined]  # Megatron's parameter attribute
            raise ValueError("strided tensor-parallel weights are not used by DiT layers")
        full = torch.empty(shape, dtype=param.dtype).uniform_(-bound, bound)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        shard = full.chunk(tp, dim=param.partition_dim)  # type: ignore[attr-defined]  # Megatron's parameter attribute
        param.copy_(shard[parallel_state.get_tensor_model_parallel_rank()])
    else:
        with tensor_parallel.get_cuda_rng_tracker().fork():
            param.uniform_(-bound, bound)
