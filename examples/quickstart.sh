#!/usr/bin/env bash
# The README's main job: set up ./.venv, turn scikit-learn's bundled 8x8 digits into energon shards
# (latents .pth, stand-in T5 embeddings .pickle, metadata .json) indexed by `energon prepare`, check
# the launch, train examples/digits.yaml on 2 gloo processes (saving to runs/digits/checkpoints),
# then draw one row of digits per class with guidance into runs/digits/samples.png and score them.
# Safe to run twice: complete shards are kept and a finished run resumes at its end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh quickstart
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

echo "== data: scikit-learn digits -> runs/digits/data (and each class's caption embedding -> runs/digits/prompts)"
.venv/bin/python -m data.digits runs/digits/data --text-embed-dim 64 --prompts runs/digits/prompts

echo "== check: pretrain_dit.py --validate-only (flags, recipe and dataset for 2 processes, one line on a mistake)"
.venv/bin/python pretrain_dit.py --config examples/digits.yaml "$@" --validate-only --world-size 2

echo "== train: torchrun --nproc-per-node 2 pretrain_dit.py --config examples/digits.yaml"
.venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 2 \
    pretrain_dit.py --config examples/digits.yaml "$@"

echo "== sample: python -m dit.generate (10 digits per class, guidance 3) -> runs/digits/samples.png"
.venv/bin/python -m dit.generate --load runs/digits/checkpoints --latent-shape 1,8,8 --num-samples 10 \
    --steps 32 --guidance 3 --seed 0 --output runs/digits/samples.pt --png-grid runs/digits/samples.png \
    --text-embedding runs/digits/prompts/digit_{0,1,2,3,4,5,6,7,8,9}.pickle

echo "== score: a classifier trained on the real digits reads the samples"
.venv/bin/python -m data.digits_score runs/digits/samples.pt
