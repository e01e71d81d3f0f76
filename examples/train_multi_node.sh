#!/usr/bin/env bash
# DiT-7B on several nodes with torchrun's rendezvous: run this same command on every node.
#   MASTER_ADDR=node0 NNODES=4 NODE_RANK=<0..3> DATA=/data/ds bash examples/train_multi_node.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DISTRIBUTED_ARGS=(--nproc-per-node "${GPUS_PER_NODE:-8}" --nnodes "${NNODES:?}" --node-rank "${NODE_RANK:?}"
                  --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:?}:${MASTER_PORT:-29500}")
MODEL_ARGS=(--model-size DiT-7B --patch-size 2 --latent-channels 16 --text-embed-dim 1024)
PARALLEL_ARGS=(--tensor-model-parallel-size 2 --sequence-parallel --context-parallel-size 2
               --use-distributed-optimizer)
TRAINING_ARGS=(--objective flow --micro-batch-size 1 --global-batch-size 512 --train-iters 200000
               --lr 1e-4 --lr-warmup-iters 2000 --clip-grad 1.0 --bf16 --recompute-granularity selective)
DATA_ARGS=(--data-path "${DATA:?set DATA to an energon dataset}" --max-seq-length 16384
           --packing-buffer-size 400 --num-workers 4)
OUTPUT_ARGS=(--save "${SAVE:-runs/dit-7b}" --load "${SAVE:-runs/dit-7b}" --save-interval 500 --log-interval 10)

ARGS=("${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${DATA_ARGS[@]}" "${OUTPUT_ARGS[@]}" "$@")
# flags, recipe and dataset for the whole launch, in seconds and in one plain process: a mistake is one line
python pretrain_dit.py "${ARGS[@]}" --validate-only --world-size "$(( ${GPUS_PER_NODE:-8} * NNODES ))"
torchrun "${DISTRIBUTED_ARGS[@]}" pretrain_dit.py "${ARGS[@]}"
