"""Admission before the body: decided in the middleware from the request line and headers alone.

An overloaded server must say no in microseconds and spend nothing on work it cannot take, so every request that
would reach the model (or hold a large body) is judged before one byte of its body is read:

1. not serving (loading, failed, draining past its grace) -> 503 with Retry-After;
2. expected wait: the images already admitted (decoding or queued) plus the requests whose bodies are still
   arriving (each counts as one image), times the measured seconds per image (the slower of compute per image and
   decode per image / decode threads), above `max_queue_wait_s` -> 429. The queue is thus bounded in time, not only
   in images (`max_queue` still caps it), so what is accepted waits about `max_queue_wait_s` at most;
3. body bytes in flight: the declared Content-Length of every guarded request being received or handled is held
   against `max_inflight_body_bytes` until its response is sent; a request that would exceed it -> 429 (a chunked
   body is counted as it streams and refused when it crosses the budget). Sixteen 29 MiB bodies can no longer
   take a gigabyte between them.
Routes still call `engine.admission_precheck()`; that is the same check for code paths that bypass the middleware.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service.errors import OverloadedError

if TYPE_CHECKING:
    from service.engine import Engine

__all__ = ["INFERENCE_PATHS", "Admission", "Ticket", "guarded", "is_inference_path"]

# Routes that run the model (also the API-key policy's "inference" scope), plus KServe's /v2/models/{name}/infer.
INFERENCE_PATHS = frozenset({"/embed", "/classify", "/search", "/v1/embeddings", "/analyze"})


def is_inference_path(path: str) -> bool:
    """`path` with any trailing slash removed."""
    return path in INFERENCE_PATHS or (path.startswith("/v2/models/") and path.endswith("/infer"))


def guarded(method: str, path: str) -> bool:
    """POSTs whose body reaches the model or the index; everything else (health, info, metrics, GET/DELETE of an
    item) passes untouched."""
    if method != "POST":
        return False
    path = path.rstrip("/") or "/"
    return is_inference_path(path) or path == "/index/items"


@dataclass
class Ticket:
    """One admitted request's share of the budgets; released once, when its response has been sent."""

    admission: Admission
    reserved: int  # body bytes held against the budget
    receiving: bool = True  # counted in the expected wait until its body has arrived
    streamed: int = 0
    released: bool = field(default=False, repr=False)

    def body_chunk(self, n: int, more: bool) -> None:
        """Account n more received bytes; raises OverloadedError when a body without Content-Length outgrows the
        budget."""
        self.streamed += n
        if self.streamed > self.reserved:
            extra = self.streamed - self.reserved
            self.admission.take_bytes(extra, streaming=True)
            self.reserved += extra
        if not more:
            self.body_done()

    def body_done(self) -> None:
        if self.receiving:
            self.receiving = False
            self.admission.receiving -= 1

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.body_done()
            self.admission.bytes_in_flight -= self.reserved
            self.admission.engine.metrics.body_bytes_in_flight.set(self.admission.bytes_in_flight)


class Admission:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.max_wait_s = engine.settings.max_queue_wait_s
        self.budget = engine.settings.max_inflight_body_bytes
        self.bytes_in_flight = 0
        self.receiving = 0  # guarded requests whose body is still arriving

    def per_image_s(self) -> float:
        """Measured seconds per image through the slower stage (0 until the first batch has run)."""
        batcher, decoder = self.engine.batcher, self.engine.decoder
        compute = batcher.per_image_s if batcher is not None else 0.0
        decode = decoder.per_image_s / decoder.workers if decoder is not None else 0.0
        return max(compute, decode)

    def expected_wait_s(self) -> float:
        batcher = self.engine.batcher
        backlog = (batcher.admitted if batcher is not None else 0) + self.receiving
        return backlog * self.per_image_s()

    def retry_after_s(self) -> int:
        return max(1, min(60, math.ceil(self.expected_wait_s())))

    def take_bytes(self, n: int, *, streaming: bool = False) -> None:
        if self.bytes_in_flight + n > self.budget and (self.bytes_in_flight or streaming):
            # The first request always fits (a body within max_body_bytes must be servable on an idle server).
            raise OverloadedError(
                f"too many request bytes in flight ({self.bytes_in_flight} + {n} > {self.budget}); retry later",
                retry_after_s=1,
            )
        self.bytes_in_flight += n
        self.engine.metrics.body_bytes_in_flight.set(self.bytes_in_flight)

    def enter(self, method: str, path: str, content_length: int | None) -> Ticket | None:
        """Admit or raise (NotReadyError 503, OverloadedError 429) before the body is read. None: not guarded."""
        if not guarded(method, path):
            return None
        batcher = self.engine.check_serving()
        batcher.check_room()
        if self.max_wait_s > 0:
            wait = self.expected_wait_s()
            if wait > self.max_wait_s:
                raise OverloadedError(
                    f"expected queue wait {wait:.2f}s exceeds the {self.max_wait_s:g}s limit "
                    f"({batcher.admitted} images admitted, {self.receiving} bodies arriving); retry later",
                    retry_after_s=self.retry_after_s(),
                )
        reserved = content_length or 0
        self.take_bytes(reserved)
        self.receiving += 1
        return Ticket(self, reserved)
