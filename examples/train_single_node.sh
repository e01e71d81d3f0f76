#!/usr/bin/env bash
# Pretrain on one node: torchrun starts one process per GPU of this machine.
#   DATA=/data/images256_sd bash examples/train_single_node.sh [more pretrain_dit.py flags]
# Environment:
#   DATA           (required) an energon dataset whose format the recipe expects (see its header)
#   CONFIG         a recipe of examples/configs/ (default: DiT-XL/2 at 256 px, the one-node recipe)
#   SAVE           checkpoint folder (default: the recipe's save, relative to this folder)
#   GPUS_PER_NODE  processes to start (8)
#   PYTHON         the interpreter of the launch check (python)
set -euo pipefail
: "${DATA:?set DATA to an energon dataset (see README: Preparing a dataset)}"
# pretrain_dit.py runs by its path, so relative DATA, CONFIG and SAVE stay relative to the caller's folder
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONFIG=${CONFIG:-$ROOT/examples/configs/dit-xl_image256.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}

ARGS=(--config "$CONFIG" --data-path "$DATA" ${SAVE:+--save "$SAVE"} "$@")
# flags, recipe and dataset for the whole launch, in one plain process and in seconds: a mistake is one line
"${PYTHON:-python}" "$ROOT/pretrain_dit.py" "${ARGS[@]}" --validate-only --world-size "$GPUS_PER_NODE"
set -x
exec torchrun --standalone --nnodes 1 --nproc-per-node "$GPUS_PER_NODE" "$ROOT/pretrain_dit.py" "${ARGS[@]}"
