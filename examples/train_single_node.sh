#!/usr/bin/env bash
# DiT-XL/2 on one node of 8 GPUs, Megatron-LM style: flags grouped by purpose.
#   DATA=/data/my_energon_dataset bash examples/train_single_node.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DISTRIBUTED_ARGS=(--nproc-per-node "${GPUS_PER_NODE:-8}" --nnodes 1 --standalone)
MODEL_ARGS=(--model-size DiT-XL --patch-size 2 --latent-channels 16 --text-embed-dim 1024)
PARALLEL_ARGS=(--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --context-parallel-size 1
               --use-distributed-optimizer)
TRAINING_ARGS=(--objective flow --micro-batch-size 1 --global-batch-size 256 --train-iters 400000
               --lr 1e-4 --lr-warmup-iters 1000 --weight-decay 0.0 --clip-grad 1.0 --bf16 --ema-decay 0.9999)
DATA_ARGS=(--data-path "${DATA:?set DATA to an energon dataset}" --max-seq-length 8192
           --packing-buffer-size 200 --num-workers 4)
OUTPUT_ARGS=(--save "${SAVE:-runs/dit-xl}" --load "${SAVE:-runs/dit-xl}" --save-interval 1000 --log-interval 10)

ARGS=("${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${DATA_ARGS[@]}" "${OUTPUT_ARGS[@]}" "$@")
# flags, recipe and dataset for the whole launch, in seconds and in one plain process: a mistake is one line
python pretrain_dit.py "${ARGS[@]}" --validate-only --world-size "${GPUS_PER_NODE:-8}"
torchrun "${DISTRIBUTED_ARGS[@]}" pretrain_dit.py "${ARGS[@]}"
