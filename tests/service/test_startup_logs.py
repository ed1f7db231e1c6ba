"""What an operator reads on stderr: an expected error is one clear line (no pydantic report, no traceback), and a
clean start carries no library noise (faiss's loader fallbacks, onnxruntime's telemetry warning on a read-only
home). Real `python -m service` processes, stderr read as it is."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.golden import load_golden, save_golden

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "aimcore" / "assets" / "aim-demo"
NOISE = ("Traceback", "faiss.loader", "telemetry", "pydantic", "errors.pydantic.dev", "view tensor")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIM_") and k != "ORT_DISABLE_TELEMETRY"}
    # A home and cache nobody can write to, as on the compose service's read-only root file system.
    return env | {"HOME": "/dev/null", "XDG_CACHE_HOME": "/dev/null/cache", "AIM_PORT": str(_free_port())} | extra


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args], cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=120
    )


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in f" {line}" or line.startswith("ERROR")]


@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        ((), {"AIM_MAX_BATCH_SIZE": "abc"}, ("max_batch_size", "AIM_MAX_BATCH_SIZE", "'abc'")),
        (("--max-batch-size", "-3"), {}, ("max_batch_size", "--max-batch-size", "-3")),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(args: tuple[str, ...], env: dict[str, str], names: tuple[str]) -> None:
    proc = _run(*args, **env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR service: invalid settings:"), proc.stderr
    assert all(n in lines[0] for n in names), lines[0]
    assert not any(n in proc.stderr for n in NOISE), proc.stderr


def test_a_bad_api_key_setting_does_not_echo_the_secret() -> None:
    proc = _run(**{"AIM_API_KEYS": "s3cret-value", "AIM_AUTH_SCOPE": "no-such-scope"})
    assert proc.returncode == 2 and "s3cret-value" not in proc.stderr, proc.stderr


def test_an_unavailable_model_is_one_line() -> None:
    proc = _run("--model", "/nonexistent/model.safetensors")
    assert proc.returncode == 1, proc.stderr
    errors = _errors(proc.stderr)
    assert len(errors) == 1 and "ModelUnavailableError" in errors[0] and "/nonexistent" in errors[0], proc.stderr
    assert not any(n in proc.stderr for n in NOISE), proc.stderr


def test_a_failed_self_check_is_one_line(tmp_path: Path) -> None:
    model = tmp_path / "aim-demo"
    model.mkdir()
    for name in ("trunk.safetensors", "head.safetensors"):
        shutil.copy(DEMO / name, model / name)
    golden = load_golden(DEMO / "golden.npz")
    golden.meta["weights_sha256"] = "0" * 64  # reference outputs of other weights
    save_golden(golden, model / "golden.npz")
    proc = _run("--model", str(model), "--backend", "torch", "--no-autoselect")
    assert proc.returncode == 1, proc.stderr
    errors = _errors(proc.stderr)
    assert len(errors) == 1 and "self-check failed" in errors[0] and "regenerate it" in errors[0], proc.stderr
    assert not any(n in proc.stderr for n in NOISE), proc.stderr


def test_a_clean_onnx_start_has_no_library_noise() -> None:
    """The bundled int8 ONNX export, served until ready, then SIGTERM: every line is the service's own."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--model", str(DEMO / "onnx-int8")],
        cwd=ROOT,
        env=_env(),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    seen: list[str] = []
    deadline = time.monotonic() + 90
    try:
        for line in proc.stderr:
            seen.append(line)
            if "service.engine: ready in" in line or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    stderr = "".join(seen) + (rest or "")
    assert "ready in" in stderr and "self-check passed" in stderr, stderr
    assert proc.returncode == 0, stderr
    assert not any(n in stderr for n in NOISE), stderr
