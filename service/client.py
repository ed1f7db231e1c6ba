"""A small Python client for the service, with retries on 429 and 503 (honouring Retry-After).

    with AimClient("http://127.0.0.1:8000") as client:
        vectors = client.embed(["cat.jpg", open("dog.png", "rb").read()])["embeddings"]
        top = client.classify(["cat.jpg"], top_k=3)["predictions"][0]

Images are paths or raw bytes; they travel as multipart `files`. Errors raise ServiceClientError with the
server's stable error code.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import httpx

__all__ = ["AimClient", "ServiceClientError"]

logger = logging.getLogger(__name__)

RETRY_STATUSES = (429, 503)


class ServiceClientError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


ImageInput = str | os.PathLike[str] | bytes


class AimClient:
    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 4,
        max_backoff_s: float = 10.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url, timeout=timeout, headers=headers)
        self.retries = retries
        self.max_backoff_s = max_backoff_s

    def __enter__(self) -> AimClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    @staticmethod
    def _files(images: list[ImageInput]) -> list[tuple[str, tuple[str, bytes]]]:
        files = []
        for i, image in enumerate(images):
            if isinstance(image, bytes):
                files.append(("files", (f"image{i}", image)))
            else:
                path = Path(image)
                files.append(("files", (path.name, path.read_bytes())))
        return files

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send, retrying 429/503 and connection errors with Retry-After or exponential backoff."""
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if attempt >= self.retries:
                    raise ServiceClientError(0, "unreachable", str(exc)) from exc
                wait = min(self.max_backoff_s, 0.25 * 2**attempt)
            else:
                if response.status_code not in RETRY_STATUSES or attempt >= self.retries:
                    return response
                header = response.headers.get("retry-after", "")
                wait = float(header) if header.isdigit() else 0.25 * 2**attempt
                wait = min(self.max_backoff_s, wait)
            attempt += 1
            logger.info("%s %s: retry %d in %.2fs", method, path, attempt, wait)
            time.sleep(wait)

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code >= 400:
            err = body.get("error", {}) if isinstance(body, dict) else {}
            raise ServiceClientError(
                response.status_code, err.get("code", "http_error"), err.get("message", response.text[:200])
            )
        return body

    def embed(self, images: list[ImageInput], *, pooling: str = "mean", normalize: bool = True) -> dict[str, Any]:
        data = {"pooling": pooling, "normalize": str(normalize).lower()}
        return self._json(self._request("POST", "/embed", files=self._files(images), data=data))

    def classify(self, images: list[ImageInput], *, top_k: int = 5) -> dict[str, Any]:
        return self._json(self._request("POST", "/classify", files=self._files(images), data={"top_k": str(top_k)}))

    def info(self) -> dict[str, Any]:
        return self._json(self._request("GET", "/info"))

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                raise ServiceClientError(503, "not_ready", f"not ready after {timeout_s:.0f}s")
            time.sleep(0.1)
