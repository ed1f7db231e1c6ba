"""Graceful drain on SIGTERM, on a real `service.server` process: readiness turns 503 first, requests in flight
(and those arriving during the grace period) finish with 200, then the process exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx

from tests.conftest import encode, make_photo

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import logging, sys
    from service.backends.fake_backend import FakeBackend
    from service.main import create_app
    from service.server import build_server
    from service.settings import Settings

    logging.basicConfig(level="INFO")
    settings = Settings(port=int(sys.argv[1]), drain_grace_s=1.0, max_wait_ms=0, max_batch_size=1,
                        golden_check=False)
    server = build_server(settings, create_app(settings, backend=FakeBackend(delay_s=0.5)))
    server.run()
    sys.exit(server.exit_code)
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_then_exits_cleanly(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "server did not start"
            time.sleep(0.1)
        photo = encode(make_photo(40, 40), "PNG")

        async def scenario() -> tuple[list[httpx.Response], list[int], httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                inflight = [
                    asyncio.create_task(client.post("/embed", files=[("files", ("a.png", photo))])) for _ in range(3)
                ]
                await asyncio.sleep(0.2)
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.2)
                ready_codes = [(await client.get("/readyz")).status_code for _ in range(3)]
                during_grace = await client.post("/embed", files=[("files", ("b.png", photo))])
                return list(await asyncio.gather(*inflight)), ready_codes, during_grace

        responses, ready_codes, during_grace = asyncio.run(scenario())
        assert ready_codes == [503, 503, 503]
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert during_grace.status_code == 200
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate()[0].decode(errors="replace")
    assert "draining" in output
