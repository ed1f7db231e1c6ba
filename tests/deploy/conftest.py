"""Shared helpers for the deployment tests: repository paths, the compose command, YAML loading."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = ROOT / "docker-compose.yml"
GPU_OVERRIDE = ROOT / "docker-compose.gpu.yml"
ENV_EXAMPLE = ROOT / ".env.example"


@cache
def compose_command() -> tuple[str, ...] | None:
    """The Compose v2 plugin (`docker compose`) where present, else docker-compose v1, else None."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return ("docker", "compose")
    if shutil.which("docker-compose"):
        return ("docker-compose",)
    return None


@pytest.fixture(scope="session")
def compose() -> tuple[str, ...]:
    cmd = compose_command()
    if cmd is None:
        reason = (
            "the docker client has no compose plugin and docker-compose is not installed"
            if shutil.which("docker")
            else "no docker client on this machine"
        )
        pytest.skip(f"compose config validation needs Docker Compose: {reason}")
    return cmd


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def load_module(path: Path) -> ModuleType:
    """Import a script under deploy/ (not a package) by its path."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
