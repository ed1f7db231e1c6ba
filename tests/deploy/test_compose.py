"""docker-compose.yml, the GPU override, .env.example and the Dockerfile agree with the service and with each other.

`docker compose config` runs where Docker Compose is installed (CI machines have the docker client; the tests skip
with the reason where no compose command exists). The structural checks below need only PyYAML and run everywhere.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from service.settings import Settings
from tests.deploy.conftest import COMPOSE_FILE, DEPLOY, ENV_EXAMPLE, GPU_OVERRIDE, ROOT, load_module, load_yaml

DOCKERFILE = ROOT / "Dockerfile"
# Fixed by compose (the healthcheck, Prometheus and the port mapping rely on them), so not passed through.
FIXED_IN_COMPOSE = {"AIM_HOST", "AIM_PORT"}
PIPELINE_JOBS = ("pretrain", "export", "build-index")


def setting_env_names() -> set[str]:
    return {f"AIM_{name.upper()}" for name in Settings.model_fields}


def env_example_entries() -> dict[str, str]:
    """KEY -> example value for every `# KEY=value` line of .env.example."""
    entries = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^# ([A-Z][A-Z0-9_]*)=(.*)$", line)
        if match:
            entries[match.group(1)] = match.group(2)
    return entries


def compose_variables(*paths: Path) -> set[str]:
    return {m for p in paths for m in re.findall(r"\$\{([A-Z][A-Z0-9_]*)", p.read_text())}


def run_config(compose: tuple[str, ...], tmp_path: Path, *args: str, env_file: Path | None = None) -> dict:
    # An explicit env file, so a developer's .env never changes what is validated.
    if env_file is None:
        env_file = tmp_path / "empty.env"
        env_file.write_text("")
    cmd = [*compose, "--project-directory", str(ROOT), "--env-file", str(env_file), *args, "config"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr}"
    import yaml

    return yaml.safe_load(proc.stdout)


# ----------------------------------------------------------------------------------------------------------------
# docker compose config (skips without Docker Compose)


def test_compose_config_default(compose: tuple[str, ...], tmp_path: Path) -> None:
    cfg = run_config(compose, tmp_path, "-f", str(COMPOSE_FILE))
    # Compose v1 lists profiled services in `config` too (v2 may not): what a plain `up` starts has no profile.
    unprofiled = {name for name, service in cfg["services"].items() if not service.get("profiles")}
    assert unprofiled == {"aim", "prometheus", "grafana"}, "pipeline jobs must stay out of a plain `up`"
    aim = cfg["services"]["aim"]
    assert aim["build"]["target"] == "cpu"
    assert aim["environment"]["AIM_HOST"] == "0.0.0.0"
    assert cfg["services"]["prometheus"]["depends_on"]["aim"]["condition"] == "service_healthy"
    assert cfg["services"]["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_compose_config_pipeline_profile(compose: tuple[str, ...], tmp_path: Path) -> None:
    cfg = run_config(compose, tmp_path, "-f", str(COMPOSE_FILE), "--profile", "pipeline")
    assert {"aim", "prometheus", "grafana", *PIPELINE_JOBS, "aim-pipeline"} <= set(cfg["services"])
    chain = [("export", "pretrain"), ("build-index", "export"), ("aim-pipeline", "build-index")]
    for service, previous in chain:
        assert cfg["services"][service]["depends_on"][previous]["condition"] == "service_completed_successfully"


def test_compose_config_gpu_override(compose: tuple[str, ...], tmp_path: Path) -> None:
    cfg = run_config(compose, tmp_path, "-f", str(COMPOSE_FILE), "-f", str(GPU_OVERRIDE))
    aim = cfg["services"]["aim"]
    assert aim["build"]["target"] == "gpu"
    devices = aim["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    # The override adds to the base service; it must not lose what the base sets.
    assert aim["environment"]["AIM_HOST"] == "0.0.0.0" and aim["healthcheck"]["test"]


def test_compose_config_with_every_documented_value(compose: tuple[str, ...], tmp_path: Path) -> None:
    """Uncommenting all of .env.example (as a user might) still gives a valid stack, and the values arrive."""
    env_file = tmp_path / "all.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env_example_entries().items()))
    cfg = run_config(compose, tmp_path, "-f", str(COMPOSE_FILE), env_file=env_file)
    env = cfg["services"]["aim"]["environment"]
    assert env["AIM_MAX_BATCH_SIZE"] in (32, "32")
    assert env["AIM_HOST"] == "0.0.0.0", "AIM_HOST from .env must not override the container's bind address"


# ----------------------------------------------------------------------------------------------------------------
# structure (no Docker needed)


def test_compose_passes_every_service_setting_through() -> None:
    compose = load_yaml(COMPOSE_FILE)
    passed = set(compose["x-aim-settings"])
    expected = setting_env_names() - FIXED_IN_COMPOSE
    assert expected - passed == set(), "settings compose does not pass into the container"
    assert {k for k in passed if k.startswith("AIM_")} - expected == set(), "passes settings the service lacks"
    # No value: unset in the shell/.env means unset in the container, so the service's default applies.
    assert all(v is None for v in compose["x-aim-settings"].values())


def test_env_example_documents_every_setting_and_variable() -> None:
    documented = set(env_example_entries())
    assert setting_env_names() - documented == set(), "service settings missing from .env.example"
    used = compose_variables(COMPOSE_FILE, GPU_OVERRIDE)
    assert used - documented == set(), "compose variables missing from .env.example"


def test_env_example_changes_nothing_until_edited() -> None:
    for n, line in enumerate(ENV_EXAMPLE.read_text().splitlines(), 1):
        assert line == "" or line.startswith("#"), f".env.example:{n} is active: {line!r}"
        # docker-compose v1 keeps `# x` after a value as part of it.
        if re.match(r"^# [A-Z][A-Z0-9_]*=", line):
            assert " #" not in line, f".env.example:{n}: put the comment on its own line: {line!r}"


def test_env_example_values_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented examples are accepted by the service itself (types, ranges, combinations)."""
    entries = env_example_entries()
    for key in setting_env_names():
        monkeypatch.setenv(key, entries[key])
    settings = Settings()
    assert settings.max_batch_size == int(entries["AIM_MAX_BATCH_SIZE"])


def test_depends_on_targets_can_satisfy_their_condition() -> None:
    compose = load_yaml(COMPOSE_FILE)
    services = compose["services"]
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if spec["condition"] == "service_healthy":
                assert services[dep].get("healthcheck"), f"{name} waits for {dep} to be healthy; it has no healthcheck"
            elif spec["condition"] == "service_completed_successfully":
                assert services[dep].get("restart") == "no", f"{dep} is a one-shot job: restart must be 'no'"
    for job in (*PIPELINE_JOBS, "aim-pipeline"):
        assert services[job].get("profiles") == ["pipeline"]


def volume_target(spec: str) -> str:
    """`${AIM_MODELS_DIR:-models}:/models:ro` -> /models (the source may hold colons of its own)."""
    return re.sub(r":(ro|rw)$", "", spec).rsplit(":", 1)[1]


def test_service_container_matches_the_image() -> None:
    compose = load_yaml(COMPOSE_FILE)
    aim = compose["services"]["aim"]
    dockerfile = DOCKERFILE.read_text()
    assert aim["healthcheck"]["test"] == ["CMD", "python", "/opt/aim/healthcheck.py"]
    assert "COPY deploy/docker/healthcheck.py /opt/aim/healthcheck.py" in dockerfile
    assert {volume_target(v) for v in aim["volumes"]} == {"/models", "/index"}
    assert any(p.endswith(":8000") for p in aim["ports"])
    assert aim["read_only"] is True and "/tmp" in aim["tmpfs"]
    # stop_grace_period must cover the service's drain (drain_grace_s + drain_timeout_s).
    settings = Settings()
    assert int(aim["stop_grace_period"].rstrip("s")) > settings.drain_grace_s + settings.drain_timeout_s


def test_prometheus_config_scrapes_the_compose_service() -> None:
    prometheus = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    compose = load_yaml(COMPOSE_FILE)["services"]
    for job, service in (("aim", "aim"), ("aim-pipeline", "aim-pipeline")):
        sd = jobs[job]["dns_sd_configs"][0]
        assert sd["names"] == [service] and service in compose
        assert sd["port"] == 8000 and jobs[job]["metrics_path"] == "/metrics"
    mounts = compose["prometheus"]["volumes"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    assert any(m.startswith("./deploy/prometheus/rules:") for m in mounts)


# ----------------------------------------------------------------------------------------------------------------
# Dockerfile and build context


def dockerfile_stages() -> list[tuple[str, str]]:
    """(FROM source, stage name) in file order."""
    return re.findall(r"^FROM\s+(\S+)\s+AS\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE)


def test_dockerfile_targets_and_order() -> None:
    stages = dockerfile_stages()
    names = [name for _, name in stages]
    assert {"cpu", "gpu", "pipeline", "final"} <= set(names)
    # The classic builder builds every stage before --target: CPU must not drag the GPU stages in.
    assert max(names.index("cpu"), names.index("builder-cpu")) < min(names.index("builder-gpu"), names.index("gpu"))
    assert stages[-1] == ("${VARIANT}", "final"), "the last stage picks cpu/gpu by VARIANT"
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.MULTILINE)
    assert re.search(r"^ARG VARIANT=cpu$", text, re.MULTILINE)
    instructions = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not any("--mount" in line for line in instructions), "the classic builder (no BuildKit) must build it"


def test_final_stages_take_only_the_venv_from_build_stages() -> None:
    text = DOCKERFILE.read_text()
    blocks = re.split(r"^(?=FROM )", text, flags=re.MULTILINE)
    finals = {"cpu", "gpu", "pipeline"}
    for block in blocks:
        match = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", block)
        if not match or match.group(2) not in finals:
            continue
        assert match.group(1) == "runtime-base", f"{match.group(2)} must start from runtime-base (no build tools)"
        for line in re.findall(r"^COPY --from=\S+ .*$", block, flags=re.MULTILINE):
            assert line.endswith("/opt/venv /opt/venv"), f"{match.group(2)} copies more than the venv: {line}"
    runtime = next(b for b in blocks if b.startswith("FROM ${BASE_IMAGE} AS runtime-base"))
    assert re.search(r"^USER 10001:10001$", runtime, re.MULTILINE), "numeric non-root user (runAsNonRoot)"
    assert "HEALTHCHECK" in runtime and "healthcheck.py" in runtime
    assert "AIM_HOST=0.0.0.0" in runtime, "inside a container the service must listen beyond loopback"
    assert "apt-get" not in runtime and "pip.sh" not in runtime and "extra-ca" not in runtime


def dockerignore_allows(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; `*` then `!dir/` entries make an allow-list."""
    allowed = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        if pattern == "*" or path == pattern or path.startswith(pattern + "/"):
            allowed = negate
    return allowed


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    sources = []
    for line in re.findall(r"^COPY (?!--from)(.*)$", DOCKERFILE.read_text(), flags=re.MULTILINE):
        parts = [p for p in line.replace("\\", " ").split() if not p.startswith("--")]
        sources += parts[:-1]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert dockerignore_allows(src.rstrip("/")), f"COPY {src}: excluded by .dockerignore"
    for private in ("runs", ".git", "tests", ".env", "venv"):
        assert not dockerignore_allows(private), f"{private} must stay out of the build context"


def test_requirements_helper_splits_torch_and_cuda_builds() -> None:
    helper = load_module(DEPLOY / "docker" / "requirements.py")
    pyproject = str(ROOT / "pyproject.toml")
    serve = helper.requirements(pyproject, ["serve", "hub"])
    names = {helper._name(r) for r in serve}
    assert "torch" not in names, "torch comes from TORCH_SOURCE, never from the index's default build"
    assert {"fastapi", "onnxruntime", "faiss-cpu", "huggingface_hub"} <= names
    gpu = {helper._name(r) for r in helper.requirements(pyproject, ["serve"], frozenset({"onnxruntime", "faiss-cpu"}))}
    assert not gpu & {"onnxruntime", "faiss-cpu", "torch"}
    with pytest.raises(SystemExit):
        helper.requirements(pyproject, ["no-such-extra"])
