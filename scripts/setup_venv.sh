#!/usr/bin/env bash
# Create ./.venv (once) and install this recipe with the given extras into it. Safe to run twice:
# an unchanged pyproject.toml and extras install nothing.
#
#   bash scripts/setup_venv.sh test        # extras: test, quickstart, prep, log (comma-separated)
#
# torch is installed first (TORCH_SPEC, default the tested torch==2.13.0; on a machine without an
# NVIDIA GPU its CPU build, from PyTorch's CPU wheel index or TORCH_CPU_INDEX) so that the project's
# `torch>=2.6` is already met and pip never pulls a multi-GB CUDA build onto a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-test}
python=${PYTHON:-python3}

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "setup_venv.sh: Python >= 3.10 is needed (found $("$python" --version 2>&1)); set PYTHON=python3.x" >&2
    exit 2
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=".venv/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)-${extras//,/+}"
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
        # Without an NVIDIA GPU take PyTorch's CPU build: a plain `pip install torch` on Linux brings
        # several GB of CUDA libraries. Only torch comes from that index (--no-deps); its small
        # dependencies come with the project below. Where the index cannot be reached, pip warns and goes on.
        index=()
        command -v nvidia-smi >/dev/null 2>&1 || index=(--extra-index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}")
        .venv/bin/python -m pip install -q --no-deps "${index[@]}" "${TORCH_SPEC:-torch==2.13.0}"
    fi
    .venv/bin/python -m pip install -q -e ".[${extras}]"
    touch "$stamp"
fi
