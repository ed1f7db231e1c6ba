"""Python clients for every route of the service, sync and async, with retries on 429 and 503.

    with AimClient("http://127.0.0.1:8000") as client:
        vectors = client.embed(["cat.jpg", open("dog.png", "rb").read()])["embeddings"]
        top = client.classify(["cat.jpg"], top_k=3)["predictions"][0]
        client.add_items(["cat"], ["cat.jpg"], metadata=[{"kind": "pet"}])
        hits = client.search(["query.jpg"], k=5)["results"][0]

    async with AsyncAimClient("http://127.0.0.1:8000") as client:
        vectors = (await client.embed(["cat.jpg"]))["embeddings"]

Images are paths or raw bytes. Paths travel as multipart `files` streamed from the open file (64 KiB chunks, length
from the file's size; never read into memory by the client, and rewound when a request is retried). 429 and 503
are retried honouring Retry-After (seconds or an HTTP date), each wait capped at `max_backoff_s`, at most `retries`
times; a refused connection is retried the same way. Errors raise ServiceClientError with the server's stable
`code`; a missing image file raises ImageFileError before anything is sent.

Only httpx is needed beyond the standard library (it is in the `serve` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

__all__ = ["AimClient", "AsyncAimClient", "ImageFileError", "ServiceClientError"]

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 503})
ImageInput = str | os.PathLike[str] | bytes
R = TypeVar("R")


class ServiceClientError(Exception):
    """An answer >= 400 (or no answer): `status` (0: unreachable), the server's stable `code`, its `message`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}" if status else f"{code}: {message}")
        self.status, self.code, self.message = status, code, message


class ImageFileError(ValueError):
    """An image path that is not a readable file (raised before any request is sent)."""


def _check_paths(images: Sequence[ImageInput]) -> None:
    for image in images:
        if not isinstance(image, bytes | bytearray | memoryview):
            path = Path(image)
            if not path.is_file():
                why = "is a directory" if path.is_dir() else "does not exist"
                raise ImageFileError(f"image file {str(path)!r} {why}")


@contextlib.contextmanager
def _open_files(images: Sequence[ImageInput]) -> Iterator[list[tuple[str, tuple[str, Any]]]]:
    """Multipart `files` parts; paths stay open file objects so httpx streams them."""
    _check_paths(images)
    with contextlib.ExitStack() as stack:
        parts: list[tuple[str, tuple[str, Any]]] = []
        for i, image in enumerate(images):
            if isinstance(image, bytes | bytearray | memoryview):
                parts.append(("files", (f"image{i}", bytes(image))))
            else:
                path = Path(image)
                parts.append(("files", (path.name, stack.enter_context(path.open("rb")))))
        yield parts


def retry_after_s(header: str | None, attempt: int, max_backoff_s: float) -> float:
    """Seconds to wait before retry `attempt` (0-based): the server's Retry-After (delta seconds or HTTP date),
    else exponential backoff from 0.25 s with jitter; never more than max_backoff_s."""
    wait: float | None = None
    if header:
        header = header.strip()
        if header.isdigit():
            wait = float(header)
        else:
            with contextlib.suppress(TypeError, ValueError):
                when = email.utils.parsedate_to_datetime(header)
                wait = max(0.0, (when - datetime.now(UTC)).total_seconds())
    if wait is None:
        wait = 0.25 * 2**attempt * random.uniform(0.5, 1.0)
    return min(max_backoff_s, wait)


def _parse(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code >= 400:
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):  # the project's and OpenAI's shape
            code, message = str(err.get("code") or "http_error"), str(err.get("message") or "")
        elif isinstance(err, str):  # KServe v2's
            code, message = str(body.get("code") or "http_error"), err
        else:
            code, message = "http_error", response.text[:200]
        raise ServiceClientError(response.status_code, code, message)
    return body


def _form(**fields: Any) -> dict[str, str]:
    """Multipart form fields: structures as JSON text, booleans lower-case, None left out."""
    out = {}
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, bool):
            out[key] = str(value).lower()
        elif isinstance(value, dict | list):
            out[key] = json.dumps(value)
        else:
            out[key] = str(value)
    return out


class _Routes(Generic[R]):
    """Every route once; `_call` returns the answer (sync client) or an awaitable of it (async client)."""

    def _call(
        self,
        method: str,
        path: str,
        *,
        images: Sequence[ImageInput] | None = None,
        data: dict[str, str] | None = None,
        json_body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
    ) -> R:
        raise NotImplementedError

    # ----- inference -----
    def embed(self, images: Sequence[ImageInput], *, pooling: str = "mean", normalize: bool = True) -> R:
        """{"embeddings": [[...]], "dim", "count", "recipe"}: one vector per image."""
        return self._call("POST", "/embed", images=images, data=_form(pooling=pooling, normalize=normalize))

    def classify(self, images: Sequence[ImageInput], *, top_k: int = 5) -> R:
        """{"predictions": [{"labels", "indices", "probs"}], "model_id", "model_sha256"}."""
        return self._call("POST", "/classify", images=images, data=_form(top_k=top_k))

    # ----- retrieval -----
    def search(
        self,
        images: Sequence[ImageInput] | None = None,
        *,
        vectors: Sequence[Sequence[float]] | None = None,
        recipe: str | dict[str, Any] | None = None,
        id: str | None = None,
        k: int = 10,
        where: dict[str, Any] | None = None,
        score_threshold: float | None = None,
        include_self: bool = False,
    ) -> R:
        """Nearest neighbours of images, of `vectors` (with their `recipe`), or of the stored item `id`."""
        given = [name for name, v in (("images", images), ("vectors", vectors), ("id", id)) if v is not None]
        if len(given) != 1:
            raise ValueError(f"search needs exactly one of images, vectors or id; got {given or 'none'}")
        knobs = {"k": k, "where": where, "score_threshold": score_threshold}
        if images is not None:
            return self._call("POST", "/search", images=images, data=_form(**knobs))
        body: dict[str, Any] = {key: v for key, v in knobs.items() if v is not None}
        if vectors is not None:
            body |= {"vectors": [list(map(float, v)) for v in vectors], "recipe": recipe}
        else:
            body |= {"id": id, "include_self": include_self}
        return self._call("POST", "/search", json_body=body)

    def add_items(
        self,
        ids: Sequence[str],
        images: Sequence[ImageInput] | None = None,
        *,
        vectors: Sequence[Sequence[float]] | None = None,
        recipe: str | dict[str, Any] | None = None,
        metadata: Sequence[dict[str, Any] | None] | None = None,
    ) -> R:
        """Add or replace items (durable once answered): images, or vectors with the recipe that made them."""
        if (images is None) == (vectors is None):
            raise ValueError("add_items needs exactly one of images or vectors")
        meta = list(metadata) if metadata is not None else None
        if images is not None:
            return self._call("POST", "/index/items", images=images, data=_form(ids=list(ids), metadata=meta))
        body = {"ids": list(ids), "vectors": [list(map(float, v)) for v in vectors or []], "recipe": recipe}
        if meta is not None:
            body["metadata"] = meta
        return self._call("POST", "/index/items", json_body=body)

    def get_item(self, item_id: str, *, vector: bool = False) -> R:
        return self._call("GET", f"/index/items/{quote(item_id, safe='')}", params={"vector": str(vector).lower()})

    def delete_item(self, item_id: str) -> R:
        return self._call("DELETE", f"/index/items/{quote(item_id, safe='')}")

    def index_info(self) -> R:
        return self._call("GET", "/index")

    def snapshot(self) -> R:
        return self._call("POST", "/index/snapshot")

    # ----- operations -----
    def info(self) -> R:
        return self._call("GET", "/info")


class _Settings:
    def __init__(self, url: str, api_key: str | None, timeout: float, retries: int, max_backoff_s: float) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.retries = retries
        self.max_backoff_s = max_backoff_s

    def wait_for(self, attempt: int, outcome: httpx.Response | httpx.TransportError, label: str) -> float | None:
        """Seconds before the next try, or None when `outcome` is final."""
        if attempt >= self.retries:
            return None
        if isinstance(outcome, httpx.Response):
            if outcome.status_code not in RETRY_STATUSES:
                return None
            wait = retry_after_s(outcome.headers.get("retry-after"), attempt, self.max_backoff_s)
        elif isinstance(outcome, httpx.ConnectError | httpx.ConnectTimeout):  # nothing reached the server
            wait = retry_after_s(None, attempt, self.max_backoff_s)
        else:
            return None
        logger.info("%s: retry %d in %.2fs", label, attempt + 1, wait)
        return wait


def _unreachable(exc: httpx.TransportError) -> ServiceClientError:
    code = "timeout" if isinstance(exc, httpx.TimeoutException) else "unreachable"
    return ServiceClientError(0, code, f"{type(exc).__name__}: {exc}")


class AimClient(_Routes[Any]):
    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 4,
        max_backoff_s: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._s = _Settings(url, api_key, timeout, retries, max_backoff_s)
        self._http = httpx.Client(base_url=url, timeout=timeout, headers=self._s.headers, transport=transport)
        self.sleep: Callable[[float], None] = time.sleep

    def __enter__(self) -> AimClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(
        self,
        method: str,
        path: str,
        *,
        images: Sequence[ImageInput] | None = None,
        data: dict[str, str] | None = None,
        json_body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
    ) -> Any:
        with _open_files(images or []) as files:
            attempt = 0
            while True:
                try:
                    outcome: httpx.Response | httpx.TransportError = self._http.request(
                        method, path, files=files or None, data=data, json=json_body, params=params
                    )
                except httpx.TransportError as exc:
                    outcome = exc
                wait = self._s.wait_for(attempt, outcome, f"{method} {path}")
                if wait is None:
                    if isinstance(outcome, httpx.TransportError):
                        raise _unreachable(outcome) from outcome
                    return _parse(outcome)
                attempt += 1
                self.sleep(wait)

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


class AsyncAimClient(_Routes[Awaitable[Any]]):
    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 4,
        max_backoff_s: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._s = _Settings(url, api_key, timeout, retries, max_backoff_s)
        self._http = httpx.AsyncClient(base_url=url, timeout=timeout, headers=self._s.headers, transport=transport)
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    async def __aenter__(self) -> AsyncAimClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def _call(self, method: str, path: str, **kwargs: Any) -> Awaitable[Any]:
        return self._send(method, path, **kwargs)

    async def _send(
        self,
        method: str,
        path: str,
        *,
        images: Sequence[ImageInput] | None = None,
        data: dict[str, str] | None = None,
        json_body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
    ) -> Any:
        with _open_files(images or []) as files:
            attempt = 0
            while True:
                try:
                    outcome: httpx.Response | httpx.TransportError = await self._http.request(
                        method, path, files=files or None, data=data, json=json_body, params=params
                    )
                except httpx.TransportError as exc:
                    outcome = exc
                wait = self._s.wait_for(attempt, outcome, f"{method} {path}")
                if wait is None:
                    if isinstance(outcome, httpx.TransportError):
                        raise _unreachable(outcome) from outcome
                    return _parse(outcome)
                attempt += 1
                await self.sleep(wait)

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    async def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not await self.ready():
            if time.monotonic() > deadline:
                raise ServiceClientError(503, "not_ready", f"not ready after {timeout_s:.0f}s")
            await asyncio.sleep(0.1)
