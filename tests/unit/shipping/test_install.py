"""``pip install .`` installs what the commands need: a wheel built from the repository runs ``python -m
dit.generate`` and ``python -m data.report`` from a folder outside it."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.launch import ROOT


@pytest.mark.slow
def test_a_wheel_runs_the_commands_outside_the_repository(tmp_path):
    source = tmp_path / "source"  # only what the wheel is built from, so nothing else of the checkout can help
    for name in ("dit", "data"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(source)],
        check=True,
        cwd=tmp_path,
        timeout=300,
    )
    (wheel,) = (tmp_path / "wheel").glob("megatron_dit-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of any editable install of this checkout
    for module in ("dit.generate", "data.report"):
        result = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.startswith("usage: "), result.stdout[:500]
    every_module = (
        "import importlib, pkgutil, dit, data\n"  # each one from the wheel, subpackages included
        "for root in (dit, data):\n"
        "    for m in pkgutil.walk_packages(root.__path__, root.__name__ + '.'):\n"
        "        print(importlib.import_module(m.name).__file__)\n"
    )
    where = subprocess.run(
        [sys.executable, "-c", every_module], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
    )
    assert where.returncode == 0, where.stderr[-3000:]
    files = where.stdout.split()
    assert len(files) > 60 and all(path.startswith(str(site)) for path in files), files
