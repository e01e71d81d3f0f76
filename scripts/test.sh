#!/usr/bin/env bash
# The test command of the README: set up the environment (once; VENV, default .venv, and PYTHON as in
# scripts/setup_venv.sh), then lint, format, types and import contracts (scripts/lint.sh), the one-process
# tests (-m "not slow and not dist", minutes), then the rest (the multi-process runs and torchrun launches).
# Extra arguments run pytest with them alone (e.g. `bash scripts/test.sh -k packing`). Fails when a check or a
# test fails, and when no test ran (pytest exits 5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh test
python="${VENV:-.venv}/bin/python"
if [ $# -gt 0 ]; then
    exec "$python" -m pytest -q "$@"
fi
bash scripts/lint.sh
"$python" -m pytest -q --durations=15 -m "not slow and not dist"
exec "$python" -m pytest -q --durations=25 -m "slow or dist"
