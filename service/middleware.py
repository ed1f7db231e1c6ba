"""One pure-ASGI middleware around every request: API keys, the body-size cap, the in-flight gauge, request
counters and the per-stage timing headers.

Pure ASGI (no BaseHTTPMiddleware) so `receive` stays the server's own: routes can watch it for the client's
disconnect, and the body is counted as it streams in.

Timing headers, in milliseconds: `x-decode-ms`, `x-queue-ms`, `x-compute-ms` (set by the route through
`scope["state"]["timings"]`), `x-total-ms` (first byte of the request handled to response start), `x-batch-size`,
and the same as `Server-Timing` (decode;dur=..., queue;dur=..., compute;dur=..., total;dur=...). Server overhead
is total - decode - queue - compute.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Callable, Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.admission import INFERENCE_PATHS, Admission, is_inference_path
from service.errors import BodyTooLargeError, ServiceError, dialect_error
from service.metrics import ServiceMetrics

__all__ = ["ApiKeyPolicy", "ServiceMiddleware"]

# The /ui page and its script hold no data (the page asks for the key itself and sends it with each search).
PUBLIC_PATHS = frozenset(
    {"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/ui", "/ui/app.js", "/ui/app.css"}
)
MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
STAGES = ("decode", "queue", "compute")


class ApiKeyPolicy:
    """Which routes need a key. Default-deny: every state-changing method on any path not listed as inference
    (the index routes, and any route added later) needs one as soon as keys are configured."""

    def __init__(self, keys: Iterable[str], scope: str = "mutating") -> None:
        self._keys = [k.encode() for k in keys if k]
        self.scope = scope

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def required(self, method: str, path: str) -> bool:
        if not self._keys:
            return False
        path = path.rstrip("/") or "/"
        if path in PUBLIC_PATHS:
            return False
        if self.scope == "all":
            return True
        if is_inference_path(path):
            return self.scope == "inference"
        return method.upper() in MUTATING_METHODS

    def accepts(self, headers: dict[bytes, bytes]) -> bool:
        auth = headers.get(b"authorization", b"")
        given = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"").strip()
        # Compare against every key (no early exit), in constant time per key.
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(given, key)
        return ok and bool(given)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


class ServiceMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: ServiceMetrics,
        policy: ApiKeyPolicy,
        max_body_bytes: int,
        admission: Admission | None = None,
        draining: Callable[[], bool] | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.policy = policy
        self.max_body_bytes = max_body_bytes
        self.admission = admission
        self.draining = draining

    async def _refuse(
        self, send: Send, path: str, endpoint: str, status: int, code: str, message: str, extra: list[Any] = ()
    ) -> None:
        """Answer an error before the app runs, counted like the app's own answers."""
        self.metrics.record_failure(endpoint, code)
        self.metrics.requests.labels(endpoint, str(status)).inc()
        await self._send_error(send, path, status, code, message, extra)

    async def _send_error(
        self, send: Send, path: str, status: int, code: str, message: str, extra: list[Any] = ()
    ) -> None:
        status, payload = dialect_error(path, status, code, message)
        body = json.dumps(payload).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        timings: dict[str, float] = {}
        scope.setdefault("state", {})["timings"] = timings
        headers = dict(scope.get("headers") or [])
        method, path = scope["method"], scope["path"]
        known = path.rstrip("/") or "/"
        endpoint = known if known in INFERENCE_PATHS | PUBLIC_PATHS | {"/info", "/metrics"} else "other"
        status_box = {"status": 500}

        if self.policy.required(method, path) and not self.policy.accepts(headers):
            await self._refuse(
                send,
                path,
                endpoint,
                401,
                "unauthorized",
                "this route needs an API key: Authorization: Bearer <key> or X-API-Key",
                [(b"www-authenticate", b'Bearer realm="aim"')],
            )
            return
        raw_length = headers.get(b"content-length")
        declared = int(raw_length) if raw_length is not None and raw_length.isdigit() else None
        if declared is not None and declared > self.max_body_bytes:
            await self._refuse(
                send,
                path,
                endpoint,
                413,
                "body_too_large",
                f"body of {declared} bytes exceeds the {self.max_body_bytes}-byte limit",
            )
            return

        ticket = None
        if self.admission is not None:
            try:  # before one byte of the body is read: not ready, expected wait, body bytes in flight
                ticket = self.admission.enter(method, path, declared)
            except ServiceError as exc:
                extra = [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
                extra.append((b"x-total-ms", _ms(time.perf_counter() - start).encode()))
                await self._refuse(send, path, endpoint, exc.http_status, exc.code, exc.message, extra)
                return

        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                chunk = len(message.get("body", b""))
                received += chunk
                if received > self.max_body_bytes:
                    raise BodyTooLargeError(f"body exceeds the {self.max_body_bytes}-byte limit")
                if ticket is not None:
                    ticket.body_chunk(chunk, bool(message.get("more_body")))
            elif ticket is not None:  # http.disconnect: nothing more will arrive
                ticket.body_done()
            return message

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_box["status"] = message["status"]
                total = time.perf_counter() - start
                extra = [(f"x-{s}-ms".encode(), _ms(timings[s]).encode()) for s in STAGES if s in timings]
                extra.append((b"x-total-ms", _ms(total).encode()))
                if "batch_size" in timings:
                    extra.append((b"x-batch-size", str(int(timings["batch_size"])).encode()))
                parts = [f"{s};dur={_ms(timings[s])}" for s in STAGES if s in timings] + [f"total;dur={_ms(total)}"]
                extra.append((b"server-timing", ", ".join(parts).encode()))
                if self.draining is not None and self.draining():
                    # Draining: no connection is reused after its answer, so when the listener closes no idle
                    # keep-alive connection is left for a client to send a request the server would never read.
                    extra.append((b"connection", b"close"))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        gauge = self.metrics.in_flight.labels(endpoint)
        gauge.inc()
        try:
            await self.app(scope, counting_receive, timed_send)
        finally:
            if ticket is not None:
                ticket.release()
            gauge.dec()
            route = scope.get("route")
            label = getattr(route, "path", endpoint) if route is not None else endpoint
            self.metrics.requests.labels(label, str(status_box["status"])).inc()
            self.metrics.request_seconds.labels(label).observe(time.perf_counter() - start)
