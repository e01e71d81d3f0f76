"""Sampling a training checkpoint: the model and objective it stores, the conditions, the objective's sampler
with classifier-free guidance, and what is written (the latents, a PNG grid, images or videos decoded by a VAE).
``python -m dit.generate`` (``dit/generate.py``) is its command line: it turns the flags into
:class:`GenerateOptions` once they are understood, so that ``--help`` and a flag mistake never load torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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
from dit.errors import ConfigError
from dit.model import te
from dit.model.config import DiTConfig
from dit.model.model import DiTModel
from dit.runtime import distributed as runtime
from dit.safe_pickle import loads


@dataclass(frozen=True)
class GenerateOptions:
    """What to sample and where to write it: ``python -m dit.generate``'s flags, named as they are."""

    load: str  # the checkpoint folder (a --save folder of pretrain_dit.py)
    ckpt_step: int | None  # the iteration to load (None: the latest)
    shape: tuple[int, int, int, int]  # C, T, H, W of each latent
    num_samples: int  # samples per condition
    steps: int  # sampler steps
    guidance: float  # classifier-free guidance scale (1: none)
    seed: int  # seed of the initial noise
    output: str  # where the latents [N, C, T, H, W] go (.pt)
    sampler: str  # flow models: "heun" or "euler"
    sigma_min: float  # EDM: the last noise level before 0
    sigma_max: float  # EDM: the first noise level
    rho: float  # EDM: the spacing exponent of the levels
    text_embedding: list[str]  # .pickle files of text embeddings [L, D], a row each
    caption: list[str]  # captions, a row each, encoded with text_encoder
    text_encoder: str | None  # hub name or folder of the text encoder
    text_encoder_subfolder: str | None
    tokenizer_subfolder: str | None
    class_label: list[int]  # class labels, a row each
    fps: float  # frame rate for fps-conditioned models (0: an image)
    no_ema: bool  # the raw weights instead of the EMA
    bf16: bool  # the network in bf16
    tensor_model_parallel_size: int
    context_parallel_size: int
    vae: str | None  # decode with this diffusers VAE to PNG / MP4
    vae_subfolder: str | None
    png_grid: str | None  # write the latents, pixels already, as one PNG grid


def conditions(options: GenerateOptions, config: DiTConfig) -> list[Condition]:
    given = [bool(options.text_embedding), bool(options.caption), bool(options.class_label)]
    if sum(given) > 1:
        raise ConfigError("--text-embedding", "give one of --text-embedding, --caption and --class-label")
    if config.conditioning == "class":
        if options.text_embedding or options.caption:
            raise ConfigError("--class-label", "this model is class-conditioned: pass --class-label K")
        bad = [k for k in options.class_label if not 0 <= k < config.num_classes]
        if bad:
            raise ConfigError("--class-label", f"{bad[0]} is outside [0, {config.num_classes})")
        return [Condition(label=k, fps=options.fps) for k in options.class_label] or [
            Condition(label=config.num_classes, fps=options.fps)
        ]
    if options.class_label:
        raise ConfigError("--class-label", "this model is text-conditioned: pass --text-embedding or --caption")
    texts = []
    for name in options.text_embedding:
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
    if options.caption:
        if options.text_encoder is None:
            raise ConfigError(
                "--caption", "needs --text-encoder NAME_OR_FOLDER (the one the dataset was prepared with)"
            )
        texts = TextEncoder(options.text_encoder, options.text_encoder_subfolder, options.tokenizer_subfolder).encode(
            options.caption
        )
    null = torch.zeros(1, config.text_embed_dim)
    return [Condition(text=t, fps=options.fps) for t in texts] or [Condition(text=null, fps=options.fps)]


def sample(
    options: GenerateOptions,
    model: DiTModel,
    objective: Objective,
    config: DiTConfig,
    conds: list[Condition],
    device: torch.device,
) -> torch.Tensor:
    """Latents ``[len(conds) * num_samples, C, T, H, W]``: the samples of each condition in a row."""
    shape = options.shape
    per_sample = [c for c in conds for _ in range(options.num_samples)]
    predict = GuidedPrediction(model, objective, config, per_sample, options.guidance, device)
    noise = torch.randn(
        len(per_sample), *shape, generator=torch.Generator().manual_seed(options.seed), dtype=torch.float64
    )
    tokens = math.prod(
        s // p for s, p in zip(shape[1:], (config.temporal_patch_size, config.patch_size, config.patch_size))
    )
    sampling = SamplingOptions(options.steps, options.sampler, options.sigma_min, options.sigma_max, options.rho)
    return objective.sample(predict, noise, sampling, tokens)


GRID_GAP = 4  # px of background between the cells, around them, and between the labels and the first column
GRID_BACKGROUND, GRID_INK = 255, 0  # white canvas, black labels: apart from the cells' own black backgrounds


def row_labels(options: GenerateOptions) -> list[str]:
    """What each row of samples is conditioned on, for the grid: the class, the caption or the embedding's file."""
    if options.class_label:
        return [f"class {k}" for k in options.class_label]
    if options.caption:
        return list(options.caption)
    if options.text_embedding:
        return [Path(name).stem for name in options.text_embedding]
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


def decode_to_files(options: GenerateOptions, latents: torch.Tensor) -> list[str]:
    assert options.vae is not None, "decoding needs --vae"
    pixels = VaeEncoder(options.vae, options.vae_subfolder).decode(latents)  # [N, T, 3, H, W] uint8
    stem, written = Path(options.output).with_suffix(""), []
    for i, clip in enumerate(pixels):
        if clip.shape[0] == 1:
            from PIL import Image  # pillow and av: the prep extra, which --vae needs anyway

            path = f"{stem}_{i:03d}.png"
            Image.fromarray(clip[0].permute(1, 2, 0).numpy()).save(path)
        else:
            path = f"{stem}_{i:03d}.mp4"
            _write_video(path, clip, options.fps or 16.0)
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


def load_model(options: GenerateOptions, path: Path, device: torch.device) -> tuple:
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
    impl = "transformer_engine" if te.have_transformer_engine() and options.bf16 else "local"
    config = DiTConfig.from_architecture(
        saved_architecture(common, path),
        tensor_model_parallel_size=options.tensor_model_parallel_size,
        context_parallel_size=options.context_parallel_size,
        transformer_impl=impl,
        bf16=options.bf16,
        params_dtype=torch.bfloat16 if options.bf16 else torch.float32,
    )
    runtime.initialize_model_parallel(
        runtime.ParallelLayout(tensor=options.tensor_model_parallel_size, context=options.context_parallel_size)
    )
    runtime.set_random_seed(options.seed, per_data_parallel_rank=False)
    model = DiTModel(config).to(device).eval()
    return model, objective, load_model_weights(model, path, use_ema=not options.no_ema)


def generate(options: GenerateOptions) -> str | None:
    """Sample, write the files, and say what was written (on rank 0; None on the others)."""
    shape = options.shape
    path = find_checkpoint(options.load, options.ckpt_step)
    runtime.init_distributed()
    summary = None
    try:
        device = runtime.current_device()
        model, trained_with, weights = load_model(options, path, device)
        config = model.config
        if shape[0] != config.latent_channels:
            raise ConfigError(
                "--latent-shape", f"the model takes {config.latent_channels} latent channels, not {shape[0]}"
            )
        objective = trained_with.build()
        conds = conditions(options, config)
        latents = sample(options, model, objective, config, conds, device).float()
        if dist.get_rank() == 0:
            torch.save(latents, options.output)
            notes = [f"latents {tuple(latents.shape)} -> {options.output}"]
            if options.png_grid:
                write_grid(latents, row_labels(options), options.png_grid)
                notes.append(f"grid of {len(conds)} rows -> {options.png_grid}")
            if options.vae:
                files = decode_to_files(options, latents)
                notes.append(f"{len(files)} decoded files -> {Path(files[0]).parent}")
            summary = (
                f"{path} ({weights} weights, {trained_with.objective}, {options.steps} steps, guidance "
                f"{options.guidance}): " + "; ".join(notes)
            )
    finally:
        runtime.destroy()
    return summary
