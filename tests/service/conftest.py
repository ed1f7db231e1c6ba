"""Service fixtures: a real uvicorn on a loopback port (in a thread), the aim-debug checkpoint, real image bytes."""

from __future__ import annotations

import socket
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from service.backends.base import InferenceBackend
from service.main import create_app
from service.settings import Settings

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "images"


@pytest.fixture(autouse=True, scope="session")
def _fp32_by_default() -> Iterator[None]:
    """Most tests compare served outputs with aimcore's fp32 offline outputs, so they serve fp32; the service's own
    default (precision auto: bf16 on CPUs with native bf16) is tested in test_precision.py. Subprocess servers
    inherit the variable. Session scope, so module-scoped servers are created under it too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIM_PRECISION", "fp32")
        yield


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 in a background thread; the socket is bound before start (no races)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def engine(self) -> Any:
        return self.app.state.engine

    def start(self, *, ready: bool = True, timeout_s: float = 60.0) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while time.monotonic() < deadline:
                try:
                    status = client.get("/readyz").status_code
                    if not ready or status == 200 or self.engine.status == "failed":
                        return self
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"server not ready after {timeout_s}s: {self.engine.status} {self.engine.reason}")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    def __enter__(self) -> LiveServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 30), **kwargs)


def serve(settings: Settings | None = None, backend: InferenceBackend | None = None, **kw: Any) -> LiveServer:
    return LiveServer(create_app(settings or Settings(), backend=backend, **kw)).start()


@pytest.fixture
def live() -> Iterator[list[LiveServer]]:
    """Servers started in a test and stopped after it: `live.append(serve(...))`."""
    servers: list[LiveServer] = []
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def asset_bytes() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(ASSETS.iterdir())}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")


@pytest.fixture(scope="session")
def png_bomb(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A valid ~430 KiB PNG of 12,500 x 12,000 RGB black pixels (150 MP, 450 MB decoded), built row by row."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    width, height = 12_500, 12_000
    comp = zlib.compressobj(9)
    row = b"\x00" + bytes(width * 3)  # filter byte + pixels
    idat = bytearray()
    for _ in range(height // 500):
        idat += comp.compress(row * 500)
    idat += comp.flush()
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    data = (
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", bytes(idat)) + _png_chunk(b"IEND", b"")
    )
    path.write_bytes(data)
    return data
