"""deploy/smoke.sh for real: build the image, run the compose stack, send real images, check Prometheus, tear down.

Runs where a Docker engine answers (`docker info`) and Docker Compose is installed; skips with the reason
elsewhere (CI machines have the docker client but no engine). Takes minutes: the image build dominates.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.conftest import DEPLOY, ROOT, compose_command, load_module

logger = logging.getLogger(__name__)


def _engine_unavailable() -> str | None:
    if shutil.which("docker") is None:
        return "no docker client on this machine"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "docker info timed out"
    if info.returncode != 0:
        return "no Docker engine answers (docker info failed; see shared/docs/DOCKER.md to start one)"
    if compose_command() is None:
        return "Docker Compose is not installed (neither the compose plugin nor docker-compose)"
    return None


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_smoke_script_passes() -> None:
    reason = _engine_unavailable()
    if reason:
        pytest.skip(reason)
    # PYTHON: the HTTP checks only need the standard library; this interpreter always has it.
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", shutil.which("python3") or "python3")}
    proc = subprocess.run(
        ["bash", str(DEPLOY / "smoke.sh")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1750
    )
    output = proc.stdout + proc.stderr
    logger.info("smoke.sh output:\n%s", output)
    assert proc.returncode == 0, output[-6000:]
    assert "PASSED" in output and "REAL    Prometheus" in output and "REAL    service: POST" in output


# ----- the run plumbing, without an engine -----

SMOKE = DEPLOY / "smoke.sh"
FASHION = ROOT / "tests" / "assets" / "fashion_mnist"


@pytest.fixture(scope="module")
def checks():  # type: ignore[no-untyped-def]
    return load_module(DEPLOY / "smoke_checks.py")


def _script_value(name: str) -> str:
    match = re.search(rf"^{name}=(\S+)$", SMOKE.read_text(), re.M)
    assert match, f"{name}= not set in deploy/smoke.sh"
    return match.group(1)


def test_each_run_gets_a_compose_project_of_its_own(checks) -> None:  # type: ignore[no-untyped-def]
    names = {checks.project_name() for _ in range(20)}
    assert len(names) == 20
    assert all(re.fullmatch(r"aim-smoke-[a-z0-9_-]+", n) for n in names)
    assert checks.project_name("ABC") == "aim-smoke-abc"
    with pytest.raises(ValueError):
        checks.project_name("bad name")
    text = SMOKE.read_text()
    assert 'PROJECT=${SMOKE_PROJECT:-$("$PYTHON" deploy/smoke_checks.py project)}' in text
    assert not re.search(r"^PROJECT=aim-smoke$", text, re.M)


def test_host_ports_are_ephemeral_unless_a_base_is_given(checks) -> None:  # type: ignore[no-untyped-def]
    compose_text = (ROOT / "docker-compose.yml").read_text()
    published = set(re.findall(r'"\$\{(\w+_PUBLISH):-[^}]*\}:\d+"', compose_text))
    assert published == set(checks.PUBLISH_VARS)  # every published port of the compose file is covered
    ephemeral = checks.publish_env(None)
    # "127.0.0.1:" + ":8000" is compose's "127.0.0.1::8000": the engine picks a free host port for each run.
    assert all(v == "127.0.0.1:" for v in ephemeral.values()) and set(ephemeral) == published
    fixed = checks.publish_env(20000)
    assert sorted(fixed.values()) == [f"127.0.0.1:{20000 + i}" for i in range(4)]
    with pytest.raises(ValueError):
        checks.publish_env(80)
    assert "18000" not in SMOKE.read_text()  # no fixed default port left in the script
    assert checks.host_port("127.0.0.1:49153\n") == 49153
    assert checks.host_port("[::1]:32768") == 32768
    assert checks.host_port("0.0.0.0:40001\n[::]:40001\n") == 40001
    for bad in ("", ":0", "no port"):
        with pytest.raises(ValueError):
            checks.host_port(bad)


def test_the_stand_in_prometheus_never_wears_the_official_name(checks) -> None:  # type: ignore[no-untyped-def]
    official = re.search(r"\$\{PROMETHEUS_IMAGE:-([^}]+)\}", (ROOT / "docker-compose.yml").read_text())
    assert official and official.group(1).startswith("prom/prometheus:")
    standin = checks.STANDIN_PROMETHEUS_IMAGE
    assert standin.startswith("aim-stand-in/") and standin != official.group(1)
    assert _script_value("STANDIN_PROM_IMAGE") == standin
    text = SMOKE.read_text()
    assert '-t "$PROM_IMAGE"' not in text and '-t "$STANDIN_PROM_IMAGE" deploy/prometheus/standin' in text
    base = {"base_image": "b", "torch_source": "s", "torch_version": "2.13.0", "aim_image": "aim-stack:cpu"}
    # The official image runs: compose's own default, nothing in the env file overrides it.
    assert "PROMETHEUS_IMAGE" not in checks.env_file(**base)
    # The stand-in runs: named in this run's env file only (--env-file $WORK/smoke.env), never in .env or compose.
    lines = checks.env_file(**base, prometheus_image=standin).splitlines()
    assert f"PROMETHEUS_IMAGE={standin}" in lines
    assert "AIM_PUBLISH=127.0.0.1:" in lines and "AIM_TORCH_THREADS=1" in lines
    with pytest.raises(ValueError):
        checks.env_file(**base, extra={"X": "a\nB=c"})


def test_classify_check_asserts_the_real_fashion_mnist_label(checks, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The smoke test's service check against the bundled demo model on a real server (no engine needed)."""
    from service.settings import Settings
    from tests.service.conftest import serve

    label_image = Path(_script_value("LABEL_IMAGE").replace("$ROOT", str(ROOT)))
    assert label_image.parent == FASHION and label_image.is_file()
    assert checks.expected_label(label_image) == "bag"
    photo = ROOT / "tests" / "assets" / "images" / "landscape_640x427.jpg"
    with serve(Settings(max_batch_size=4)) as server:
        url = server.url
        checks.check_service(url, photo, label_image=label_image)
        wrong = tmp_path / "trouser__mislabelled.png"
        wrong.write_bytes(label_image.read_bytes())  # a bag, filed under another label: the check must fail
        with pytest.raises(checks.CheckFailed, match="expected 'trouser'"):
            checks.check_service(url, photo, label_image=wrong)
