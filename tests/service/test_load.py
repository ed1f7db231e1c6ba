"""Behaviour under load, through a real uvicorn, with the fake backend standing in for a model: concurrent
requests coalesce, overload is refused quickly, deadlines give 504, a poisoned image fails alone, and a client
that disconnects has its work dropped before compute."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from service.backends.fake_backend import FakeBackend
from service.settings import Settings
from tests.conftest import encode, make_photo
from tests.service.conftest import serve

PHOTO = encode(make_photo(64, 48), "PNG")
WHITE = encode(make_photo(64, 48).point(lambda _: 255), "PNG")  # the fake backend's poison below


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


async def fire(url: str, n: int, body: bytes = PHOTO, headers: dict[str, str] | None = None) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        return await asyncio.gather(
            *(client.post("/embed", files=[("files", ("x.png", body))], headers=headers) for _ in range(n))
        )


def test_concurrent_requests_coalesce(live: list) -> None:
    backend = FakeBackend()
    server = serve(Settings(max_wait_ms=20, max_batch_size=16), backend=backend)
    live.append(server)
    backend.delay_s = 0.05
    responses = asyncio.run(fire(server.url, 16))
    assert all(r.status_code == 200 for r in responses)
    calls = backend.calls[1 + 4 :]  # after the self-check (1 max-batch call + 4 batch-1 reference calls)
    assert sum(calls) == 16 and max(calls) >= 4, calls
    count = metric(server.url, "aim_batch_size_count")
    total = metric(server.url, "aim_batch_size_sum")
    assert total / count >= 2.0  # mean batch size from the histogram
    assert max(int(r.headers["x-batch-size"]) for r in responses) >= 4


def test_overload_is_refused_quickly_with_retry_after(live: list) -> None:
    backend = FakeBackend()
    server = serve(Settings(max_wait_ms=1, max_batch_size=2, max_queue=4, max_images_per_request=2), backend=backend)
    live.append(server)
    backend.delay_s = 0.2  # slow "compute" from now on (the boot self-check ran at full speed)
    responses = asyncio.run(fire(server.url, 24))
    codes = [r.status_code for r in responses]
    rejected = [r for r in responses if r.status_code == 429]
    assert codes.count(200) >= 4 and len(rejected) >= 8, codes
    for r in rejected:
        assert r.json()["error"]["code"] == "overloaded" and int(r.headers["retry-after"]) >= 1
        assert "x-decode-ms" not in r.headers  # refused before any decoding
    # Well before one compute (200 ms) ends. Client and server share one process and its GIL here, which inflates
    # this; benchmarks/serve.py measures rejection latency with the server in its own process.
    assert float(np.median([float(r.headers["x-total-ms"]) for r in rejected])) < 150
    assert metric(server.url, "aim_failures_total", endpoint="/embed", reason="overloaded") == len(rejected)


def test_deadlines_give_504_and_expired_work_is_dropped(live: list) -> None:
    backend = FakeBackend()
    server = serve(Settings(max_wait_ms=0, max_batch_size=1), backend=backend)
    live.append(server)
    backend.delay_s = 0.4

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            busy = asyncio.create_task(client.post("/embed", files=[("files", ("a.png", PHOTO))]))
            await asyncio.sleep(0.1)  # the first image is computing for 0.4 s
            late = await client.post(
                "/embed", files=[("files", ("b.png", PHOTO))], headers={"x-request-timeout": "0.1"}
            )
            return await busy, late

    before = len(backend.calls)
    ok, late = asyncio.run(scenario())
    time.sleep(0.1)
    assert ok.status_code == 200
    assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded"
    assert "queue" in late.json()["error"]["message"]
    assert len(backend.calls) - before == 1  # the expired request never reached the backend
    # Its own reason: the deadline dropped it, not a client that went away.
    assert metric(server.url, "aim_dropped_images_total", reason="deadline") >= 1
    assert metric(server.url, "aim_dropped_images_total", reason="cancelled") == 0


def test_a_bad_image_in_a_batch_fails_alone(live: list) -> None:
    backend = FakeBackend(delay_s=0.01, poison=lambda p: float(p.mean()) > 2.0)  # white normalises to ~2.2
    server = serve(Settings(max_wait_ms=30, max_batch_size=8), backend=backend)
    live.append(server)

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return await asyncio.gather(
                *(client.post("/embed", files=[("files", ("x.png", WHITE if i == 3 else PHOTO))]) for i in range(8))
            )

    responses = asyncio.run(scenario())
    codes = [r.status_code for r in responses]
    assert codes == [200, 200, 200, 500, 200, 200, 200, 200], codes
    assert responses[3].json()["error"]["code"] == "inference_failed"
    assert metric(server.url, "aim_batch_bisections_total") >= 1
    assert max(backend.calls[5:]) > 1  # they really shared a batch
    vectors = np.array([r.json()["embeddings"][0] for i, r in enumerate(responses) if i != 3])
    assert np.allclose(vectors, vectors[0])


def test_disconnected_client_is_dropped_before_compute(live: list) -> None:
    backend = FakeBackend()
    server = serve(Settings(max_wait_ms=0, max_batch_size=1), backend=backend)
    live.append(server)
    backend.delay_s = 0.5

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            busy = asyncio.create_task(client.post("/embed", files=[("files", ("a.png", PHOTO))]))
            await asyncio.sleep(0.1)
            # A raw HTTP request, then the client hangs up while its image waits behind the busy batch.
            body = b'{"images": ["' + __import__("base64").b64encode(PHOTO) + b'"]}'
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(
                b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            await asyncio.sleep(0.1)
            sock.close()
            return await busy

    before = len(backend.calls)
    assert asyncio.run(scenario()).status_code == 200
    time.sleep(0.3)
    assert len(backend.calls) - before == 1
    assert metric(server.url, "aim_dropped_images_total", reason="cancelled") == 1
    assert metric(server.url, "aim_failures_total", endpoint="/embed", reason="client_closed_request") == 1
