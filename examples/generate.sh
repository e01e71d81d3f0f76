#!/usr/bin/env bash
# Sample from a training run's checkpoint (python -m dit.generate: its EMA when it has one, --no-ema for the
# trained weights): latents into OUTPUT, and with --vae decoded to PNG / MP4 beside it.
#   CKPT=runs/dit-xl_image256 LATENT_SHAPE=4,32,32 OUTPUT=samples/fox.pt TEXT_ENCODER=google/t5-v1_1-large \
#       bash examples/generate.sh --caption "a red fox in the snow" --vae stabilityai/sd-vae-ft-ema
#   [more dit.generate flags: --num-samples, --steps, --guidance, --seed, --text-embedding F.pickle ...]
# Environment:
#   CKPT          (required) a pretrain_dit.py --save folder (its latest checkpoint; --ckpt-step N another)
#   LATENT_SHAPE  (required) one sample's latent: C,H,W for an image, C,T,H,W for a video (e.g. 16,21,60,104)
#   OUTPUT        (required) the .pt file the latents [N, C, T, H, W] go to
#   TEXT_ENCODER  the encoder of --caption (the one the dataset was prepared with)
#   NPROC         processes (1); more runs torchrun, with --tensor-model-parallel-size / --context-parallel-size
#   PYTHON        the interpreter (python)
set -euo pipefail
: "${CKPT:?set CKPT to a checkpoint folder (the --save folder of a pretrain_dit.py run)}"
: "${LATENT_SHAPE:?set LATENT_SHAPE to one sample latent, C,H,W for an image or C,T,H,W for a video (e.g. 4,32,32)}"
: "${OUTPUT:?set OUTPUT to the .pt file the sampled latents are written to}"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# data/ is not installed: the checkout on the path lets it run from any folder, paths relative to the caller's
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

ARGS=(--load "$CKPT" --latent-shape "$LATENT_SHAPE" --output "$OUTPUT"
      ${TEXT_ENCODER:+--text-encoder "$TEXT_ENCODER"} "$@")
if (( ${NPROC:-1} > 1 )); then
    LAUNCH=(torchrun --standalone --nproc-per-node "$NPROC" -m)
else
    LAUNCH=("${PYTHON:-python}" -m)
fi
set -x
exec "${LAUNCH[@]}" dit.generate "${ARGS[@]}"
