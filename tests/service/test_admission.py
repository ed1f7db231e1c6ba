"""Admission before the body, through a real uvicorn on loopback: a request is refused from its headers alone when
the body bytes in flight or the expected queue wait are over budget, and the budgets come back when requests end.

The refusals are checked on raw sockets that send only the request head: the answer arrives although the body was
never sent, which proves that nothing of it was read.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest

from service.backends.fake_backend import FakeBackend
from service.settings import Settings
from tests.conftest import encode, make_photo
from tests.service.conftest import serve
from tests.service.test_load import fire, metric

PHOTO = encode(make_photo(64, 48), "PNG")


def head_only(port: int, path: str, length: int | None, *, chunked: bool = False) -> socket.socket:
    """Open a connection and send a POST head announcing `length` body bytes (or chunked), and no body."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}"
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{framing}\r\n\r\n".encode())
    return sock


def read_response(sock: socket.socket, timeout_s: float = 5.0) -> tuple[int, dict[str, str], dict]:
    sock.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, json.loads(body or b"{}")


def test_body_budget_refuses_before_reading_and_comes_back(live: list) -> None:
    budget = 3 << 20
    server = serve(
        Settings(max_body_bytes=2 << 20, max_inflight_body_bytes=budget, max_wait_ms=0), backend=FakeBackend()
    )
    live.append(server)
    port = server.port
    # 1.5 MiB announced, body withheld: it holds its bytes against the budget while it "uploads".
    slow = head_only(port, "/embed", 3 << 19)
    time.sleep(0.2)
    assert metric(server.url, "aim_body_bytes_in_flight") == 3 << 19
    # 2 MiB more would exceed 3 MiB: refused from the head alone, the body never sent.
    refused = head_only(port, "/embed", 2 << 20)
    t0 = time.perf_counter()
    status, headers, body = read_response(refused)
    assert time.perf_counter() - t0 < 1.0
    assert status == 429 and body["error"]["code"] == "overloaded", body
    assert "bytes in flight" in body["error"]["message"] and int(headers["retry-after"]) >= 1
    # A small request still fits beside the slow one.
    with server.client() as client:
        assert client.post("/embed", files=[("files", ("a.png", PHOTO))]).status_code == 200
    slow.close()  # the upload is abandoned: its bytes come back
    deadline = time.monotonic() + 5
    while metric(server.url, "aim_body_bytes_in_flight") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server.url, "aim_body_bytes_in_flight") == 0
    retry = head_only(port, "/embed", 2 << 20)  # the same size now passes admission (then fails on its body)
    retry.sendall(b"{" + b" " * ((2 << 20) - 2) + b"}")
    status, _, body = read_response(retry)
    assert status == 422, body
    assert metric(server.url, "aim_failures_total", endpoint="/embed", reason="overloaded") >= 1


def test_chunked_body_is_counted_as_it_streams(live: list) -> None:
    server = serve(
        Settings(max_body_bytes=4 << 20, max_inflight_body_bytes=1 << 20, max_wait_ms=0), backend=FakeBackend()
    )
    live.append(server)
    holder = head_only(server.port, "/embed", 900_000)  # holds 900 kB
    time.sleep(0.1)
    chunked = head_only(server.port, "/embed", None, chunked=True)  # admitted with nothing declared
    piece = b" " * 200_000
    chunked.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
    status, _, body = read_response(chunked)
    assert status == 429 and "bytes in flight" in body["error"]["message"], body
    holder.close()


def test_expected_wait_refuses_in_milliseconds_and_bounds_the_wait(live: list) -> None:
    backend = FakeBackend()
    server = serve(Settings(max_wait_ms=1, max_batch_size=2, max_queue=256, max_queue_wait_s=1.0), backend=backend)
    live.append(server)
    backend.delay_s = 1.0  # 0.5 s per image at batch 2: 1 s of expected wait is about 2 images

    def probe() -> float:
        sock = head_only(server.port, "/embed", 10_000)
        t0 = time.perf_counter()
        status, headers, body = read_response(sock)
        sock.close()
        assert status == 429 and "expected queue wait" in body["error"]["message"], body
        assert 1 <= int(headers["retry-after"]) <= 60
        return (time.perf_counter() - t0) * 1000

    async def burst() -> tuple[list[httpx.Response], list[float]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            await client.post("/embed", files=[("files", ("a.png", PHOTO))])  # measures the rate
            tasks = [asyncio.create_task(client.post("/embed", files=[("files", ("a.png", PHOTO))])) for _ in range(20)]
            await asyncio.sleep(0.3)
            rejected_ms = [await asyncio.to_thread(probe) for _ in range(5)]
            return list(await asyncio.gather(*tasks)), rejected_ms

    responses, rejected_ms = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429} and codes.count(429) >= 10, codes
    assert max(rejected_ms) < 500, rejected_ms
    # What was accepted waited about max_queue_wait_s at most, plus a batch, not the 10 s that 20 images at 0.5 s
    # each would have queued for.
    waits = [float(r.headers["x-queue-ms"]) for r in responses if r.status_code == 200]
    assert max(waits) < 2500, waits


@pytest.mark.parametrize("path", ["/search", "/index/items", "/v1/embeddings", "/v2/models/x/infer", "/analyze"])
def test_every_guarded_route_is_refused_before_its_body(live: list, path: str) -> None:
    server = serve(Settings(max_inflight_body_bytes=1 << 20, max_body_bytes=1 << 20), backend=FakeBackend())
    live.append(server)
    holder = head_only(server.port, "/embed", 1 << 20)
    time.sleep(0.1)
    status, _, body = read_response(head_only(server.port, path, 1000))
    assert status == 429, (path, body)
    holder.close()
    asyncio.run(fire(server.url, 1))  # the server is unharmed
