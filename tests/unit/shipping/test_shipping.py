"""What ships around the code: the Dockerfile's base image and pins against pyproject.toml."""

import re
import sys
import tomllib
from importlib.metadata import version

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.launch import ROOT


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_dockerfile_starts_from_an_ngc_pytorch_image():
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", _dockerfile(), re.M).group(1)
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base), base
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", _dockerfile(), re.M)


def _pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"\b([a-z][a-z0-9_-]*)==([0-9][^\s\"']*)", text))


def test_dockerfile_pins_fit_pyproject():
    """Every package the Dockerfile pins is a dependency of the project, in its range; megatron-core and
    energon are pinned (the image brings torch, TE and apex; nothing may replace them)."""
    pins = _pins(_dockerfile())
    assert {"megatron-core", "megatron-energon"} <= pins.keys() and "torch" not in pins
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ranges = {Requirement(r).name: Requirement(r).specifier for r in project["dependencies"]}
    for name, pinned in pins.items():
        assert name in ranges, f"the Dockerfile pins {name}, which pyproject.toml does not depend on"
        assert ranges[name].contains(pinned), f"{name}=={pinned} is outside pyproject.toml's {ranges[name]}"


def test_dockerfile_pins_what_the_default_stack_tests():
    """The image, the GPU check's wheels and the suite's default stack (Python 3.12) run the same
    Megatron-Core and energon; the floor (Python 3.11) tests megatron-core 0.16 on purpose."""
    image = _pins(_dockerfile())
    gpu_check = _pins((ROOT / "tools" / "gpu_requirements.txt").read_text())
    for name in ("megatron-core", "megatron-energon"):
        assert gpu_check[name] == image[name], f"tools/gpu_requirements.txt pins {name}=={gpu_check[name]}"
    if sys.version_info < (3, 12):
        pytest.skip("the floor stack (Python 3.11) runs megatron-core 0.16, not the image's")
    for name in ("megatron-core", "megatron-energon"):
        assert Version(version(name)).base_version == image[name], f"{name} {version(name)} installed"
