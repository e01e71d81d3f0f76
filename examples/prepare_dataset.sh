#!/usr/bin/env bash
# A folder of captioned images and videos -> an energon dataset of VAE latents (.pth), text embeddings
# (.pickle) and metadata (.json): python -m data.prepare, which indexes the result with `energon prepare`
# itself. Interrupted? Run the same command again: complete shards are kept.
#   RAW=/data/images DATA=/data/images256_sd VAE=stabilityai/sd-vae-ft-ema TEXT_ENCODER=google/t5-v1_1-large \
#       bash examples/prepare_dataset.sh --resolution 256 [more data.prepare flags: --help lists them]
# The header of each recipe in examples/configs/ gives the command for its dataset.
# Environment:
#   RAW           (required) images / videos with their captions: NAME.txt beside NAME.jpg, or --captions FILE
#   DATA          (required) the dataset folder to write (the DATA of the training launchers)
#   VAE           (required) a diffusers VAE: hub name or local folder (--vae-subfolder for a pipeline's)
#   TEXT_ENCODER  (required) a T5-style transformers encoder: hub name or local folder
#   PYTHON        the interpreter (python)
set -euo pipefail
: "${RAW:?set RAW to a folder of images and videos with captions (NAME.txt beside each, or --captions FILE)}"
: "${DATA:?set DATA to the energon dataset folder to write}"
: "${VAE:?set VAE to a diffusers VAE, a hub name or a local folder (e.g. stabilityai/sd-vae-ft-ema)}"
: "${TEXT_ENCODER:?set TEXT_ENCODER to a T5-style text encoder, a hub name or a local folder (e.g. google/t5-v1_1-large)}"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# data/ is not installed: the checkout on the path lets it run from any folder, paths relative to the caller's
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
set -x
exec "${PYTHON:-python}" -m data.prepare "$RAW" "$DATA" --vae "$VAE" --text-encoder "$TEXT_ENCODER" "$@"
