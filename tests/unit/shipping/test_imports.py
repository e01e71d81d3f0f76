"""The import contracts of pyproject.toml (``[tool.importlinter]``): packages by layer, imports pointing one way."""

import os
import subprocess
import sys
from pathlib import Path

from tests.launch import ROOT


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")  # import-linter, in the test extra
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's dit and data, whatever else is installed
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
