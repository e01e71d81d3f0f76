"""The command line: Megatron-LM's flag names, DiT's own flags, YAML recipes, and validation.

Arguments become a :class:`~dit.training.run_config.RunConfig` in ONE place (:func:`run_config`); the
library takes configs, never a Namespace. Validation runs before any heavy work and raises
:class:`ConfigError` (dit/errors.py), which the entry point prints as one line naming the flag and the
fix; an error the configs raise in their own field names is renamed to its flag here (:func:`flag_error`).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import yaml

from dit.errors import ConfigError, flag_error
from dit.model import te
from dit.model.sizes import MODEL_SIZES
from dit.training.dataset_folder import check_energon_dataset, has_split

if TYPE_CHECKING:
    from dit.model.config import DiTConfig
    from dit.training.run_config import RunConfig

MIN_ROPE_HEAD_DIM = 12
"""3D RoPE splits a head's rotary pairs over (t, h, w) (``dit.model.embeddings.axis_split``): from 6 pairs on
every axis gets at least one; below that h and w would get none and the model would not see them."""
MAX_SEED = 2**31  # Megatron offsets the seed per rank; torch refuses seeds past 2**63
UNSUPPORTED_FLAGS = {
    "--virtual-pipeline-model-parallel-size": "virtual pipeline stages are not supported (the conditioning "
    "embedders are not tied across model chunks); drop the flag",
    "--num-layers-per-virtual-pipeline-stage": "virtual pipeline stages are not supported; drop the flag",
}
"""Megatron-LM flags this recipe refuses, with the reason (the one place they are refused)."""
NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf$")
"""A negative number, ``-1e-3`` and ``-inf`` included: a flag's value, never a flag (argparse's own rule
misses the exponent, and then says ``--lr: expected one argument``)."""


def refuse_unsupported(flag: str) -> None:
    """Raise the line of a Megatron-LM flag this recipe refuses (:data:`UNSUPPORTED_FLAGS`), if it is one."""
    name = "--" + flag.lstrip("-").split("=")[0].replace("_", "-")
    if name in UNSUPPORTED_FLAGS:
        raise ConfigError(name, UNSUPPORTED_FLAGS[name])


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are :class:`ConfigError` s: one line naming the flag, no usage dump."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)  # --lr-warmup must not pass for --lr-warmup-iters
        self._negative_number_matcher = NUMBER

    def error(self, message: str) -> NoReturn:
        if message.startswith("argument "):  # "argument --lr: invalid float value: 'x'"
            names, _, reason = message[len("argument ") :].partition(": ")
            raise ConfigError(names.split("/")[0], reason)
        if message.startswith("the following arguments are required: "):
            raise ConfigError(message.split(": ", 1)[1], "is required")
        if message.startswith("unrecognized arguments: "):
            refuse_unsupported(message.split()[2])
            raise ConfigError(message.split()[2], "not a flag of this command (see --help)")
        raise ConfigError("usage", message)


def _add_parallel(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP degree.")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP degree.")
    g.add_argument("--context-parallel-size", type=int, default=1, help="CP degree.")
    g.add_argument("--sequence-parallel", action="store_true", help="Sequence parallel (needs TP > 1).")
    g.add_argument(
        "--use-distributed-optimizer", action="store_true", help="Shard optimizer state across data-parallel ranks."
    )
    g.add_argument(
        "--use-megatron-fsdp",
        action="store_true",
        help="Megatron-Core's FSDP: parameters, gradients and optimizer state sharded over DP (x CP), "
        "TP and CP beside it; implies --use-distributed-optimizer (megatron-core 0.17+). "
        "For models whose weights and Adam state do not fit beside TP (DiT-7B video and up). "
        "Checkpoints in the --dist-ckpt-optim-fully-reshardable layout: DDP runs load them and "
        "it loads theirs.",
    )
    g.add_argument(
        "--distributed-timeout-minutes",
        type=float,
        default=10.0,
        help="How long a collective may wait before NCCL/gloo gives up (raise it for slow shared "
        "file systems: a save or a load waits on the slowest rank).",
    )


def _add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model-size",
        choices=sorted(MODEL_SIZES),
        default="DiT-XL",
        help="Named size; --num-layers/--hidden-size/--num-attention-heads override it.",
    )
    g.add_argument("--num-layers", type=int, default=None, help="Transformer layers (default: from --model-size).")
    g.add_argument("--hidden-size", type=int, default=None, help="Hidden width (default: from --model-size).")
    g.add_argument("--num-attention-heads", type=int, default=None, help="Heads (default: from --model-size).")
    g.add_argument("--latent-channels", type=int, default=16, help="Channels of the VAE latent.")
    g.add_argument("--patch-size", type=int, default=2, help="Spatial patch size (height and width).")
    g.add_argument("--temporal-patch-size", type=int, default=1, help="Temporal patch size (frames).")
    g.add_argument("--text-embed-dim", type=int, default=1024, help="Width of the text embeddings (T5: 1024).")
    g.add_argument("--max-seq-length", type=int, default=8192, help="Tokens per packed sequence.")
    g.add_argument(
        "--max-latent-grid",
        type=int,
        nargs=3,
        default=[64, 256, 256],
        metavar=("T", "H", "W"),
        help="Largest latent grid in patches; sin-cos position tables are this big and never alias.",
    )
    g.add_argument(
        "--conditioning",
        choices=["text", "class"],
        default="text",
        help="text: cross-attention to text embeddings; class: label embedding (ImageNet-style DiT).",
    )
    g.add_argument(
        "--num-classes",
        type=int,
        default=1000,
        help="Classes of --conditioning class; label NUM_CLASSES is the null class for guidance.",
    )
    g.add_argument(
        "--position-embedding",
        choices=["rope3d", "sincos3d"],
        default="rope3d",
        help="3D rotary in self-attention, or fixed 3D sin-cos added to the patch embedding.",
    )
    g.add_argument(
        "--qk-layernorm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="RMS-normalise queries and keys per head in self-attention.",
    )
    g.add_argument(
        "--adaln-lora-rank", type=int, default=0, help="Rank of each layer's adaLN modulation (0 = a full linear)."
    )
    g.add_argument(
        "--fps-conditioning",
        action="store_true",
        help="Condition on the video frame rate (added to the timestep embedding).",
    )
    g.add_argument(
        "--timestep-freq-shift",
        type=float,
        default=0.0,
        help="Timestep sinusoid frequencies 10000^(-i/(128 - SHIFT)): 0 the DiT paper's, 1 diffusers' "
        "(needed to export to diffusers).",
    )
    g.add_argument(
        "--transformer-impl",
        choices=["transformer_engine", "local"],
        default=None,
        help="Layer backend (default: transformer_engine when importable, else local).",
    )
    g.add_argument(
        "--recompute-granularity", choices=["full", "selective"], default=None, help="Activation recomputation."
    )
    g.add_argument(
        "--recompute-method",
        choices=["uniform", "block"],
        default="uniform",
        help="How full recomputation groups layers.",
    )
    g.add_argument("--recompute-num-layers", type=int, default=1, help="Layers per recomputation group.")


def _add_precision(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("precision")
    g.add_argument("--bf16", action="store_true", help="bf16 parameters and activations.")
    g.add_argument(
        "--fp8-format",
        choices=["e4m3", "hybrid"],
        default=None,
        help="FP8 through Transformer Engine (needs TE and a GPU).",
    )
    g.add_argument(
        "--fp8-recipe",
        choices=["delayed", "tensorwise", "mxfp8", "blockwise"],
        default="delayed",
        help="FP8 scaling recipe.",
    )


def _add_training(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1, help="Packed sequences per micro-batch.")
    g.add_argument(
        "--global-batch-size",
        type=int,
        default=None,
        help="Packed sequences per step over all DP ranks (default: micro batch x DP).",
    )
    g.add_argument("--train-iters", type=int, default=1000, help="Optimizer steps.")
    g.add_argument(
        "--max-skipped-steps",
        type=int,
        default=10,
        help="Stop after this many consecutive steps skipped for a non-finite loss or grad norm.",
    )
    g.add_argument(
        "--overlap-grad-reduce",
        action="store_true",
        help="Overlap the data-parallel gradient reduction with the backward pass (Megatron DDP).",
    )
    g.add_argument("--seed", type=int, default=1234, help="Seed of the run (init, noise, data order).")


def _add_optimizer(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimizer and learning rate (Megatron's AdamW and OptimizerParamScheduler)")
    g.add_argument("--lr", type=float, default=1e-4, help="Peak learning rate.")
    g.add_argument("--min-lr", type=float, default=0.0, help="Final learning rate of the decay.")
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="Linear warm-up steps from 0 to --lr.")
    g.add_argument(
        "--lr-decay-style", choices=["constant", "linear", "cosine"], default="cosine", help="Decay after warm-up."
    )
    g.add_argument(
        "--lr-decay-iters",
        type=int,
        default=None,
        help="Steps over which the rate decays to --min-lr (unset: --train-iters).",
    )
    g.add_argument(
        "--weight-decay",
        type=float,
        default=0.0,
        help="AdamW weight decay (never applied to biases, norms and embedding tables).",
    )
    g.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1.")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="AdamW beta2.")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon.")
    g.add_argument("--clip-grad", type=float, default=1.0, help="Gradient norm clip (0 = off).")


def _flow_shift(value: str) -> str | float:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {value!r}") from None


def _add_diffusion(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("diffusion objective")
    g.add_argument(
        "--objective",
        choices=["edm", "flow"],
        default="flow",
        help="EDM (preconditioned, log-normal sigma) or rectified flow (logit-normal t).",
    )
    g.add_argument("--edm-p-mean", type=float, default=-1.2, help="EDM: mean of ln(sigma) in training.")
    g.add_argument("--edm-p-std", type=float, default=1.2, help="EDM: standard deviation of ln(sigma).")
    g.add_argument("--sigma-data", type=float, default=0.5, help="EDM: standard deviation of the data.")
    g.add_argument("--flow-logit-mean", type=float, default=0.0, help="Flow: mean of logit(t).")
    g.add_argument("--flow-logit-std", type=float, default=1.0, help="Flow: standard deviation of logit(t).")
    g.add_argument(
        "--flow-shift",
        type=_flow_shift,
        default="auto",
        help="Flow: time shift s in t' = s t / (1 + (s - 1) t); 'auto' sets s = sqrt(tokens / 256) "
        "per sample (SD3's resolution rule), 1 turns it off.",
    )
    g.add_argument(
        "--text-drop-prob",
        type=float,
        default=0.1,
        help="Guidance dropout: chance that a sample trains unconditionally (text -> null text, "
        "class -> the null class) so that classifier-free guidance works.",
    )


def _add_ema_and_validation(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("EMA and validation")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="EMA of the weights (0 = off).")
    g.add_argument(
        "--ema-warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Ramp the EMA decay up as min(decay, (1 + step) / (10 + step)), so that short runs get a useful EMA too.",
    )
    g.add_argument("--eval-interval", type=int, default=None, help="Steps between validations (unset: no validation).")
    g.add_argument("--eval-iters", type=int, default=10, help="Validation batches (of --global-batch-size packs).")
    g.add_argument(
        "--valid-data-path",
        type=str,
        default=None,
        help="Validation dataset (unset: the val split of --data-path, if it has one).",
    )
    g.add_argument("--no-ema", action="store_true", help="Validate the raw weights instead of the EMA.")
    g.add_argument(
        "--skip-train", action="store_true", help="Load the checkpoint, validate once and exit (Megatron-LM's flag)."
    )


def _add_checkpointing(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpointing and exit")
    g.add_argument("--save", type=str, default=None, help="Checkpoint directory to write (and to resume from).")
    g.add_argument("--save-interval", type=int, default=None, help="Steps between checkpoints.")
    g.add_argument(
        "--save-retain", type=int, default=None, help="Keep only the newest N checkpoints in --save (unset: keep all)."
    )
    g.add_argument("--async-save", action="store_true", help="Write checkpoints in the background (GPU).")
    g.add_argument(
        "--dist-ckpt-optim-fully-reshardable",
        action="store_true",
        help="Save the distributed optimizer's state so that it loads under another TP/PP layout too "
        "(gathers each DP group's state on one rank while saving; without it only DP may change).",
    )
    g.add_argument(
        "--load",
        type=str,
        default=None,
        help="Checkpoint directory to resume from (unset: --save, when it holds a checkpoint).",
    )
    g.add_argument("--ckpt-step", type=int, default=None, help="Load this iteration instead of the latest.")
    g.add_argument(
        "--finetune",
        action="store_true",
        help="Load the weights only: fresh optimizer, scheduler, iteration and data stream.",
    )
    g.add_argument("--no-load-optim", action="store_true", help="Do not load the optimizer and scheduler state.")
    g.add_argument("--no-load-rng", action="store_true", help="Do not load the RNG states.")
    g.add_argument(
        "--exit-signal-handler",
        action="store_true",
        help="On SIGTERM (slurm's preemption notice) finish the step, save and exit 0.",
    )
    g.add_argument(
        "--exit-interval", type=int, default=None, help="Save and exit when the iteration is a multiple of N."
    )
    g.add_argument(
        "--exit-duration-in-mins",
        type=float,
        default=None,
        help="Save and exit once the run has trained this many minutes.",
    )


def _add_logging(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=10, help="Steps between log lines.")
    g.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="Peak dense TFLOP/s of one accelerator, for MFU (unset: from the GPU's name; no MFU on CPU).",
    )
    g.add_argument("--tensorboard-dir", type=str, default=None, help="TensorBoard log directory.")
    g.add_argument(
        "--wandb-project", type=str, default=None, help="Weights & Biases project (WANDB_MODE=offline is honoured)."
    )
    g.add_argument("--wandb-exp-name", type=str, default=None, help="Weights & Biases run name.")
    g.add_argument(
        "--sample-log",
        type=str,
        default=None,
        help="Directory for a JSON line per step and DP replica: its loss and the keys of its samples.",
    )


def _add_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data-path", type=str, default=None, help="An energon dataset (a folder prepared by `energon prepare`)."
    )
    g.add_argument("--num-workers", type=int, default=2, help="Loader worker processes per rank.")
    g.add_argument(
        "--packing-buffer-size",
        type=int,
        default=200,
        help="Samples per packing buffer (larger packs better, see DESIGN.md).",
    )
    g.add_argument(
        "--max-bad-sample-fraction",
        type=float,
        default=0.01,
        help="Stop the run when more than this fraction of samples was skipped as broken.",
    )
    g.add_argument(
        "--no-packing",
        action="store_true",
        help="Pad each sample to --max-seq-length instead of packing (comparison, models without THD).",
    )
    g.add_argument(
        "--max-text-length",
        type=int,
        default=512,
        help="Rows a text embedding may have (T5: 512 tokens); longer ones are skipped and counted.",
    )
    g.add_argument(
        "--text-padding",
        choices=["trim-zeros", "keep"],
        default="trim-zeros",
        help="trim-zeros: drop a text embedding's trailing all-zero rows (the padding NeMo's, DFM's and "
        "Wan's writers add); keep: train on every row (a model trained on padded text, as Wan is).",
    )
    g.add_argument(
        "--text-embedding-key",
        type=str,
        default="prompt_embeds",
        help="The entry of a .pickle that holds a dict (Flux's writer) to read as the text embedding; "
        "the other entries are ignored.",
    )
    g.add_argument(
        "--oversize-policy",
        choices=["skip", "error"],
        default="skip",
        help="A sample longer than --max-seq-length (or its text longer than --max-text-length) is "
        "skipped and counted, or stops the run.",
    )


def _add_launch(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("launch check")
    g.add_argument(
        "--validate-only",
        action="store_true",
        help="Check the flags, the recipe and the dataset for a launch, in one plain process, then exit "
        "(0: all good; 2 and one line naming the flag otherwise). Run it before torchrun.",
    )
    g.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="With --validate-only: the number of processes of the launch to check "
        "(nodes x --nproc-per-node; default: 1, or torchrun's WORLD_SIZE).",
    )


def build_parser(prog: str = "pretrain_dit.py") -> ArgumentParser:
    p = ArgumentParser(
        prog=prog,
        description="Pretrain a diffusion transformer with Megatron-Core on energon data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--config",
        type=str,
        default=None,
        help="YAML recipe whose keys are these flags' names; the command line overrides it.",
    )
    for add in (
        _add_parallel,
        _add_model,
        _add_precision,
        _add_training,
        _add_optimizer,
        _add_diffusion,
        _add_ema_and_validation,
        _add_checkpointing,
        _add_logging,
        _add_data,
        _add_launch,
    ):
        add(p)
    return p


def _recipe_tokens(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """A YAML recipe as command-line tokens, so argparse checks its types and choices like flags'."""
    if not Path(path).is_file():
        raise ConfigError("--config", f"{path} does not exist")
    try:
        recipe = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError("--config", f"{path} is not valid YAML ({e.__class__.__name__})") from None
    if not isinstance(recipe, dict):
        raise ConfigError("--config", f"{path} must hold a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    tokens: list[str] = []
    for key, value in recipe.items():
        action = actions.get(str(key).lstrip("-").replace("-", "_"))
        if action is None:
            try:
                refuse_unsupported(str(key))
            except ConfigError as e:
                raise ConfigError("--config", f"{path}: {e}") from None
        if action is None or action.dest in ("config", "help"):
            raise ConfigError("--config", f"{path}: unknown key '{key}' (see --help for the flag names)")
        flag = action.option_strings[0]
        if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
            if not isinstance(value, bool):
                raise ConfigError("--config", f"{path}: '{key}' takes true or false, got {value!r}")
            if isinstance(action, argparse.BooleanOptionalAction):
                tokens.append(flag if value else "--no-" + flag[2:])
            elif value:
                tokens.append(flag)
        elif value is None:  # YAML null: the flag's "unset", where it has one
            if action.default is not None:
                raise ConfigError(
                    "--config",
                    f"{path}: '{key}' is null; give it a value or delete the line (its default is {action.default})",
                )
        elif isinstance(value, (list, dict)) and (action.nargs is None or isinstance(value, dict)):
            raise ConfigError("--config", f"{path}: '{key}' takes one value, got {value!r}")
        else:
            tokens += [flag, *map(str, value if isinstance(value, list) else [value])]
    try:  # the recipe alone first, so that its mistakes name the recipe
        ArgumentParser(parents=[parser], add_help=False).parse_args(tokens)
    except ConfigError as e:
        raise ConfigError("--config", f"{path}: {e}") from None
    return tokens


def parse_args(argv: Sequence[str] | None = None, prog: str = "pretrain_dit.py") -> argparse.Namespace:
    """Parse flags over an optional ``--config`` recipe and fill derived values (not validated)."""
    parser = build_parser(prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    pre, _ = parser.parse_known_args(argv)
    recipe = _recipe_tokens(parser, pre.config) if pre.config else []
    args = parser.parse_args(recipe + argv)  # later tokens win: the command line overrides the recipe
    size = MODEL_SIZES[args.model_size]
    for name in ("num_layers", "hidden_size", "num_attention_heads"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(size, name))
    if args.transformer_impl is None:
        args.transformer_impl = "transformer_engine" if te.have_transformer_engine() else "local"
    return args


def _check_parallel(args: argparse.Namespace, world_size: int) -> None:
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    for flag, value in (
        ("--tensor-model-parallel-size", tp),
        ("--pipeline-model-parallel-size", pp),
        ("--context-parallel-size", cp),
        ("--micro-batch-size", args.micro_batch_size),
    ):
        if value < 1:
            raise ConfigError(flag, f"must be >= 1, got {value}")
    if world_size % (tp * pp * cp):
        raise ConfigError(
            "--tensor-model-parallel-size",
            f"world size {world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp} = {tp * pp * cp}; "
            "change the parallel sizes or the number of processes (torchrun --nproc-per-node)",
        )
    if args.num_attention_heads % tp:
        raise ConfigError(
            "--tensor-model-parallel-size",
            f"{args.num_attention_heads} attention heads are not divisible by tp={tp}; "
            "pick a tp that divides the head count",
        )
    if args.num_layers % pp:
        raise ConfigError(
            "--pipeline-model-parallel-size",
            f"{args.num_layers} layers are not divisible into {pp} pipeline stages; "
            "pick a pp that divides --num-layers",
        )
    if args.sequence_parallel and tp == 1:
        raise ConfigError("--sequence-parallel", "needs --tensor-model-parallel-size > 1; drop the flag or raise tp")
    dp = world_size // (tp * pp * cp)
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise ConfigError(
            "--global-batch-size",
            f"{args.global_batch_size} is not a multiple of micro batch x DP = {args.micro_batch_size}x{dp}",
        )


def _check_megatron_fsdp(args: argparse.Namespace) -> None:
    """What Megatron-FSDP runs with here: proven against DDP with DP, TP and CP
    (tests/integration/test_training_layouts.py), its checkpoints to and from DDP runs, beside TP and CP
    (tests/integration/test_checkpoint_fsdp.py)."""
    if not args.use_megatron_fsdp:
        return
    from dit.runtime.mcore019 import megatron_fsdp_missing

    missing = megatron_fsdp_missing()
    _require("--use-megatron-fsdp", missing is None, missing or "")
    _require(
        "--use-megatron-fsdp",
        args.pipeline_model_parallel_size == 1,
        "not proven with pipeline parallelism yet; use TP/CP beside it, or DDP with PP",
    )
    args.use_distributed_optimizer = True  # FSDP's main weights are stepped by Megatron's DistributedOptimizer


def _check_backend(args: argparse.Namespace) -> None:
    try:
        te.check_backend(args.transformer_impl, args.fp8_format, half_precision=args.bf16, fp8_recipe=args.fp8_recipe)
    except ConfigError as e:
        raise flag_error(e) from None


def _require(flag: str, ok: bool, message: str) -> None:
    """Raise the flag's one-line error unless ``ok`` (written so that NaN fails every range check)."""
    if not ok:
        raise ConfigError(flag, message)


def _at_least(low: int, *flags: str, args: argparse.Namespace) -> None:
    for flag in flags:
        value = getattr(args, flag[2:].replace("-", "_"))
        _require(flag, value >= low, f"must be >= {low}, got {value}")


def _check_model(args: argparse.Namespace) -> None:
    _at_least(
        1,
        "--num-layers",
        "--hidden-size",
        "--num-attention-heads",
        "--latent-channels",
        "--patch-size",
        "--temporal-patch-size",
        "--text-embed-dim",
        "--max-seq-length",
        "--num-classes",
        "--recompute-num-layers",
        "--max-text-length",
        args=args,
    )
    _at_least(0, "--adaln-lora-rank", args=args)
    _require("--max-latent-grid", min(args.max_latent_grid) >= 1, f"each side must be >= 1, got {args.max_latent_grid}")
    heads, hidden = args.num_attention_heads, args.hidden_size
    _require(
        "--hidden-size",
        hidden % heads == 0,
        f"{hidden} is not divisible by --num-attention-heads {heads}; pick a multiple of the head count",
    )
    head_dim = hidden // heads
    if args.position_embedding == "rope3d":
        _require(
            "--hidden-size",
            head_dim % 2 == 0 and head_dim >= MIN_ROPE_HEAD_DIM,
            f"3D RoPE needs an even head dim (--hidden-size / --num-attention-heads) of at least "
            f"{MIN_ROPE_HEAD_DIM}, so that t, h and w each get a rotary pair; got {hidden}/{heads} = {head_dim}",
        )
    else:  # sin-cos splits the hidden size over (t, h, w) in sin/cos pairs
        _require(
            "--hidden-size",
            hidden % 2 == 0 and hidden >= 6,
            f"3D sin-cos needs an even --hidden-size of at least 6, got {hidden}",
        )


def _check_training(args: argparse.Namespace) -> None:
    _require("--global-batch-size", args.global_batch_size >= 1, f"must be >= 1, got {args.global_batch_size}")
    _require("--seed", 0 <= args.seed < MAX_SEED, f"must be in [0, 2**31), got {args.seed}")
    _require("--train-iters", args.train_iters >= 1, f"must be >= 1, got {args.train_iters}")
    _require("--max-skipped-steps", args.max_skipped_steps >= 1, f"must be >= 1, got {args.max_skipped_steps}")
    _require("--lr", 0 < args.lr < math.inf, f"must be a positive number, got {args.lr}")
    _require("--min-lr", 0 <= args.min_lr <= args.lr, f"must be between 0 and --lr {args.lr}, got {args.min_lr}")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    _require("--lr-decay-iters", args.lr_decay_iters >= 1, f"must be >= 1, got {args.lr_decay_iters}")
    _require(
        "--lr-warmup-iters",
        0 <= args.lr_warmup_iters < args.lr_decay_iters,
        f"must be >= 0 and shorter than the decay ({args.lr_decay_iters} steps: --lr-decay-iters, by default "
        f"--train-iters), got {args.lr_warmup_iters}",
    )
    _require("--weight-decay", 0 <= args.weight_decay < math.inf, f"must be >= 0, got {args.weight_decay}")
    for flag, beta in (("--adam-beta1", args.adam_beta1), ("--adam-beta2", args.adam_beta2)):
        _require(flag, 0 <= beta < 1, f"must be in [0, 1), got {beta}")
    _require("--adam-eps", 0 < args.adam_eps < math.inf, f"must be a positive number, got {args.adam_eps}")
    _require(
        "--clip-grad", 0 <= args.clip_grad < math.inf, f"must be >= 0 (0 turns clipping off), got {args.clip_grad}"
    )
    for flag, value in (
        ("--edm-p-std", args.edm_p_std),
        ("--sigma-data", args.sigma_data),
        ("--flow-logit-std", args.flow_logit_std),
    ):
        _require(flag, 0 < value < math.inf, f"must be a positive number, got {value}")
    for flag, value in (("--edm-p-mean", args.edm_p_mean), ("--flow-logit-mean", args.flow_logit_mean)):
        _require(flag, math.isfinite(value), f"must be a finite number, got {value}")
    if args.flow_shift != "auto":
        _require(
            "--flow-shift",
            0 < args.flow_shift < math.inf,
            f"must be 'auto' or a positive number, got {args.flow_shift}",
        )
    _require("--text-drop-prob", 0 <= args.text_drop_prob <= 1, f"must be in [0, 1], got {args.text_drop_prob}")
    _require("--ema-decay", 0 <= args.ema_decay < 1, f"must be in [0, 1) (0 turns the EMA off), got {args.ema_decay}")


def _check_intervals(args: argparse.Namespace) -> None:
    for flag in (
        "--log-interval",
        "--eval-interval",
        "--eval-iters",
        "--save-interval",
        "--save-retain",
        "--exit-interval",
    ):
        value = getattr(args, flag[2:].replace("-", "_"))
        _require(flag, value is None or value >= 1, f"must be >= 1, got {value}")
    _require(
        "--exit-duration-in-mins",
        args.exit_duration_in_mins is None or args.exit_duration_in_mins > 0,
        f"must be a positive number of minutes, got {args.exit_duration_in_mins}",
    )
    _require(
        "--distributed-timeout-minutes",
        0 < args.distributed_timeout_minutes < math.inf,
        f"must be a positive number of minutes, got {args.distributed_timeout_minutes}",
    )
    _require("--ckpt-step", args.ckpt_step is None or args.ckpt_step >= 0, f"must be >= 0, got {args.ckpt_step}")
    _require(
        "--peak-tflops",
        args.peak_tflops is None or 0 < args.peak_tflops < math.inf,
        f"must be a positive number, got {args.peak_tflops}",
    )
    _require("--save-interval", args.save_interval is None or args.save is not None, "needs --save DIR")
    _require("--save-retain", args.save_retain is None or args.save is not None, "needs --save DIR")
    _require("--async-save", not args.async_save or args.save is not None, "needs --save DIR")
    _require(
        "--dist-ckpt-optim-fully-reshardable",
        not args.dist_ckpt_optim_fully_reshardable or args.use_distributed_optimizer,
        "concerns the distributed optimizer: add --use-distributed-optimizer or drop the flag",
    )
    _require(
        "--sample-log",
        args.sample_log is None or not Path(args.sample_log).is_file(),
        f"{args.sample_log} is a file; give a directory",
    )
    for flag, used in (
        ("--ckpt-step", args.ckpt_step is not None),
        ("--finetune", args.finetune),
        ("--skip-train", args.skip_train),
    ):
        _require(
            flag,
            not used or args.load is not None or args.save is not None,
            "needs a checkpoint to load: --load DIR (or --save DIR holding one)",
        )
    _require("--wandb-exp-name", args.wandb_exp_name is None or args.wandb_project is not None, "needs --wandb-project")
    for flag, module, extra in (
        ("--tensorboard-dir", "tensorboard", args.tensorboard_dir),
        ("--wandb-project", "wandb", args.wandb_project),
    ):
        _require(
            flag,
            extra is None or importlib.util.find_spec(module) is not None,
            f"needs the {module} package: pip install -e '.[log]' (or drop the flag)",
        )


def check_loader_flags(args: argparse.Namespace) -> None:
    """The loader's flags, which energon or the task encoder would otherwise reject with a traceback."""
    if not 0.0 <= args.max_bad_sample_fraction <= 1.0:
        raise ConfigError("--max-bad-sample-fraction", "must be between 0 and 1")
    if args.packing_buffer_size < 1:
        raise ConfigError("--packing-buffer-size", f"must be >= 1, got {args.packing_buffer_size}")
    if args.num_workers < 0:
        raise ConfigError("--num-workers", f"must be >= 0, got {args.num_workers}")
    if not args.no_packing and args.micro_batch_size != 1:
        raise ConfigError(
            "--micro-batch-size",
            "with sequence packing a micro-batch is one pack; use 1 and size "
            "--max-seq-length instead, or pass --no-packing",
        )


def validation_source(args: argparse.Namespace) -> tuple[str, str] | None:
    """(dataset, split) validation reads: ``--valid-data-path`` (its val split, or all of it when it has
    none), else the val split of ``--data-path``; None when there is neither."""
    if args.valid_data_path is not None:
        return args.valid_data_path, "val" if has_split(args.valid_data_path, "val") else "train"
    if args.data_path is not None and has_split(args.data_path, "val"):
        return args.data_path, "val"
    return None


def _check_data(args: argparse.Namespace) -> None:
    if args.data_path is None:
        raise ConfigError("--data-path", "is required: point it at a dataset prepared with `energon prepare`")
    check_energon_dataset(args.data_path)
    if args.valid_data_path is not None:
        check_energon_dataset(args.valid_data_path, "--valid-data-path")
    check_loader_flags(args)
    if (args.eval_interval is not None or args.skip_train) and validation_source(args) is None:
        raise ConfigError(
            "--eval-interval" if args.eval_interval is not None else "--skip-train",
            f"{args.data_path} has no val split: pass --valid-data-path DATASET, or prepare the "
            "dataset with a val share (energon prepare --split-ratio 0.95,0.05,0)",
        )


def validate_args(args: argparse.Namespace, world_size: int, *, need_data: bool = True) -> argparse.Namespace:
    """Check the flags against each other, the world size and this machine; fill the derived ones."""
    _check_model(args)
    _check_parallel(args, world_size)
    _check_megatron_fsdp(args)
    _check_backend(args)
    _check_training(args)
    _check_intervals(args)
    if need_data:
        _check_data(args)
    if args.load is not None and not Path(args.load).exists():
        raise ConfigError("--load", f"{args.load} does not exist")
    _check_save(args.save)
    return args


def _check_save(save: str | None) -> None:
    """``--save`` must be a folder this process can create or write, not a path under a file."""
    if save is None:
        return
    path = Path(save).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if existing.is_file():
        where = "is a file" if existing == path else f"is under {existing}, which is a file"
        raise ConfigError("--save", f"{save} {where}; give a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            "--save",
            f"{save} cannot be written ({existing} is not writable for this user); give a directory you can write",
        )


def model_config(args: argparse.Namespace) -> DiTConfig:
    """The one place where parsed flags become a DiTConfig; its field-named errors become flag errors."""
    from dit.model.config import DiTConfig

    full = args.recompute_granularity == "full"
    try:
        return DiTConfig(
            num_layers=args.num_layers,
            hidden_size=args.hidden_size,
            num_attention_heads=args.num_attention_heads,
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            context_parallel_size=args.context_parallel_size,
            sequence_parallel=args.sequence_parallel,
            latent_channels=args.latent_channels,
            patch_size=args.patch_size,
            temporal_patch_size=args.temporal_patch_size,
            text_embed_dim=args.text_embed_dim,
            max_latent_grid=tuple(args.max_latent_grid),
            conditioning=args.conditioning,
            num_classes=args.num_classes,
            position_embedding=args.position_embedding,
            qk_layernorm=args.qk_layernorm,
            adaln_lora_rank=args.adaln_lora_rank,
            fps_conditioning=args.fps_conditioning,
            timestep_freq_shift=args.timestep_freq_shift,
            transformer_impl=args.transformer_impl,
            recompute_granularity=args.recompute_granularity,
            recompute_method=args.recompute_method if full else None,
            recompute_num_layers=args.recompute_num_layers if full else None,
            bf16=args.bf16,
            params_dtype=_torch_dtype(args.bf16),
            fp8=args.fp8_format,
            fp8_recipe=args.fp8_recipe,
        )
    except ConfigError as e:
        raise flag_error(e) from None


def _torch_dtype(bf16: bool):
    import torch

    return torch.bfloat16 if bf16 else torch.float32


def run_config(args: argparse.Namespace, world_size: int, *, need_data: bool = True) -> RunConfig:
    """Validate parsed flags for a launch of ``world_size`` processes and convert them, once, into the
    RunConfig everything past the command line reads. Raises :class:`ConfigError` on the first mistake."""
    from dit.training.run_config import (
        CheckpointConfig,
        DataConfig,
        EvaluationConfig,
        LoggingConfig,
        ObjectiveConfig,
        OptimizerConfig,
        RunConfig,
        TrainingConfig,
    )

    validate_args(args, world_size, need_data=need_data)
    a = args
    run = RunConfig(
        model=model_config(a),
        training=TrainingConfig(
            train_iters=a.train_iters,
            micro_batch_size=a.micro_batch_size,
            global_batch_size=a.global_batch_size,
            seed=a.seed,
            max_skipped_steps=a.max_skipped_steps,
            distributed_timeout_minutes=a.distributed_timeout_minutes,
            exit_interval=a.exit_interval,
            exit_duration_in_mins=a.exit_duration_in_mins,
            exit_signal_handler=a.exit_signal_handler,
        ),
        optimizer=OptimizerConfig(
            lr=a.lr,
            min_lr=a.min_lr,
            lr_warmup_iters=a.lr_warmup_iters,
            lr_decay_iters=a.lr_decay_iters,
            lr_decay_style=a.lr_decay_style,
            weight_decay=a.weight_decay,
            adam_beta1=a.adam_beta1,
            adam_beta2=a.adam_beta2,
            adam_eps=a.adam_eps,
            clip_grad=a.clip_grad,
            use_distributed_optimizer=a.use_distributed_optimizer,
            overlap_grad_reduce=a.overlap_grad_reduce,
            use_megatron_fsdp=a.use_megatron_fsdp,
        ),
        objective=ObjectiveConfig(
            objective=a.objective,
            edm_p_mean=a.edm_p_mean,
            edm_p_std=a.edm_p_std,
            sigma_data=a.sigma_data,
            flow_logit_mean=a.flow_logit_mean,
            flow_logit_std=a.flow_logit_std,
            flow_shift=a.flow_shift,
            text_drop_prob=a.text_drop_prob,
        ),
        data=DataConfig(
            data_path=a.data_path,
            max_seq_length=a.max_seq_length,
            max_text_length=a.max_text_length,
            text_padding=a.text_padding,
            text_embedding_key=a.text_embedding_key,
            num_workers=a.num_workers,
            packing_buffer_size=a.packing_buffer_size,
            max_bad_sample_fraction=a.max_bad_sample_fraction,
            oversize_policy=a.oversize_policy,
            packing=not a.no_packing,
            valid_data_path=a.valid_data_path,
            validation=validation_source(a) if need_data else None,
        ),
        checkpoint=CheckpointConfig(
            save=a.save,
            save_interval=a.save_interval,
            save_retain=a.save_retain,
            async_save=a.async_save,
            fully_reshardable_optimizer=a.dist_ckpt_optim_fully_reshardable,
            load=a.load,
            ckpt_step=a.ckpt_step,
            finetune=a.finetune,
            load_optim=not a.no_load_optim,
            load_rng=not a.no_load_rng,
        ),
        logging=LoggingConfig(
            log_interval=a.log_interval,
            peak_tflops=a.peak_tflops,
            tensorboard_dir=a.tensorboard_dir,
            wandb_project=a.wandb_project,
            wandb_exp_name=a.wandb_exp_name,
            sample_log=a.sample_log,
        ),
        evaluation=EvaluationConfig(
            ema_decay=a.ema_decay,
            ema_warmup=a.ema_warmup,
            eval_interval=a.eval_interval,
            eval_iters=a.eval_iters,
            use_ema=not a.no_ema,
            skip_train=a.skip_train,
        ),
        world_size=world_size,
    )
    _check_checkpoint(run)
    return run


def load_run_config(argv: Sequence[str], world: int | None = None, *, need_data: bool = True) -> RunConfig:
    """:func:`run_config` of a command line (with its ``--config`` recipe), for a launch of ``world`` processes
    (None: ``--world-size``, or the launched world)."""
    args = parse_args(argv)
    return run_config(args, world_size(args) if world is None else world, need_data=need_data)


def loader_run_config(args: argparse.Namespace) -> RunConfig:
    """The RunConfig of a recipe's data path alone (``data.report``, the data benchmark): the loader's flags
    checked, for one model replica (the world of its TP x PP x CP), any dataset."""
    check_loader_flags(args)
    replica = args.tensor_model_parallel_size * args.pipeline_model_parallel_size * args.context_parallel_size
    return run_config(args, replica, need_data=False)


def _check_checkpoint(run: RunConfig) -> None:
    """What the run starts from, before it starts: ``--load`` holds a checkpoint, ``--ckpt-step`` names a
    complete one, ``--finetune`` / ``--skip-train`` find one, and its model is this run's."""
    from megatron.core import dist_checkpointing

    from dit.training.checkpointing import find_checkpoint, saved_architecture

    ckpt = run.checkpoint
    path = find_checkpoint(ckpt)
    if path is not None:
        common = dist_checkpointing.load_common_state_dict(str(path))
        try:
            run.model.check_architecture(saved_architecture(common, path), str(path))
        except ConfigError as e:
            raise flag_error(e) from None
        return
    for flag, used in (("--finetune", ckpt.finetune), ("--skip-train", run.evaluation.skip_train)):
        if used:
            raise ConfigError(
                flag,
                f"needs a checkpoint to load, and --save {ckpt.save} holds none: pass --load DIR "
                "(a --save folder of an earlier run), or drop the flag to train from scratch",
            )


def launched_world_size() -> int:
    """The world size torchrun announces, or 1 for a plain ``python`` process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def world_size(args: argparse.Namespace) -> int:
    """The launch's process count: ``--world-size`` (with ``--validate-only``), else the launched one."""
    if args.world_size is None:
        return launched_world_size()
    _require("--world-size", args.validate_only, "needs --validate-only (a launch's size is torchrun's)")
    _require("--world-size", args.world_size >= 1, f"must be >= 1, got {args.world_size}")
    return args.world_size
