"""One dynamic batcher per model, shared by every endpoint.

Flow of one request with n images:
1. `admit(n)` before decoding: n slots of a bounded budget (`max_queue` images admitted and not yet computing);
   no room -> OverloadedError (429 + Retry-After) at once, so an overloaded server refuses in microseconds and
   spends no decode time on work it cannot take.
2. `submit(pixels, outputs, deadline, reservation)` queues one item per image, each with its own future.
3. The worker (one asyncio task) takes items in arrival order and flushes a batch when it holds `max_batch_size`
   items or when the oldest has waited `max_wait_s`; items whose future is done (request cancelled, client gone,
   deadline passed) are dropped before compute and counted.
4. The batch runs in a single dedicated thread (`backend.infer` never blocks the event loop); a batch that raises
   is split in halves and retried until only the bad input fails (InferenceFailedError for it alone).
Different requests may ask for different outputs; a batch computes the union and each item gets what it asked for.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service.backends.base import InferenceBackend
from service.errors import DeadlineExceededError, InferenceFailedError, NotReadyError, OverloadedError
from service.metrics import ServiceMetrics
from service.priority import lower_thread_priority

__all__ = ["BatchResult", "DynamicBatcher", "Reservation"]

logger = logging.getLogger(__name__)

Row = dict[str, np.ndarray]  # output name -> this image's row, e.g. {"embedding": (D,)}


@dataclass(eq=False)
class _Item:
    pixels: np.ndarray  # (C, S, S) float32, or uint8 that `stack` normalises (fast preprocessing)
    outputs: frozenset[str]
    deadline: float  # time.monotonic() seconds
    future: asyncio.Future[Row]
    enqueued: float
    holds_slot: bool = True
    index: int | None = None  # position in its request (named by an inference_failed answer)
    started: float = 0.0
    finished: float = 0.0
    batch_size: int = 0


@dataclass
class BatchResult:
    """Rows in input order, and where the time went (the slowest image counts)."""

    rows: list[Row]
    queue_s: float
    compute_s: float
    batch_sizes: list[int] = field(default_factory=list)


class Reservation:
    """Admission slots held by one request between `admit` and `submit` (while its images decode)."""

    def __init__(self, batcher: DynamicBatcher, n: int) -> None:
        self._batcher = batcher
        self.n = n

    def release(self) -> None:
        """Give back slots not handed to queued items (idempotent)."""
        if self.n:
            self._batcher._release(self.n)
            self.n = 0

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class DynamicBatcher:
    def __init__(
        self,
        backend: InferenceBackend,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        metrics: ServiceMetrics | None = None,
        nice: int = 0,
        stack: Callable[[Sequence[np.ndarray]], np.ndarray] = np.stack,
    ) -> None:
        self.backend = backend
        self._stack = stack  # items' pixels -> the backend's batch (the decoder's: normalises uint8 pixels)
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.metrics = metrics or ServiceMetrics(max_batch_size)
        self._queue: deque[_Item] = deque()
        self._admitted = 0  # images between admission and compute start (decoding or queued)
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="aim-compute", initializer=lower_thread_priority(nice)
        )
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._per_image_s = 0.0  # EWMA of compute seconds per image, for Retry-After
        self.batches_run = 0

    # ----- lifecycle -----
    async def start(self) -> None:
        self._task = asyncio.create_task(self._worker(), name="aim-batcher")

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Finish what is queued (bounded by timeout_s), then stop the worker and its thread."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except TimeoutError:
                self._task.cancel()
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(NotReadyError("the service is shutting down", code="draining"))
        self._queue.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def admitted(self) -> int:
        return self._admitted

    @property
    def per_image_s(self) -> float:
        """EWMA of compute seconds per image (0 before the first batch)."""
        return self._per_image_s

    # ----- admission -----
    def admit(self, n: int) -> Reservation:
        """Reserve n slots or raise OverloadedError now (never waits)."""
        if self._closing:
            raise NotReadyError("the service is draining; retry on another replica", code="draining")
        if self._admitted + n > self.max_queue:
            raise OverloadedError(
                f"queue full ({self._admitted} of {self.max_queue} images admitted); retry later",
                retry_after_s=self.retry_after_s(),
            )
        self._admitted += n
        self.metrics.admitted.set(self._admitted)
        return Reservation(self, n)

    def check_room(self) -> None:
        """Refuse at once when not even one more image fits: called before the body is read or parsed."""
        if self._admitted >= self.max_queue:
            raise OverloadedError(
                f"queue full ({self._admitted} of {self.max_queue} images admitted); retry later",
                retry_after_s=self.retry_after_s(),
            )

    def retry_after_s(self) -> int:
        """Seconds until the queue has likely drained: admitted images x measured compute per image."""
        return max(1, min(60, math.ceil(self._admitted * self._per_image_s)))

    def _release(self, n: int) -> None:
        self._admitted -= n
        self.metrics.admitted.set(self._admitted)

    def _drop_slot(self, item: _Item) -> None:
        if item.holds_slot:
            item.holds_slot = False
            self._release(1)

    # ----- submission -----
    async def submit(
        self, pixels: Sequence[np.ndarray], outputs: Collection[str], deadline: float, reservation: Reservation
    ) -> BatchResult:
        """Queue one item per image ((C, S, S) each), wait for all of them until `deadline` (time.monotonic())."""
        if self._closing or not self.alive:
            raise NotReadyError("the batcher is not running", code="draining" if self._closing else "not_ready")
        if len(pixels) > reservation.n:
            raise ValueError(f"{len(pixels)} images submitted on a reservation of {reservation.n}")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        wanted = frozenset(outputs)
        items = [_Item(p, wanted, deadline, loop.create_future(), now, index=i) for i, p in enumerate(pixels)]
        reservation.n -= len(items)  # the slots now travel with the items
        reservation.release()
        self._queue.extend(items)
        self.metrics.queue_depth.set(len(self._queue))
        self._wakeup.set()
        try:
            rows = await asyncio.wait_for(asyncio.gather(*(it.future for it in items)), max(0.0, deadline - now))
        except TimeoutError:
            stage = "compute" if any(it.started for it in items) else "queue"
            raise DeadlineExceededError(
                f"deadline passed while the request was in the {stage} stage", stage=stage
            ) from None
        finally:
            for it in items:  # on any exit, nothing of this request is left to compute
                if not it.future.done():
                    it.future.cancel()
        return BatchResult(
            rows=list(rows),
            queue_s=max(it.started - it.enqueued for it in items),
            compute_s=max(it.finished - it.started for it in items),
            batch_sizes=sorted({it.batch_size for it in items}),
        )

    # ----- worker -----
    def _prune(self) -> None:
        """Drop items nobody waits for any more (cancelled, disconnected, or past their deadline)."""
        now = time.monotonic()
        live: deque[_Item] = deque()
        for item in self._queue:
            if item.future.done():
                self._drop_slot(item)
                # submit()'s wait times out at the deadline and cancels the futures before this sees them: past the
                # deadline it is a deadline drop (1 ms slack: asyncio's timer may fire a clock tick early).
                self.metrics.dropped.labels("deadline" if now >= item.deadline - 1e-3 else "cancelled").inc()
            elif now >= item.deadline:
                self._drop_slot(item)
                item.future.set_exception(DeadlineExceededError("deadline passed in the queue", stage="queue"))
                self.metrics.dropped.labels("deadline").inc()
            else:
                live.append(item)
        self._queue = live
        self.metrics.queue_depth.set(len(live))

    async def _wait_for_batch(self) -> None:
        """Return when a batch should flush: full, or the oldest item has waited max_wait_s."""
        flush_at = self._queue[0].enqueued + self.max_wait_s
        while len(self._queue) < self.max_batch_size and not self._closing:
            remaining = flush_at - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    async def _worker(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                await self._wait_for_batch()
                self._prune()
                batch = [self._queue.popleft() for _ in range(min(self.max_batch_size, len(self._queue)))]
                self.metrics.queue_depth.set(len(self._queue))
                if batch:
                    await self._run_batch(batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not kill the worker: fail this batch, keep serving
                logger.exception("batcher worker error")

    async def _run_batch(self, batch: list[_Item]) -> None:
        started = time.monotonic()
        for item in batch:
            item.started = started
            self._drop_slot(item)
            self.metrics.queue_seconds.observe(started - item.enqueued)
        outputs = sorted(set().union(*(it.outputs for it in batch)))
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(
                self._executor, self._infer_isolating, [it.pixels for it in batch], outputs
            )
        except Exception as exc:  # the executor itself failed (shut down): nothing was computed
            results = [exc] * len(batch)
        finished = time.monotonic()
        self.batches_run += 1
        self.metrics.compute_seconds.observe(finished - started)
        self.metrics.batch_size.observe(len(batch))
        per_image = (finished - started) / len(batch)
        self._per_image_s = per_image if not self._per_image_s else 0.8 * self._per_image_s + 0.2 * per_image
        for item, result in zip(batch, results, strict=True):
            item.finished, item.batch_size = finished, len(batch)
            if item.future.done():  # cancelled while computing: the answer has no taker
                continue
            if isinstance(result, BaseException):
                # The exception text stays in the log (it can name server paths); the client learns which image.
                logger.error(
                    "the model failed on image %s of a request (isolated from its batch)", item.index, exc_info=result
                )
                item.future.set_exception(
                    InferenceFailedError(
                        "the model failed on this image; it was isolated by splitting its batch, other images were "
                        "served (the server log has the details)",
                        index=item.index,
                    )
                )
            else:
                item.future.set_result({k: result[k] for k in item.outputs})

    def _infer_isolating(self, pixels: list[np.ndarray], outputs: list[str]) -> list[Row | BaseException]:
        """Runs in the compute thread. (B, C, S, S) -> one row dict per image, or the exception for a bad one."""
        shapes = {p.shape for p in pixels}
        if len(shapes) > 1:  # native resolution: one call per grid in this batch, rows back in input order
            rows: list[Row | BaseException | None] = [None] * len(pixels)
            for shape in shapes:
                idx = [i for i, p in enumerate(pixels) if p.shape == shape]
                for i, row in zip(idx, self._infer_isolating([pixels[i] for i in idx], outputs), strict=True):
                    rows[i] = row
            return rows  # type: ignore[return-value]
        try:
            out = self.backend.infer(self._stack(pixels), outputs)
            return [{k: v[i] for k, v in out.items()} for i in range(len(pixels))]
        except Exception as exc:
            if len(pixels) == 1:
                logger.warning("inference failed on a single isolated image: %s: %s", type(exc).__name__, exc)
                return [exc]
            self.metrics.bisections.inc()
            mid = len(pixels) // 2
            return self._infer_isolating(pixels[:mid], outputs) + self._infer_isolating(pixels[mid:], outputs)
