#!/usr/bin/env bash
# The test command of the README: set up the environment (once; VENV, default .venv, and PYTHON as in
# scripts/setup_venv.sh), then run the whole suite on CPU. Extra arguments go to pytest (e.g.
# `bash scripts/test.sh -k packing`). Fails when a test fails and when no test ran (pytest exits 5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh test
exec "${VENV:-.venv}/bin/python" -m pytest -q "$@"
