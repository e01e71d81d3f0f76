#!/usr/bin/env bash
# The README's main job: set up ./.venv, turn scikit-learn's bundled 8x8 digits into energon
# shards (latents .pth, stand-in T5 embeddings .pickle, metadata .json), index them with
# `energon prepare`, then launch pretrain_dit.py on 2 gloo processes with examples/digits.yaml.
# Safe to run twice: complete shards are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh quickstart
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

echo "== data: scikit-learn digits -> runs/digits/data"
.venv/bin/python -m data.digits runs/digits/data --text-embed-dim 64

echo "== check: pretrain_dit.py --validate-only (flags, recipe and dataset for 2 processes, one line on a mistake)"
.venv/bin/python pretrain_dit.py --config examples/digits.yaml "$@" --validate-only --world-size 2

echo "== train: torchrun --nproc-per-node 2 pretrain_dit.py --config examples/digits.yaml"
.venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 2 \
    pretrain_dit.py --config examples/digits.yaml "$@"
