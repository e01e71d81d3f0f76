"""diffusers interop: a ``DiTTransformer2DModel`` (the DiT paper's ImageNet checkpoints are published in this
format) in and out of our class-conditioned DiTModel, computing the same function both ways.

    python -m dit.convert import facebook/DiT-XL-2-256 runs/dit_xl_2 --subfolder transformer
    python -m dit.convert export runs/dit_xl_2 runs/dit_xl_2_diffusers

``import`` writes a Megatron dist checkpoint of the model (``megatron.core.dist_checkpointing``) that stores
its architecture as a training checkpoint does (``dit.checkpoint.description.model_description``). ``export``
reads such a checkpoint or a training run's (``pretrain_dit.py --save``: its latest, or one ``iter_NNNNNNN`` folder),
saved under any TP/PP layout (dist checkpointing reshards it to one process), and writes a diffusers folder
(``save_pretrained``: config.json and the weights). A run is exportable when diffusers computes the same
model: class conditioning, ``--position-embedding sincos3d --no-qk-layernorm --timestep-freq-shift 1``,
square images.

diffusers' port differs from the paper's code in conventions that our config carries, so that the
converted model computes what it computed (:func:`config_from_diffusers`):
- its timestep sinusoid uses ``downscale_freq_shift=1`` -> ``timestep_freq_shift=1`` (the paper: 0); both
  put cos first (``flip_sin_to_cos=True``), as we do;
- the LayerNorm before the MLP has its ``norm_eps`` (1e-5), the others 1e-6 -> ``pre_mlp_layernorm_epsilon``;
- ``out_channels = 2 * in_channels`` predicts learned sigma -> ``learn_sigma`` (ours: the prediction's
  token layout, then the variances' in the same layout);
- every block holds a copy of the timestep and class embedders (equal in the published checkpoints; ours
  has one, and import refuses blocks whose copies differ); the final layer uses block 0's;
- the position table is the paper's 2D sin-cos (our ``sincos3d`` at T = 1); diffusers rescales positions
  for inputs of another size than ``sample_size``, ours does not, so compare at ``sample_size``;
- no QK-norm (``qk_layernorm=False``), biases everywhere, GELU (tanh), separate q/k/v (ours: Megatron's
  fused ``linear_qkv``, interleaved per head).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from megatron.core import dist_checkpointing, parallel_state
from torch import Tensor

from dit.checkpoint.description import model_description, saved_architecture
from dit.checkpoint.files import find_checkpoint
from dit.checkpoint.weights import load_model_weights
from dit.errors import ConfigError
from dit.model.config import DiTConfig
from dit.model.model import DiTModel
from dit.runtime import distributed as runtime

# What diffusers' DiTTransformer2DModel must have for our model to compute the same function.
_DIFFUSERS_FIXED = dict(
    activation_fn="gelu-approximate",
    attention_bias=True,
    norm_type="ada_norm_zero",
    norm_elementwise_affine=False,
    dropout=0.0,
)
_EMBEDDERS = "norm1.emb."  # the per-block copies of the timestep and class embedders
_OURS_FROM_EMBEDDERS = {
    "timestep_embedder.linear_1.": "t_embedder.mlp.0.",
    "timestep_embedder.linear_2.": "t_embedder.mlp.2.",
    "class_embedder.embedding_table.": "class_embedder.table.",
}
_OURS_FROM_BLOCK = {
    "norm1.linear.": "adaln.up.",
    "attn1.to_out.0.": "self_attention.linear_proj.",
    "ff.net.0.proj.": "mlp.linear_fc1.",
    "ff.net.2.": "mlp.linear_fc2.",
}


def _kinds(name: str) -> tuple[str, ...]:
    return ("weight",) if name.endswith("table.") else ("weight", "bias")  # an embedding table has no bias


def config_from_diffusers(diffusers_config: dict, **fields) -> DiTConfig:
    """Our DiTConfig for a diffusers ``DiTTransformer2DModel`` config (``fields`` set the rest: parallel
    sizes, dtype, ...). Raises on a diffusers option our model does not compute."""
    c = diffusers_config
    for key, value in _DIFFUSERS_FIXED.items():
        if c.get(key, value) != value:
            raise ConfigError("source", f"diffusers DiT with {key}={c[key]!r}: only {value!r} converts")
    out = c.get("out_channels") or c["in_channels"]
    if out not in (c["in_channels"], 2 * c["in_channels"]):
        raise ConfigError("source", f"out_channels={out}: only in_channels or 2 * in_channels (learned sigma) convert")
    grid = c["sample_size"] // c["patch_size"]
    return DiTConfig(
        num_layers=c["num_layers"],
        hidden_size=c["num_attention_heads"] * c["attention_head_dim"],
        num_attention_heads=c["num_attention_heads"],
        latent_channels=c["in_channels"],
        patch_size=c["patch_size"],
        max_latent_grid=(1, grid, grid),
        conditioning="class",
        num_classes=c["num_embeds_ada_norm"],
        position_embedding="sincos3d",
        qk_layernorm=False,
        learn_sigma=out == 2 * c["in_channels"],
        timestep_freq_shift=1.0,
        layernorm_epsilon=1e-6,
        pre_mlp_layernorm_epsilon=c.get("norm_eps", 1e-5),
        **fields,
    )


def diffusers_config(config: DiTConfig) -> dict:
    """The ``DiTTransformer2DModel`` config of our model; raises where diffusers cannot compute the same."""
    t, h, w = config.max_latent_grid
    needs = dict(
        conditioning="class",
        position_embedding="sincos3d",
        qk_layernorm=False,
        temporal_patch_size=1,
        adaln_lora_rank=0,
        fps_conditioning=False,
        timestep_freq_shift=1.0,
        layernorm_epsilon=1e-6,
        ffn_hidden_size=4 * config.hidden_size,
        gated_linear_unit=False,
        add_bias_linear=True,
    )
    for key, value in needs.items():
        if getattr(config, key) != value:
            raise ConfigError(
                "checkpoint",
                f"diffusers' DiTTransformer2DModel needs {key}={value!r}, this model has {getattr(config, key)!r}",
            )
    if t != 1 or h != w:
        raise ConfigError(
            "checkpoint", f"diffusers' DiT takes square images: max_latent_grid must be (1, n, n), got {(t, h, w)}"
        )
    return dict(
        num_attention_heads=config.num_attention_heads,
        attention_head_dim=config.kv_channels,
        in_channels=config.latent_channels,
        out_channels=config.prediction_width // config.token_width * config.latent_channels,
        num_layers=config.num_layers,
        sample_size=h * config.patch_size,
        patch_size=config.patch_size,
        num_embeds_ada_norm=config.num_classes,
        norm_eps=config.pre_mlp_layernorm_epsilon,
        **_DIFFUSERS_FIXED,
    )


def state_dict_from_diffusers(state: dict[str, Tensor], config: DiTConfig) -> dict[str, Tensor]:
    """diffusers parameters -> ours (full tensors under our TP=1 names)."""
    heads, p, c = config.num_attention_heads, config.patch_size, config.latent_channels
    blocks = [f"transformer_blocks.{i}." for i in range(config.num_layers)]
    for name in (n for n in state if n.startswith(blocks[0] + _EMBEDDERS)):
        copies = [state[name.replace(blocks[0], b, 1)] for b in blocks]
        if not all(torch.equal(x, copies[0]) for x in copies):
            raise ConfigError(
                "source",
                f"the blocks' copies of {name[len(blocks[0]) :]} differ; our DiT has one conditioning "
                "embedder (the paper's), so only a model with equal copies converts",
            )
    ours = {
        our + kind: state[blocks[0] + _EMBEDDERS + theirs + kind]
        for theirs, our in _OURS_FROM_EMBEDDERS.items()
        for kind in _kinds(our)
    }
    conv = state["pos_embed.proj.weight"]  # [h, C, p, p] -> [h, (ph, pw, C)], our token layout
    ours["patch_embed.weight"] = conv.permute(0, 2, 3, 1).reshape(conv.shape[0], -1)
    ours["patch_embed.bias"] = state["pos_embed.proj.bias"]
    for i, block in enumerate(blocks):
        layer = f"decoder.layers.{i}."
        for theirs, our in _OURS_FROM_BLOCK.items():
            for kind in ("weight", "bias"):
                ours[layer + our + kind] = state[block + theirs + kind]
        for kind in ("weight", "bias"):  # Megatron's fused qkv: per head [q_head; k_head; v_head]
            q, k, v = (state[f"{block}attn1.to_{x}.{kind}"] for x in "qkv")
            ours[f"{layer}self_attention.linear_qkv.{kind}"] = torch.stack(
                [x.unflatten(0, (heads, -1)) for x in (q, k, v)], dim=1
            ).flatten(0, 2)
    ours["final_layer.adaln.up.weight"], ours["final_layer.adaln.up.bias"] = (
        state["proj_out_1.weight"],
        state["proj_out_1.bias"],
    )
    sigma = config.prediction_width // config.token_width  # output rows (pq, k*C + c) -> (k, pq, c)
    for kind in ("weight", "bias"):
        x = state[f"proj_out_2.{kind}"]
        ours[f"final_layer.linear.{kind}"] = x.unflatten(0, (p * p, sigma, c)).transpose(0, 1).flatten(0, 2)
    return ours


def state_dict_to_diffusers(state: dict[str, Tensor], config: DiTConfig) -> dict[str, Tensor]:
    """Our full (TP-gathered) parameters -> diffusers', the inverse of :func:`state_dict_from_diffusers`."""
    heads, p, c = config.num_attention_heads, config.patch_size, config.latent_channels
    theirs = {}
    for i in range(config.num_layers):
        block, layer = f"transformer_blocks.{i}.", f"decoder.layers.{i}."
        for their, our in _OURS_FROM_EMBEDDERS.items():
            for kind in _kinds(our):
                theirs[block + _EMBEDDERS + their + kind] = state[our + kind]
        for their, our in _OURS_FROM_BLOCK.items():
            for kind in ("weight", "bias"):
                theirs[block + their + kind] = state[layer + our + kind]
        for kind in ("weight", "bias"):
            qkv = state[f"{layer}self_attention.linear_qkv.{kind}"].unflatten(0, (heads, 3, -1))
            for j, x in enumerate("qkv"):
                theirs[f"{block}attn1.to_{x}.{kind}"] = qkv[:, j].flatten(0, 1)
    weight = state["patch_embed.weight"]  # [h, (ph, pw, C)] -> [h, C, p, p]
    theirs["pos_embed.proj.weight"] = weight.unflatten(1, (p, p, c)).permute(0, 3, 1, 2)
    theirs["pos_embed.proj.bias"] = state["patch_embed.bias"]
    theirs["proj_out_1.weight"], theirs["proj_out_1.bias"] = (
        state["final_layer.adaln.up.weight"],
        state["final_layer.adaln.up.bias"],
    )
    sigma = config.prediction_width // config.token_width
    for kind in ("weight", "bias"):
        w = state[f"final_layer.linear.{kind}"]
        theirs[f"proj_out_2.{kind}"] = w.unflatten(0, (sigma, p * p, c)).transpose(0, 1).flatten(0, 2)
    return {name: x.contiguous() for name, x in theirs.items()}


def _single_process_model(config: DiTConfig):
    """Our DiTModel (uninitialised) at TP = PP = CP = 1 in this process, local backend (gloo; the CPU layer
    where there is no GPU), whatever layout and backend ``config`` was trained with."""
    runtime.init_distributed()
    if not parallel_state.model_parallel_is_initialized():
        runtime.initialize_model_parallel(runtime.ParallelLayout())
    return DiTModel(
        dataclasses.replace(  # type: ignore[call-arg]  # the layout fields are Megatron's TransformerConfig's
            config,
            tensor_model_parallel_size=1,
            pipeline_model_parallel_size=1,
            context_parallel_size=1,
            sequence_parallel=False,
            transformer_impl="local",
            fp8=None,
            use_cpu_initialization=True,
            perform_initialization=False,
        )
    )


def import_diffusers(source: str, out: Path, subfolder: str | None = None) -> DiTConfig:
    """A diffusers DiT (hub name or folder) -> a dist checkpoint of our model and its config in ``out``."""
    from diffusers import DiTTransformer2DModel  # the prep extra

    try:
        theirs = DiTTransformer2DModel.from_pretrained(source, subfolder=subfolder)
    except OSError as e:  # diffusers' answer to a name the hub and the disk do not have
        raise ConfigError("source", f"cannot load a DiTTransformer2DModel from {source}: {e}") from None
    config = config_from_diffusers(dict(theirs.config))
    model = _single_process_model(config)
    load_parameters(model, state_dict_from_diffusers(theirs.state_dict(), config))
    out.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save({"model": model.sharded_state_dict(), **model_description(config)}, str(out))
    return config


def load_parameters(model: torch.nn.Module, state: dict[str, Tensor]) -> None:
    """Set every parameter of ``model`` (TP = PP = 1) from ``state``; Megatron's ``_extra_state`` keeps its own."""
    result = model.load_state_dict(state, strict=False)
    missing = [name for name in result.missing_keys if not name.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ValueError(f"state does not fit the model: missing {missing}, unexpected {result.unexpected_keys}")


def resolve_checkpoint(path: Path) -> Path:
    """A training run's ``--save`` folder (its tracker names the latest checkpoint) or one checkpoint folder."""
    checkpoint = find_checkpoint(path, flag="checkpoint", required=False) or path
    if not (checkpoint / "metadata.json").is_file():
        raise ConfigError(
            "checkpoint",
            f"{checkpoint} is not a dist checkpoint (no metadata.json): give a "
            "training run's --save folder, one of its iter_NNNNNNN folders, or an import",
        )
    return checkpoint


def checkpoint_config(checkpoint: Path) -> DiTConfig:
    """The model's config, from the architecture the checkpoint stores (training's and import's alike)."""
    common = dist_checkpointing.load_common_state_dict(str(checkpoint))
    return DiTConfig.from_architecture(saved_architecture(common, checkpoint), transformer_impl="local")


def read_checkpoint(checkpoint: Path, config: DiTConfig, use_ema: bool = True) -> dict[str, Tensor]:
    """The model's weights in a Megatron dist checkpoint saved under any parallel layout (by this module's
    import or by ``pretrain_dit.py``, whose checkpoints hold them under the same keys, and their EMA)
    -> full tensors. ``use_ema``: a training run's EMA where it has one."""
    model = _single_process_model(config)
    load_model_weights(model, checkpoint, use_ema)
    return {name: p.detach() for name, p in model.named_parameters()}


def export_diffusers(state: dict[str, Tensor], config: DiTConfig, out: Path) -> None:
    """Our full parameters -> a diffusers folder (``save_pretrained``: config.json and the weights)."""
    from diffusers import DiTTransformer2DModel  # the prep extra

    theirs = DiTTransformer2DModel(**diffusers_config(config))
    theirs.load_state_dict(state_dict_to_diffusers(state, config))  # strict: every parameter, nothing else
    theirs.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dit.convert", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="diffusers DiTTransformer2DModel -> our dist checkpoint")
    imp.add_argument("source", help="hub name or local folder of a DiTTransformer2DModel")
    imp.add_argument("out", type=Path, help="folder for the dist checkpoint")
    imp.add_argument("--subfolder", help="the model's subfolder (a DiT pipeline: transformer)")
    exp = commands.add_parser("export", help="our dist checkpoint (any layout) -> diffusers folder")
    exp.add_argument("checkpoint", type=Path, help="a checkpoint folder, or a training run's --save folder")
    exp.add_argument("out", type=Path, help="diffusers folder to write")
    exp.add_argument("--no-ema", action="store_true", help="Export a training run's raw weights, not its EMA.")
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            config = import_diffusers(args.source, args.out, args.subfolder)
            print(f"imported {args.source}: {config.num_layers} layers, hidden {config.hidden_size} -> {args.out}")
        else:
            checkpoint = resolve_checkpoint(args.checkpoint)
            config = checkpoint_config(checkpoint)
            export_diffusers(read_checkpoint(checkpoint, config, use_ema=not args.no_ema), config, args.out)
            print(f"exported {checkpoint} -> {args.out}")
    except ConfigError as error:  # a user's mistake; anything else is a bug and keeps its traceback
        print(f"python -m dit.convert: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
