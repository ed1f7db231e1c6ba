"""deploy/constraints.txt is current: the image's dependencies are all pinned exactly, the pins satisfy pyproject's
ranges, the Dockerfile installs with them, and (where this env has the pinned version) each pin's own requirements
are pinned too. Regenerate with `python deploy/docker/constraints.py > deploy/constraints.txt`."""

from __future__ import annotations

import re
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.deploy.conftest import DEPLOY, ROOT, load_module

CONSTRAINTS = DEPLOY / "constraints.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for raw in CONSTRAINTS.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"deploy/constraints.txt: {line!r} is not an exact pin (name==version)"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"{name} pinned twice"
        pins[name] = Version(match.group(2))
    return pins


def _image_requirements() -> list[Requirement]:
    return load_module(DEPLOY / "docker" / "constraints.py").roots(ROOT / "pyproject.toml")


def test_every_image_dependency_is_pinned_within_pyproject_ranges() -> None:
    pins = _pins()
    reqs = _image_requirements()
    names = {canonicalize_name(r.name) for r in reqs}
    assert {"fastapi", "uvicorn", "onnxruntime", "faiss-cpu", "numpy", "huggingface-hub"} <= names
    assert "torch" not in pins  # installed from TORCH_SOURCE, never pinned from the index
    for req in reqs:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} (pyproject.toml) is not pinned in deploy/constraints.txt: regenerate it"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"deploy/constraints.txt pins {name}=={pins[name]}, outside pyproject.toml's {req}: regenerate it"
        )


def test_pins_are_closed_under_their_own_requirements() -> None:
    """Checked for the pins this env has installed at exactly that version (their metadata is here)."""
    pins = _pins()
    checked = 0
    for name, version in pins.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if Version(dist.version) != version:
            continue
        checked += 1
        for text in dist.requires or []:
            sub = Requirement(text)
            if sub.marker is not None and not sub.marker.evaluate({"extra": ""}):
                continue  # an optional extra's or another platform's requirement
            sub_name = canonicalize_name(sub.name)
            if sub_name == "torch":
                continue
            assert sub_name in pins, f"{name}=={version} needs {sub}, which deploy/constraints.txt does not pin"
            assert sub.specifier.contains(pins[sub_name], prereleases=True), (
                f"{name}=={version} needs {sub}; deploy/constraints.txt pins {sub_name}=={pins[sub_name]}"
            )
    if not checked:
        pytest.skip("none of the pinned versions is installed here: nothing to check the closure with")


def test_the_dockerfile_installs_with_the_constraints() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY deploy/constraints.txt /tmp/build/constraints.txt" in dockerfile
    builder_cpu = dockerfile.split("FROM build-base AS builder-cpu", 1)[1].split("\nFROM ", 1)[0]
    install = [line for line in builder_cpu.splitlines() if "pip.sh install -r /tmp/build/requirements.txt" in line]
    assert install and all("-c /tmp/build/constraints.txt" in line for line in install), install
