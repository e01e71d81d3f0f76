#!/usr/bin/env bash
# Lint, format, types and import contracts: what .ci/run checks before any test, and what the pre-commit
# hooks run. Configured in pyproject.toml ([tool.ruff], [tool.mypy], [tool.importlinter]).
#   bash scripts/lint.sh          # check
#   bash scripts/lint.sh --fix    # apply ruff's fixes and format first
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${VENV:-.venv}/bin
if [ "${1:-}" = "--fix" ]; then
    "$bin/ruff" check --fix .
    "$bin/ruff" format .
fi
"$bin/ruff" check .
"$bin/ruff" format --check .
"$bin/mypy"
"$bin/lint-imports"
