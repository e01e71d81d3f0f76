"""What ships around the code: the Dockerfile's base image and pins against pyproject.toml."""

import re
import tomllib

from packaging.requirements import Requirement

from tests.launch import ROOT


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_dockerfile_starts_from_an_ngc_pytorch_image():
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", _dockerfile(), re.M).group(1)
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base), base
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", _dockerfile(), re.M)


def test_dockerfile_pins_fit_pyproject():
    """Every package the Dockerfile pins is a dependency of the project, in its range; megatron-core and
    energon are pinned (the image brings torch, TE and apex; nothing may replace them)."""
    pins = dict(re.findall(r"\b([a-z][a-z0-9_-]*)==([0-9][^\s\"']*)", _dockerfile()))
    assert {"megatron-core", "megatron-energon"} <= pins.keys() and "torch" not in pins
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ranges = {Requirement(r).name: Requirement(r).specifier for r in project["dependencies"]}
    for name, version in pins.items():
        assert name in ranges, f"the Dockerfile pins {name}, which pyproject.toml does not depend on"
        assert ranges[name].contains(version), f"{name}=={version} is outside pyproject.toml's {ranges[name]}"
