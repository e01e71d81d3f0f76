#!/usr/bin/env bash
# Create a virtual environment (once) and install this recipe with the given extras into it. Safe to run
# twice: an unchanged pyproject.toml and extras install nothing. Says which stack it built.
#
#   bash scripts/setup_venv.sh test        # extras: test, quickstart, prep, log (comma-separated)
#
# VENV: the environment's folder (default .venv). PYTHON: the interpreter; by default Python 3.12 on PATH or
# under pyenv (else the newest later one), which gets megatron-core 0.19 (the tested default); without any,
# python3 (3.11), which gets megatron-core 0.16 (the oldest the recipe supports), and a line says so.
#
# torch is installed first (TORCH_SPEC, default the tested torch==2.13.0; on a machine without an NVIDIA GPU
# its CPU build, from PyTorch's CPU wheel index or TORCH_CPU_INDEX, where that index can be reached) so that
# the project's `torch>=2.6` is already met and pip never pulls a newer torch than the one tested.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-test}
venv=${VENV:-.venv}

# Python 3.12 first (the NGC PyTorch containers' Python, on which CI runs the whole suite), then the newest
# later one: pythonX.Y on PATH (a pyenv shim of an inactive version fails and is skipped), then pyenv's
# installed versions.
default_python() {
    local minor candidate
    for minor in 12 19 18 17 16 15 14 13; do
        for candidate in "python3.$minor" $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3."$minor".*/bin/python3."$minor" 2>/dev/null | sort -rV); do
            if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then
                echo "$candidate"
                return
            fi
        done
    done
}

python=${PYTHON:-$(default_python)}
if [ -z "$python" ]; then
    python=python3
    echo "setup_venv.sh: no Python 3.12+ found: building on $("$python" --version 2>&1), which gets megatron-core 0.16" \
         "(the oldest supported; 0.17+ needs Python 3.12); set PYTHON=python3.12 for the tested default" >&2
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup_venv.sh: Python >= 3.11 is needed (found $("$python" --version 2>&1)); set PYTHON=python3.x" >&2
    exit 2
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
stamp="$venv/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)-${extras//,/+}"
if [ ! -f "$stamp" ]; then
    "$venv/bin/python" -m pip install -q --upgrade pip
    if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
        # Without an NVIDIA GPU prefer PyTorch's CPU build: a plain `pip install torch` on Linux brings
        # several GB of CUDA libraries (which run on the CPU too). Only torch comes from that index (--no-deps);
        # its small dependencies come with the project below. Where the index cannot be reached, pip warns
        # and takes PyPI's build.
        index=()
        command -v nvidia-smi >/dev/null 2>&1 || index=(--extra-index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}")
        "$venv/bin/python" -m pip install -q --no-deps "${index[@]}" "${TORCH_SPEC:-torch==2.13.0}"
    fi
    "$venv/bin/python" -m pip install -q -e ".[${extras}]"
    touch "$stamp"
fi
"$venv/bin/python" - "$venv" <<'PY' >&2
import sys
from importlib.metadata import version
stack = ", ".join(f"{name} {version(name)}" for name in ("torch", "megatron-core", "megatron-energon"))
print(f"setup_venv.sh: {sys.argv[1]}: Python {sys.version.split()[0]}, {stack}")
PY
