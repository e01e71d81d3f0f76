"""Sample latents from a training checkpoint.

    python -m dit.generate --load CKPT --latent-shape C,T,H,W --num-samples N --steps S --guidance G \\
        --seed SEED --output OUT.pt [--text-embedding F.pickle ... | --class-label K ... |
        --caption "..." ... --text-encoder NAME] [--vae NAME] [--png-grid GRID.png]

The model's shape and objective come from the checkpoint, which stores them, so no model flag is repeated; its EMA
weights are used when it has them (``--no-ema``: the raw weights). One row of ``--num-samples`` samples
per condition; ``torchrun --nproc-per-node N`` with ``--tensor-model-parallel-size`` /
``--context-parallel-size`` for models that do not fit one GPU. EDM samples with Heun (Karras et al.
Algorithm 2), flow with Heun or Euler on the training shift's time grid; classifier-free guidance
uses the null conditioning training dropped to. The latents ``[N, C, T, H, W]`` go to ``--output``;
``--vae`` decodes them to PNG (images) or MP4 (videos) beside it; ``--png-grid`` writes latents that
are pixels already (the digits quick start) as one grid.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from dit.checkpoint.description import saved_architecture, saved_objective
from dit.checkpoint.files import find_checkpoint
from dit.checkpoint.weights import load_model_weights
from dit.diffusion.guidance import Condition, GuidedPrediction
from dit.diffusion.objective import Objective
from dit.diffusion.samplers import SamplingOptions
from dit.encoders import TextEncoder, VaeEncoder
from dit.errors import ConfigError, flag_error
from dit.model import te
from dit.model.config import DiTConfig
from dit.model.model import DiTModel
from dit.runtime import distributed as runtime
from dit.runtime.console import quiet_library_warnings, user_error
from dit.safe_pickle import loads

PROG = "python -m dit.generate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="Checkpoint directory (a --save folder of pretrain_dit.py).")
    p.add_argument("--ckpt-step", type=int, default=None, help="Iteration to load (default: the latest).")
    p.add_argument("--latent-shape", required=True, help="C,T,H,W (or C,H,W for images) of each latent.")
    p.add_argument("--num-samples", type=int, default=4, help="Samples per condition.")
    p.add_argument("--steps", type=int, default=32, help="Sampler steps (Heun: two network calls each but the last).")
    p.add_argument("--guidance", type=float, default=4.0, help="Classifier-free guidance scale (1: none).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the initial noise.")
    p.add_argument("--output", required=True, help="Where to write the latents [N, C, T, H, W] (.pt).")
    p.add_argument("--sampler", choices=["heun", "euler"], default="heun", help="Flow models: the ODE solver.")
    p.add_argument("--sigma-min", type=float, default=0.002, help="EDM: the last noise level before 0.")
    p.add_argument("--sigma-max", type=float, default=80.0, help="EDM: the first noise level.")
    p.add_argument("--rho", type=float, default=7.0, help="EDM: the spacing exponent of the noise levels.")
    cond = p.add_argument_group("conditioning (one row of samples per value; none: unconditional)")
    cond.add_argument(
        "--text-embedding", nargs="+", default=[], help="Text embeddings [L, D] in the dataset's .pickle format."
    )
    cond.add_argument("--caption", nargs="+", default=[], help="Captions, encoded with --text-encoder.")
    cond.add_argument("--text-encoder", default=None, help="Hub name or folder of the text encoder (transformers).")
    cond.add_argument("--text-encoder-subfolder", default=None)
    cond.add_argument("--tokenizer-subfolder", default=None)
    cond.add_argument(
        "--class-label", type=int, nargs="+", default=[], help="Class labels of a class-conditioned model."
    )
    cond.add_argument("--fps", type=float, default=0.0, help="Frame rate, for fps-conditioned models (0: an image).")
    out = p.add_argument_group("weights, parallelism and output")
    out.add_argument("--no-ema", action="store_true", help="Use the raw weights instead of the EMA.")
    out.add_argument("--bf16", action="store_true", help="Run the network in bf16.")
    out.add_argument("--tensor-model-parallel-size", type=int, default=1)
    out.add_argument("--context-parallel-size", type=int, default=1)
    out.add_argument("--vae", default=None, help="Decode with this diffusers VAE (hub name or folder) to PNG / MP4.")
    out.add_argument("--vae-subfolder", default=None)
    out.add_argument("--png-grid", default=None, help="Write the latents, pixels in [-1, 1] already, as one PNG grid.")
    return p


def parse_shape(text: str) -> tuple[int, int, int, int]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) not in (3, 4) or min(shape) < 1:
        raise ConfigError("--latent-shape", f"expected C,T,H,W or C,H,W of positive integers, got {text!r}")
    return (shape[0], shape[1], shape[2], shape[3]) if len(shape) == 4 else (shape[0], 1, shape[1], shape[2])


def conditions(args: argparse.Namespace, config: DiTConfig) -> list[Condition]:
    given = [bool(args.text_embedding), bool(args.caption), bool(args.class_label)]
    if sum(given) > 1:
        raise ConfigError("--text-embedding", "give one of --text-embedding, --caption and --class-label")
    if config.conditioning == "class":
        if args.text_embedding or args.caption:
            raise ConfigError("--class-label", "this model is class-conditioned: pass --class-label K")
        bad = [k for k in args.class_label if not 0 <= k < config.num_classes]
        if bad:
            raise ConfigError("--class-label", f"{bad[0]} is outside [0, {config.num_classes})")
        return [Condition(label=k, fps=args.fps) for k in args.class_label] or [
            Condition(label=config.num_classes, fps=args.fps)
        ]
    if args.class_label:
        raise ConfigError("--class-label", "this model is text-conditioned: pass --text-embedding or --caption")
    texts = []
    for name in args.text_embedding:
        try:
            value = loads(Path(name).read_bytes())
        except (OSError, Exception) as e:  # a missing file, or a pickle that is not plain data
            raise ConfigError("--text-embedding", f"cannot read {name}: {e}") from None
        value = torch.as_tensor(value).float()
        if value.dim() != 2 or value.shape[1] != config.text_embed_dim:
            raise ConfigError(
                "--text-embedding", f"{name} holds {tuple(value.shape)}, not [L, {config.text_embed_dim}]"
            )
        texts.append(value)
    if args.caption:
        if args.text_encoder is None:
            raise ConfigError(
                "--caption", "needs --text-encoder NAME_OR_FOLDER (the one the dataset was prepared with)"
            )
        texts = TextEncoder(args.text_encoder, args.text_encoder_subfolder, args.tokenizer_subfolder).encode(
            args.caption
        )
    null = torch.zeros(1, config.text_embed_dim)
    return [Condition(text=t, fps=args.fps) for t in texts] or [Condition(text=null, fps=args.fps)]


def sample(
    args: argparse.Namespace,
    model: DiTModel,
    objective: Objective,
    config: DiTConfig,
    conds: list[Condition],
    shape: tuple,
    device: torch.device,
) -> torch.Tensor:
    """Latents ``[len(conds) * num_samples, C, T, H, W]``: the samples of each condition in a row."""
    per_sample = [c for c in conds for _ in range(args.num_samples)]
    predict = GuidedPrediction(model, objective, config, per_sample, args.guidance, device)
    noise = torch.randn(
        len(per_sample), *shape, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64
    )
    tokens = math.prod(
        s // p for s, p in zip(shape[1:], (config.temporal_patch_size, config.patch_size, config.patch_size))
    )
    options = SamplingOptions(args.steps, args.sampler, args.sigma_min, args.sigma_max, args.rho)
    return objective.sample(predict, noise, options, tokens)


GRID_GAP = 4  # px of background between the cells, around them, and between the labels and the first column
GRID_BACKGROUND, GRID_INK = 255, 0  # white canvas, black labels: apart from the cells' own black backgrounds


def row_labels(args: argparse.Namespace) -> list[str]:
    """What each row of samples is conditioned on, for the grid: the class, the caption or the embedding's file."""
    if args.class_label:
        return [f"class {k}" for k in args.class_label]
    if args.caption:
        return list(args.caption)
    if args.text_embedding:
        return [Path(name).stem for name in args.text_embedding]
    return ["unconditional"]


def write_grid(latents: torch.Tensor, labels: list[str], path: str) -> None:
    """Pixels in [-1, 1] ``[N, C, 1, H, W]`` (C = 1 or 3) as a PNG grid, one row per label written at its left,
    cells of >= 64 px ``GRID_GAP`` px apart on a white canvas."""
    from PIL import Image, ImageDraw, ImageFont  # pillow: the quickstart and prep extras

    n, c, _, h, w = latents.shape
    if c not in (1, 3):
        raise ConfigError("--png-grid", f"needs 1 or 3 channels of pixels, the latents have {c}; decode with --vae")
    scale = max(1, 64 // max(h, w))
    pixels = ((latents[:, :, 0].clamp(-1, 1) + 1) * 127.5).round().byte()  # [N, C, H, W]
    cells = pixels.repeat_interleave(scale, 2).repeat_interleave(scale, 3).permute(0, 2, 3, 1).numpy()  # [N, h, w, C]
    rows, (cell_h, cell_w) = len(labels), cells.shape[1:3]
    cols = n // rows
    font = ImageFont.load_default()
    left = GRID_GAP + max(round(ImageDraw.Draw(Image.new("L", (1, 1))).textlength(t, font=font)) for t in labels)
    mode, fill = ("L", GRID_BACKGROUND) if c == 1 else ("RGB", (GRID_BACKGROUND,) * 3)
    grid = Image.new(mode, (left + GRID_GAP + cols * (cell_w + GRID_GAP), GRID_GAP + rows * (cell_h + GRID_GAP)), fill)
    draw = ImageDraw.Draw(grid)
    for r, label in enumerate(labels):
        top = GRID_GAP + r * (cell_h + GRID_GAP)
        draw.text(
            (GRID_GAP, top + cell_h // 2), label, fill=GRID_INK if c == 1 else (GRID_INK,) * 3, font=font, anchor="lm"
        )
        for k in range(cols):
            cell = np.ascontiguousarray(cells[r * cols + k].squeeze(-1) if c == 1 else cells[r * cols + k])
            grid.paste(Image.fromarray(cell), (left + GRID_GAP + k * (cell_w + GRID_GAP), top))
    grid.save(path)


def decode_to_files(args: argparse.Namespace, latents: torch.Tensor) -> list[str]:
    pixels = VaeEncoder(args.vae, args.vae_subfolder).decode(latents)  # [N, T, 3, H, W] uint8
    stem, written = Path(args.output).with_suffix(""), []
    for i, clip in enumerate(pixels):
        if clip.shape[0] == 1:
            from PIL import Image  # pillow and av: the prep extra, which --vae needs anyway

            path = f"{stem}_{i:03d}.png"
            Image.fromarray(clip[0].permute(1, 2, 0).numpy()).save(path)
        else:
            path = f"{stem}_{i:03d}.mp4"
            _write_video(path, clip, args.fps or 16.0)
        written.append(path)
    return written


def _write_video(path: str, clip: torch.Tensor, fps: float) -> None:
    import av  # the prep extra

    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=round(fps))  # in every PyAV wheel (x264 is not)
        stream.height, stream.width = clip.shape[2], clip.shape[3]
        stream.pix_fmt = "yuv420p"
        for frame in clip:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame.permute(1, 2, 0).numpy(), format="rgb24")))
        container.mux(stream.encode())


def main(argv: list[str] | None = None) -> int:
    quiet_library_warnings()
    try:
        args = build_parser().parse_args(argv)
        shape = parse_shape(args.latent_shape)
        for flag, value in (("--num-samples", args.num_samples), ("--steps", args.steps)):
            if value < 1:
                raise ConfigError(flag, f"must be >= 1, got {value}")
        return generate(args, shape)
    except ConfigError as e:
        return user_error(PROG, flag_error(e))


def load_model(args: argparse.Namespace, path: Path, device: torch.device) -> tuple:
    """The checkpoint's model on this rank's layout, with its EMA (or raw) weights: (model, its objective
    config, which weights)."""
    common = dist_checkpointing.load_common_state_dict(str(path))
    objective = saved_objective(common)
    if objective is None:
        raise ConfigError(
            "--load",
            f"{path} holds an imported model, which names no training objective to sample "
            "with; sample it with diffusers, or train from it (--finetune)",
        )
    impl = "transformer_engine" if te.have_transformer_engine() and args.bf16 else "local"
    config = DiTConfig.from_architecture(
        saved_architecture(common, path),
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        transformer_impl=impl,
        bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
    )
    runtime.initialize_model_parallel(
        runtime.ParallelLayout(tensor=args.tensor_model_parallel_size, context=args.context_parallel_size)
    )
    runtime.set_random_seed(args.seed, per_data_parallel_rank=False)
    model = DiTModel(config).to(device).eval()
    return model, objective, load_model_weights(model, path, use_ema=not args.no_ema)


def generate(args: argparse.Namespace, shape: tuple) -> int:
    path = find_checkpoint(args.load, args.ckpt_step)
    runtime.init_distributed()
    try:
        device = runtime.current_device()
        model, trained_with, weights = load_model(args, path, device)
        config = model.config
        if shape[0] != config.latent_channels:
            raise ConfigError(
                "--latent-shape", f"the model takes {config.latent_channels} latent channels, not {shape[0]}"
            )
        objective = trained_with.build()
        conds = conditions(args, config)
        latents = sample(args, model, objective, config, conds, shape, device).float()
        if dist.get_rank() == 0:
            torch.save(latents, args.output)
            notes = [f"latents {tuple(latents.shape)} -> {args.output}"]
            if args.png_grid:
                write_grid(latents, row_labels(args), args.png_grid)
                notes.append(f"grid of {len(conds)} rows -> {args.png_grid}")
            if args.vae:
                files = decode_to_files(args, latents)
                notes.append(f"{len(files)} decoded files -> {Path(files[0]).parent}")
            print(
                f"{PROG}: {path} ({weights} weights, {trained_with.objective}, {args.steps} steps, guidance "
                f"{args.guidance}): " + "; ".join(notes),
                flush=True,
            )
    finally:
        runtime.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
