"""SIGTERM under load loses no request: every request the server accepted gets a response, and one that arrives
after the listener closed gets a connection refusal, never a close or reset after it was sent.

Each round starts a real `service.server` process (fake backend, real uvicorn), keeps 12 keep-alive clients
posting images back to back, sends SIGTERM, and classifies every request by what the client saw. Raw sockets,
so nothing retries behind the test's back.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.conftest import encode, make_photo
from tests.service.test_drain import free_port

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = int(os.environ.get("AIM_DRAIN_ROUNDS", "5"))

SCRIPT = textwrap.dedent(
    """
    import logging, sys
    from service.backends.fake_backend import FakeBackend
    from service.main import create_app
    from service.server import build_server
    from service.settings import Settings

    logging.basicConfig(level="WARNING")
    settings = Settings(port=int(sys.argv[1]), drain_grace_s=0.5, max_wait_ms=2, max_batch_size=8,
                        golden_check=False, max_queue_wait_s=0)
    server = build_server(settings, create_app(settings, backend=FakeBackend(delay_s=0.02)))
    server.run()
    sys.exit(server.exit_code)
    """
)


def _request(port: int, body: bytes) -> bytes:
    boundary = "drainboundary"
    payload = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + body
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /embed HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; boundary={boundary}"
        f"\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode()
    return head + payload


async def _client(port: int, request: bytes, stop: asyncio.Event, outcomes: Counter) -> None:
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    while not stop.is_set():
        if conn is None:
            try:
                conn = await asyncio.open_connection("127.0.0.1", port)
            except ConnectionRefusedError:
                outcomes["refused"] += 1  # the listener is closed: the right answer after the drain
                return
        reader, writer = conn
        try:
            writer.write(request)
            await writer.drain()
            line = await reader.readline()
            if not line:
                raise ConnectionResetError("closed before a response")
            status = int(line.split()[1])
            close = False
            length = 0
            while (header := await reader.readline()) not in (b"\r\n", b""):
                key, _, value = header.decode().partition(":")
                if key.lower() == "content-length":
                    length = int(value)
                elif key.lower() == "connection" and value.strip().lower() == "close":
                    close = True
            await reader.readexactly(length)
            outcomes[status] += 1
            if close:
                writer.close()
                conn = None
        except (ConnectionError, asyncio.IncompleteReadError):
            outcomes["dropped"] += 1  # sent, and no response: what must never happen
            writer.close()
            conn = None


def _one_round(body: bytes) -> Counter:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(port)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "server did not start"
            time.sleep(0.05)

        async def scenario() -> Counter:
            outcomes: Counter = Counter()
            stop = asyncio.Event()
            request = _request(port, body)
            tasks = [asyncio.create_task(_client(port, request, stop, outcomes)) for _ in range(12)]
            await asyncio.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait(tasks, timeout=15)
            stop.set()
            await asyncio.gather(*tasks)
            return outcomes

        outcomes = asyncio.run(scenario())
        assert proc.wait(timeout=20) == 0
        return outcomes
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_sigterm_under_load_drops_nothing() -> None:
    # The rounds run side by side (each its own server, port and clients): startup dominates a round's time.
    body = encode(make_photo(48, 40), "PNG")
    with ThreadPoolExecutor(ROUNDS) as pool:
        rounds = list(pool.map(lambda _: _one_round(body), range(ROUNDS)))
    for outcomes in rounds:
        assert outcomes["dropped"] == 0, rounds
        assert outcomes[200] > 0 and outcomes["refused"] > 0, rounds
        assert set(outcomes) <= {200, 503, "refused"}, rounds
