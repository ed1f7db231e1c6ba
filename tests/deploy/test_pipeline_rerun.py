"""`docker compose --profile pipeline up`, twice, without Docker (issue 12): the pretrain, export and build-index
commands are read from docker-compose.yml and run in this process with the volumes mapped to temporary folders.
The second run must change nothing the service depends on: the same trunk bytes (not even rewritten), the same
ONNX bytes, and build-index a no-op (it used to fail with RecipeMismatchError after a re-export). A run with more
steps (another model) rebuilds the index for the new model instead of failing."""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from pathlib import Path

import pytest

from tests.deploy.conftest import COMPOSE_FILE, ROOT, load_yaml

ASSETS = ROOT / "tests" / "assets" / "images"
JOBS = ("pretrain", "export", "build-index")


def _expand(arg: str, env: dict[str, str]) -> str:
    """Compose's `${NAME:-default}` with `env` over the defaults."""
    return re.sub(r"\$\{([A-Z0-9_]+):-([^}]*)\}", lambda m: env.get(m.group(1), m.group(2)), str(arg))


def _run_pipeline(tmp: Path, steps: int) -> None:
    services = load_yaml(COMPOSE_FILE)["services"]
    mounts = {"/models": tmp / "models", "/index": tmp / "index", "/data": ASSETS}
    env = {"PIPELINE_STEPS": str(steps)}
    for job in JOBS:
        argv = [_expand(a, env) for a in services[job]["command"]]
        for container, host in mounts.items():
            argv = [str(host) + a[len(container) :] if a == container or a.startswith(container + "/") else a
                    for a in argv]  # fmt: skip
        assert argv[0] == "python", argv
        if argv[1] == "-m":
            module, args = argv[2], argv[3:]
        else:
            module, args = argv[1].removesuffix(".py").replace("/", "."), argv[2:]
        if job == "pretrain":  # the test machine's cores are shared: one thread, no loader processes
            args += ["--train.threads", "1", "--data.num_workers", "0", "--log.tensorboard", "false"]
        main = importlib.import_module(module if argv[1] != "-m" else f"{module}.__main__").main
        assert main(args) in (0, None), f"{job} failed: {argv}"


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.timeout(300)
def test_pipeline_rerun_is_a_no_op_and_a_new_model_rebuilds_the_index(tmp_path: Path) -> None:
    _run_pipeline(tmp_path, steps=2)
    trunk = tmp_path / "models" / "pipeline" / "pretrain" / "trunk.safetensors"
    onnx = tmp_path / "models" / "pipeline" / "onnx" / "model.onnx"
    index = tmp_path / "index" / "pipeline"
    first = {"trunk": trunk.read_bytes(), "trunk_mtime": trunk.stat().st_mtime_ns, "onnx": onnx.read_bytes()}
    first_index = {k: v for k, v in _digests(index).items() if k != "build-report.json"}
    fingerprint = json.loads((index / "build-report.json").read_text())["recipe_fingerprint"]

    _run_pipeline(tmp_path, steps=2)
    assert trunk.read_bytes() == first["trunk"] and trunk.stat().st_mtime_ns == first["trunk_mtime"]
    assert onnx.read_bytes() == first["onnx"]  # byte-deterministic export of the same trunk
    assert {k: v for k, v in _digests(index).items() if k != "build-report.json"} == first_index
    report = json.loads((index / "build-report.json").read_text())
    assert report["added"] == 0 and report["recipe_fingerprint"] == fingerprint

    _run_pipeline(tmp_path, steps=3)  # the operator asks for more training: a new model, so a new index
    assert trunk.read_bytes() != first["trunk"]
    report = json.loads((index / "build-report.json").read_text())
    assert report["recipe_fingerprint"] != fingerprint and report["added"] == report["index_size"] > 0
