#!/usr/bin/env bash
# Pretrain on several nodes with torchrun's c10d rendezvous: run the same command on every node.
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=node0 DATA=/shared/images256_wan SAVE=/shared/runs/dit-7b \
#       bash examples/train_multi_node.sh [more pretrain_dit.py flags]
# Environment:
#   NNODES         (required) nodes of the launch
#   NODE_RANK      (required) this node's rank, 0 to NNODES-1; node 0 is MASTER_ADDR and hosts the rendezvous
#   MASTER_ADDR    (required) node 0's address; MASTER_PORT its rendezvous port (29500)
#   DATA           (required) an energon dataset every node sees, in the format the recipe expects
#   SAVE           (required) checkpoint folder on a filesystem every node sees (every rank writes shards there)
#   CONFIG         a recipe of examples/configs/ (default: DiT-7B/2 at 256 px, a 4-node recipe)
#   GPUS_PER_NODE  processes per node (8); RDZV_ID names the job in the rendezvous (dit)
#   PYTHON         the interpreter of the launch check (python)
set -euo pipefail
: "${NNODES:?set NNODES to the number of nodes of the launch}"
: "${NODE_RANK:?set NODE_RANK to the rank of this node, 0 to NNODES-1 (0 on the node MASTER_ADDR names)}"
: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0, which hosts the rendezvous}"
: "${DATA:?set DATA to an energon dataset every node sees (see README: Preparing a dataset)}"
: "${SAVE:?set SAVE to a checkpoint folder on a filesystem every node sees}"
# pretrain_dit.py runs by its path, so relative DATA, CONFIG and SAVE stay relative to the caller's folder
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONFIG=${CONFIG:-$ROOT/examples/configs/dit-7b_image256.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}

# node 0 hosts the rendezvous store whatever name MASTER_ADDR gives it (torchrun's own guess compares host names)
IS_HOST=$(( NODE_RANK == 0 ))
DISTRIBUTED_ARGS=(--nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --rdzv-backend c10d
                  --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id "${RDZV_ID:-dit}"
                  --rdzv-conf "is_host=$IS_HOST")
ARGS=(--config "$CONFIG" --data-path "$DATA" --save "$SAVE" "$@")
# every node checks the whole launch (flags, recipe, the dataset as this node sees it) in seconds, before
# the rendezvous: a mistake is one line instead of a hang at the rendezvous or a traceback per rank
"${PYTHON:-python}" "$ROOT/pretrain_dit.py" "${ARGS[@]}" --validate-only --world-size "$(( NNODES * GPUS_PER_NODE ))"
set -x
exec torchrun "${DISTRIBUTED_ARGS[@]}" "$ROOT/pretrain_dit.py" "${ARGS[@]}"
