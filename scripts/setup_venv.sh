#!/usr/bin/env bash
# Create ./.venv (once) and install this recipe with the given extras into it. Safe to run twice:
# an unchanged pyproject.toml and extras install nothing.
#
#   bash scripts/setup_venv.sh test        # extras: test, quickstart, prep, log (comma-separated)
#
# torch is installed first (TORCH_SPEC, default the tested torch==2.13.0) so that the project's
# `torch>=2.6` is already met and pip never pulls a multi-GB CUDA build onto a CPU-only machine.
# Where the CPU wheel is not on your package index, point pip at PyTorch's CPU wheel index first
# (PIP_EXTRA_INDEX_URL=<PyTorch CPU index>).
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
    .venv/bin/python -c 'import torch' 2>/dev/null || .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
    .venv/bin/python -m pip install -q -e ".[${extras}]"
    touch "$stamp"
fi
