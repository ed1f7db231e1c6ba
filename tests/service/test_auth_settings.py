"""API keys on every route (default-deny for state-changing ones), settings from env and flags, the client's
retries and the `python -m service embed|classify` CLI against a live server."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from fastapi import APIRouter
from pydantic import ValidationError

from service.__main__ import main as cli
from service.backends.fake_backend import FakeBackend
from service.client import AimClient, ServiceClientError
from service.middleware import ApiKeyPolicy
from service.settings import Settings, add_settings_arguments, settings_from_args
from tests.conftest import encode, make_photo
from tests.service.conftest import serve

PHOTO = encode(make_photo(40, 30), "JPEG")


def extra_router() -> APIRouter:
    """A router added later: a state-changing route must need a key without being listed anywhere."""
    router = APIRouter()

    @router.post("/collections/items")
    async def add_item() -> dict[str, str]:
        return {"ok": "added"}

    @router.get("/collections")
    async def index_stats() -> dict[str, str]:
        return {"ok": "stats"}

    return router


def test_policy_scopes() -> None:
    assert not ApiKeyPolicy([], "all").required("POST", "/index/items")
    mutating = ApiKeyPolicy(["k"], "mutating")
    assert mutating.required("POST", "/index/items") and mutating.required("DELETE", "/index/items/7")
    assert not mutating.required("POST", "/embed") and not mutating.required("GET", "/info")
    inference = ApiKeyPolicy(["k"], "inference")
    assert inference.required("POST", "/embed/") and inference.required("POST", "/classify")
    assert not inference.required("GET", "/metrics")
    everything = ApiKeyPolicy(["k"], "all")
    assert everything.required("GET", "/metrics") and everything.required("GET", "/docs")
    assert not everything.required("GET", "/healthz") and not everything.required("GET", "/readyz")
    assert everything.accepts({b"authorization": b"Bearer k"}) and everything.accepts({b"x-api-key": b"k"})
    assert not everything.accepts({b"authorization": b"Bearer nope"}) and not everything.accepts({})


def test_keys_enforced_on_every_route(live: list) -> None:
    settings = Settings(api_keys="key-one,key-two", auth_scope="mutating", max_body_bytes=50_000)
    server = serve(settings, FakeBackend(), routers=[extra_router()])
    live.append(server)
    with server.client() as client:
        # Default scope: state-changing routes need a key, reads and inference do not.
        assert client.post("/collections/items").status_code == 401
        assert client.post("/collections/items", headers={"x-api-key": "key-two"}).status_code == 200
        assert client.post("/collections/items", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/collections").status_code == 200
        assert client.post("/embed", files=[("files", ("a.jpg", PHOTO))]).status_code == 200
        # The body cap answers 413 before reading a byte of an over-long body.
        r = client.post("/embed", content=b"x" * 60_000, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    scoped = serve(Settings(api_keys="key-one", auth_scope="all"), FakeBackend(), routers=[extra_router()])
    live.append(scoped)
    with scoped.client() as client:
        spec = client.get("/openapi.json", headers={"x-api-key": "key-one"}).json()
        paths = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
        paths |= {("GET", p) for p in ("/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect")}
        assert {("POST", "/embed"), ("POST", "/classify"), ("GET", "/metrics"), ("POST", "/collections/items")} <= paths
        for method, path in sorted(paths):
            r = client.request(method, path)
            if path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):  # probes stay open
                assert r.status_code == 200, path
            else:
                err = r.json()  # KServe's routes answer {"error": <message>, "code": ...}
                code = err["code"] if path.startswith("/v2") else err["error"]["code"]
                assert r.status_code == 401 and code == "unauthorized", (method, path)
                assert r.headers["www-authenticate"].startswith("Bearer")
                assert client.request(method, path, headers={"x-api-key": "key-one"}).status_code != 401
        assert client.post("/embed/").status_code == 401  # aliases too


def test_settings_from_env_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIM_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("AIM_ALLOWED_FORMATS", "jpeg,png")
    monkeypatch.setenv("AIM_API_KEYS", "a,b")
    monkeypatch.setenv("AIM_GOLDEN_CHECK", "false")
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    settings = settings_from_args(parser.parse_args(["--max-batch-size", "8", "--port", "9000", "--no-golden-check"]))
    assert (settings.max_batch_size, settings.port) == (8, 9000)  # flags win over the environment
    assert settings.allowed_formats == ["JPEG", "PNG"] and len(settings.api_keys) == 2
    assert settings.golden_check is False and settings.public_dict()["api_keys"] == 2
    with pytest.raises(ValidationError, match="max_queue"):
        Settings(max_images_per_request=64, max_queue=32)
    with pytest.raises(ValidationError, match="device"):
        Settings(device="tpu")


def test_client_retries_and_cli(live: list, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    backend = FakeBackend()
    server = serve(Settings(max_wait_ms=1), backend)
    live.append(server)
    image = tmp_path / "cat.jpg"
    image.write_bytes(PHOTO)
    assert cli(["embed", str(image), str(image), "--url", server.url]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in rows] == [str(image)] * 2 and len(rows[0]["embedding"]) == 64
    assert cli(["classify", str(image), "--top-k", "2", "--url", server.url]) == 0
    row = json.loads(capsys.readouterr().out)
    assert len(row["indices"]) == 2 and row["labels"][0].startswith("class_")
    # 503 while draining is retried, then reported with the server's code.
    server.engine.begin_drain()
    with AimClient(server.url, retries=2, max_backoff_s=0.05) as client:
        assert client.embed([PHOTO])["count"] == 1  # draining still serves
        server.engine.status = "failed"
        with pytest.raises(ServiceClientError) as info:
            client.embed([PHOTO])
    assert info.value.status == 503 and info.value.code == "startup_failed"


def test_blank_paths_from_the_environment_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIM_INDEX_PATH", "")
    monkeypatch.setenv("AIM_MODEL", "  ")
    settings = Settings()
    assert settings.index_path is None and settings.model is None
