"""service.client (sync and async) and the `python -m service` client commands against a live uvicorn on loopback
serving aim-debug with an index: every route, the same vectors as a raw /embed call, the server's error codes;
the retry policy (Retry-After honoured, bounded backoff, files rewound and streamed) through httpx's transport
hook; one-line errors for missing files."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.__main__ import main as cli
from service.client import AimClient, AsyncAimClient, ImageFileError, ServiceClientError, retry_after_s
from service.settings import Settings
from tests.service.conftest import LiveServer, serve

KEY = "client-test-key"


@pytest.fixture(scope="module")
def server(debug_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = Settings(
        model=str(debug_checkpoint),
        max_wait_ms=2,
        max_batch_size=16,
        index_path=str(tmp_path_factory.mktemp("client") / "index"),
        index_kind="flat",
        api_keys=KEY,
        index_recall_check_interval_s=0,
    )
    with serve(settings) as live:
        yield live


@pytest.fixture(scope="module")
def files(asset_bytes: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for name in sorted(asset_bytes)[:5]:
        (path := folder / name).write_bytes(asset_bytes[name])
        paths.append(path)
    return paths


def raw_embed(server: LiveServer, blobs: list[bytes]) -> np.ndarray:
    with server.client() as http:
        r = http.post("/embed", json={"images": [base64.b64encode(b).decode() for b in blobs]})
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["embeddings"], np.float32)


def close(a: object, b: np.ndarray) -> None:
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0, atol=2e-6 * np.sqrt(b.shape[-1]))


def test_sync_client_covers_every_route(server: LiveServer, files: list[Path]) -> None:
    blobs = [p.read_bytes() for p in files]
    expected = raw_embed(server, blobs)
    with AimClient(server.url, api_key=KEY) as client:
        assert client.ready() and client.info()["status"] == "ready"
        embedded = client.embed(files)  # paths, streamed as multipart files
        close(embedded["embeddings"], expected)
        close(client.embed([blobs[0]])["embeddings"], expected[:1])  # raw bytes
        assert len(client.classify(files[:2], top_k=2)["predictions"][0]["indices"]) == 2
        ids = [p.name for p in files]
        added = client.add_items(ids, files, metadata=[{"n": i} for i in range(len(files))])
        assert added["added"] == len(files)
        assert client.index_info()["size"] == len(files)
        item = client.get_item(ids[1], vector=True)
        assert item["metadata"] == {"n": 1}
        close(item["vector"], expected[1])
        by_image = client.search([files[2]], k=3)["results"][0]
        assert by_image["ids"][0] == ids[2]
        recipe = embedded["recipe"]["fingerprint"]
        by_vector = client.search(vectors=expected[3:4].tolist(), recipe=recipe, k=2, where={"n": 3})["results"][0]
        assert by_vector["ids"] == [ids[3]]
        assert ids[4] not in client.search(id=ids[4], k=5)["results"][0]["ids"]  # the item itself left out
        assert client.search(id=ids[4], k=1, include_self=True)["results"][0]["ids"] == [ids[4]]
        assert client.delete_item(ids[0])["deleted"] == ids[0]
        with pytest.raises(ServiceClientError) as exc:
            client.get_item(ids[0])
        assert exc.value.status == 404 and exc.value.code == "item_not_found"
        assert client.snapshot()["size"] == len(files) - 1
    with AimClient(server.url) as anonymous, pytest.raises(ServiceClientError) as exc:
        anonymous.delete_item(ids[1])
    assert exc.value.status == 401 and exc.value.code == "unauthorized"


def test_async_client_covers_the_same_routes(server: LiveServer, files: list[Path]) -> None:
    expected = raw_embed(server, [p.read_bytes() for p in files[:3]])

    async def main() -> None:
        async with AsyncAimClient(server.url, api_key=KEY) as client:
            assert await client.ready()
            embedded, info = await asyncio.gather(client.embed(files[:3]), client.info())
            close(embedded["embeddings"], expected)
            assert info["model"]["flavor"] == "aim-debug"
            assert (await client.classify([files[0]], top_k=1))["predictions"][0]["indices"]
            await client.add_items(["async-a"], [files[0]], metadata=[{"via": "async"}])
            assert (await client.get_item("async-a"))["metadata"] == {"via": "async"}
            hits = (await client.search([files[0]], k=1, where={"via": "async"}))["results"][0]
            assert hits["ids"] == ["async-a"]
            assert (await client.index_info())["size"] >= 1
            assert (await client.delete_item("async-a"))["deleted"] == "async-a"
            assert (await client.snapshot())["lsn"] >= 1
            with pytest.raises(ServiceClientError) as exc:
                await client.embed([b"not an image"])
            assert exc.value.status == 422 and exc.value.code == "not_an_image"

    asyncio.run(main())


def test_cli_search_and_index(
    server: LiveServer, files: list[Path], capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    base = ["--url", server.url, "--api-key", KEY]
    assert cli(["index", "add", *map(str, files[:2]), "--ids", "cli-a", "cli-b", *base]) == 0
    assert json.loads(capsys.readouterr().out)["added"] == 2
    assert cli(["search", str(files[1]), "-k", "1", "--where", '{"nonexistent": 1}', *base]) == 0
    assert json.loads(capsys.readouterr().out)["ids"] == []
    assert cli(["search", str(files[1]), "-k", "1", *base]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["image"] == str(files[1]) and row["ids"][0] in ("cli-b", files[1].name)
    assert cli(["search", "--id", "cli-a", "-k", "2", *base]) == 0
    assert "cli-a" not in json.loads(capsys.readouterr().out)["ids"]
    assert cli(["index", "get", "cli-a", *base]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == "cli-a"
    assert cli(["index", "delete", "cli-a", "cli-b", *base]) == 0
    assert [json.loads(line)["deleted"] for line in capsys.readouterr().out.splitlines()] == ["cli-a", "cli-b"]
    assert cli(["index", "info", *base]) == 0 and "recipe" in json.loads(capsys.readouterr().out)
    assert cli(["info", *base]) == 0 and json.loads(capsys.readouterr().out)["status"] == "ready"
    assert cli(["index", "get", "cli-a", *base]) == 1  # gone: the server's code, one line
    assert "item_not_found" in caplog.records[-1].getMessage()


def test_missing_files_are_one_line_errors(
    server: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "nope.jpg"
    for argv in (["embed", str(missing)], ["classify", str(tmp_path)], ["search", str(missing)]):
        caplog.clear()
        assert cli([*argv, "--url", server.url]) == 2
        messages = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(messages) == 1 and "\n" not in messages[0] and "Traceback" not in messages[0]
        assert ("does not exist" in messages[0]) or ("is a directory" in messages[0])
        assert not capsys.readouterr().out
    with AimClient(server.url) as client, pytest.raises(ImageFileError, match=r"nope\.jpg"):
        client.embed([missing])


# ----- the retry policy, through httpx's transport hook (no server needed to count attempts) -----
def test_retries_honour_retry_after_and_rewind_streamed_files(tmp_path: Path) -> None:
    image = tmp_path / "big.bin"
    image.write_bytes(bytes(range(256)) * 4096)  # 1 MiB, streamed in chunks
    seen: list[tuple[bytes | None, int]] = []
    answers = [
        httpx.Response(429, headers={"Retry-After": "3"}, json={"error": {"code": "overloaded", "message": "full"}}),
        httpx.Response(503, headers={"Retry-After": "1"}, json={"error": {"code": "not_ready", "message": "x"}}),
        httpx.Response(200, json={"embeddings": [[1.0]], "dim": 1, "count": 1, "recipe": {}}),
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        body = request.read()
        seen.append((request.headers.get("content-length", "").encode() or None, body.count(image.read_bytes())))
        return answers[len(seen) - 1]

    waits: list[float] = []
    with AimClient("http://aim.test", transport=httpx.MockTransport(handler), max_backoff_s=2.0) as client:
        client.sleep = waits.append
        assert client.embed([image])["count"] == 1
    assert waits == [2.0, 1.0]  # Retry-After 3 capped at max_backoff_s, then 1 as given
    assert [count for _, count in seen] == [1, 1, 1]  # the whole file in every attempt: rewound, not consumed
    assert all(length for length, _ in seen)  # a Content-Length from the file's size, not a buffered copy


def test_retries_are_bounded_and_keep_the_code() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(429, json={"error": {"code": "overloaded", "message": "queue full"}})

    waits: list[float] = []
    with AimClient("http://aim.test", transport=httpx.MockTransport(handler), retries=3) as client:
        client.sleep = waits.append
        with pytest.raises(ServiceClientError) as exc:
            client.classify([b"x"])
    assert len(calls) == 4 and len(waits) == 3 and all(0 < w <= 10.0 for w in waits)
    assert (exc.value.status, exc.value.code, exc.value.message) == (429, "overloaded", "queue full")

    def not_retried(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(400, json={"error": "bad tensor", "code": "invalid_request"})  # KServe's shape

    calls.clear()
    with (
        AimClient("http://aim.test", transport=httpx.MockTransport(not_retried)) as client,
        pytest.raises(ServiceClientError) as exc,
    ):
        client.info()
    assert len(calls) == 1 and exc.value.code == "invalid_request" and exc.value.message == "bad tensor"


def test_async_retries_honour_retry_after() -> None:
    statuses = iter([503, 200])

    def handler(request: httpx.Request) -> httpx.Response:
        status = next(statuses)
        return httpx.Response(status, headers={"Retry-After": "1"}, json={"ok": status == 200})

    async def main() -> list[float]:
        waits: list[float] = []

        async def sleep(s: float) -> None:
            waits.append(s)

        async with AsyncAimClient("http://aim.test", transport=httpx.MockTransport(handler)) as client:
            client.sleep = sleep
            assert (await client.info())["ok"]
        return waits

    assert asyncio.run(main()) == [1.0]


def test_retry_after_forms() -> None:
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=5), usegmt=True)
    assert 3.5 < retry_after_s(later, 0, 10.0) <= 5.0  # an HTTP date
    assert retry_after_s(later, 0, 2.0) == 2.0  # capped
    assert retry_after_s("7", 0, 10.0) == 7.0
    backoff = [retry_after_s(None, a, 10.0) for a in range(8)]  # no header: exponential with jitter, capped
    assert all(0.125 <= b <= 10.0 for b in backoff) and backoff[-1] > backoff[0]
    assert retry_after_s("soon", 1, 10.0) <= 0.5  # unparsable: backoff


def test_client_needs_only_the_serve_extra() -> None:
    """Every third-party import of service.client is declared in the `serve` extra (it used to need httpx from dev)."""
    import ast
    import sys
    import tomllib

    root = Path(__file__).resolve().parents[2]
    serve_deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve"]
    declared = {d.split("[")[0].split(">")[0].split("=")[0].strip().lower() for d in serve_deps}
    tree = ast.parse((root / "service" / "client.py").read_text())
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    third_party = {m for m in modules if m not in sys.stdlib_module_names and m != "__future__"}
    assert third_party == {"httpx"} and third_party <= declared
