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
import dataclasses
import sys
from typing import TYPE_CHECKING

from dit.errors import ConfigError, flag_error
from dit.runtime.console import quiet_library_warnings, user_error

if TYPE_CHECKING:
    from dit.inference import GenerateOptions

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


def options(args: argparse.Namespace) -> GenerateOptions:
    """The flags as :class:`dit.inference.GenerateOptions`; torch and Megatron-Core load here, once the flags are
    understood, so that ``--help`` and a flag mistake answer at once and without their import-time warnings."""
    from dit.inference import GenerateOptions

    shape = parse_shape(args.latent_shape)
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(GenerateOptions) if f.name != "shape"}
    return GenerateOptions(shape=shape, **flags)


def main(argv: list[str] | None = None) -> int:
    quiet_library_warnings()
    try:
        args = build_parser().parse_args(argv)
        parse_shape(args.latent_shape)
        for flag, value in (("--num-samples", args.num_samples), ("--steps", args.steps)):
            if value < 1:
                raise ConfigError(flag, f"must be >= 1, got {value}")
        sampling = options(args)
        from dit.inference import generate  # loaded by options()

        summary = generate(sampling)
    except ConfigError as e:
        return user_error(PROG, flag_error(e))
    if summary is not None:
        print(f"{PROG}: {summary}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
