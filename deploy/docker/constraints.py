"""Write deploy/constraints.txt: exact pins of everything the CPU image installs besides torch.

The image installs pyproject.toml's core dependencies and the `serve` and `hub` extras (deploy/docker/requirements.py)
with `pip install -c deploy/constraints.txt`, so a build today gets the versions that were tested, not whatever the
index offers (a build once resolved onnxruntime 1.32 and fastapi 0.165 unasked). The pins are read from the
environment this runs in, walking those requirements and their own, so run it where the test suite passes:

    pip install torch==2.13.0 -e ".[dev]"   # a fresh venv, as .ci/run makes
    python deploy/docker/constraints.py > deploy/constraints.txt

tests/deploy/test_constraints.py checks the file is current against pyproject.toml. Markers are evaluated for this
interpreter and platform: run it on CPython 3.11, Linux x86_64, like the image.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
EXTRAS = ("serve", "hub")  # what the cpu image installs (Dockerfile, builder-cpu)
SKIP = frozenset({"torch"})  # installed first from TORCH_SOURCE (install-torch.sh), never from the index


def _requirements_module():  # deploy/docker/requirements.py is a script, not a package
    spec = importlib.util.spec_from_file_location("requirements", Path(__file__).with_name("requirements.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def roots(pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    return [Requirement(r) for r in _requirements_module().requirements(str(pyproject), list(EXTRAS))]


def resolve(requirements: list[Requirement]) -> dict[str, str]:
    """name -> installed version for the requirements and everything they pull in (markers for this platform)."""
    pins: dict[str, str] = {}
    todo: list[tuple[Requirement, frozenset[str]]] = [(r, frozenset(r.extras)) for r in requirements]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if name in SKIP or (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{req.name} is not installed here: run this in the env the tests pass in") from None
        if not req.specifier.contains(dist.version, prereleases=True):
            raise SystemExit(f"installed {req.name} {dist.version} does not satisfy {req}")
        pins[name] = dist.version
        for text in dist.requires or []:
            sub = Requirement(text)
            wanted = sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (extras or {""}))
            if wanted:
                todo.append((sub, frozenset(sub.extras)))
    return pins


def render(pins: dict[str, str]) -> str:
    head = [
        "# Exact pins of what the cpu image installs besides torch (pyproject.toml's dependencies + the serve and hub",
        "# extras, and what they pull in), used as `pip install -c deploy/constraints.txt` by the Dockerfile.",
        "# Generated, do not edit: python deploy/docker/constraints.py > deploy/constraints.txt",
        "# (in the env the tests pass in; CPython 3.11, Linux x86_64). tests/deploy/test_constraints.py checks it.",
    ]
    return "\n".join([*head, *(f"{name}=={pins[name]}" for name in sorted(pins))]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    sys.stdout.write(render(resolve(roots())))


if __name__ == "__main__":
    main()
