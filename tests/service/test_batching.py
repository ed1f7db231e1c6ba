"""The dynamic batcher alone, with the fake backend: coalescing, flush rules, admission, deadlines, cancellation,
bisection of failing batches and mixed outputs."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from service.backends.fake_backend import FakeBackend
from service.batching import DynamicBatcher
from service.errors import DeadlineExceededError, InferenceFailedError, OverloadedError
from service.metrics import ServiceMetrics

S = 32  # aim-debug input size


def pixels(n: int, value: float = 0.0) -> list[np.ndarray]:
    rng = np.random.default_rng(int(value * 1000) + n)
    return [rng.normal(value, 1, (3, S, S)).astype(np.float32) for _ in range(n)]


def make(backend: FakeBackend, **kw: float) -> DynamicBatcher:
    opts = {"max_batch_size": 8, "max_wait_s": 0.02, "max_queue": 64} | kw
    return DynamicBatcher(backend, metrics=ServiceMetrics(int(opts["max_batch_size"])), **opts)  # type: ignore[arg-type]


async def submit(
    batcher: DynamicBatcher,
    n: int = 1,
    *,
    deadline_s: float = 5.0,
    value: float = 0.0,
    outputs: tuple[str, ...] = ("embedding",),
):
    with batcher.admit(n) as reservation:
        return await batcher.submit(pixels(n, value), outputs, time.monotonic() + deadline_s, reservation)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_concurrent_requests_coalesce_into_one_batch() -> None:
    async def main() -> None:
        backend = FakeBackend()
        batcher = make(backend, max_wait_s=0.05)
        await batcher.start()
        results = await asyncio.gather(*(submit(batcher) for _ in range(6)))
        await batcher.stop()
        assert backend.calls == [6]
        assert all(r.batch_sizes == [6] for r in results)
        # Each request got its own image's row back, not a neighbour's.
        emb = [r.rows[0]["embedding"] for r in results]
        assert len({e.tobytes() for e in emb}) == 1  # same seed -> same pixels -> same row
        assert emb[0].shape == (backend.info.config.embed_dim,)

    run(main())


def test_flush_at_max_batch_without_waiting() -> None:
    async def main() -> None:
        backend = FakeBackend()
        batcher = make(backend, max_batch_size=4, max_wait_s=10.0)  # the timer alone would take 10 s
        await batcher.start()
        t0 = time.monotonic()
        await asyncio.gather(*(submit(batcher) for _ in range(8)))
        assert time.monotonic() - t0 < 2.0
        await batcher.stop()
        assert backend.calls == [4, 4]

    run(main())


def test_flush_at_max_wait_with_a_partial_batch() -> None:
    async def main() -> None:
        backend = FakeBackend()
        batcher = make(backend, max_wait_s=0.05)
        await batcher.start()
        t0 = time.monotonic()
        result = await submit(batcher)
        waited = time.monotonic() - t0
        await batcher.stop()
        assert backend.calls == [1]
        assert 0.04 <= waited < 1.0
        assert result.queue_s >= 0.04

    run(main())


def test_full_queue_is_refused_at_once_with_retry_after() -> None:
    async def main() -> None:
        batcher = make(FakeBackend(delay_s=0.2), max_queue=4)
        await batcher.start()
        held = batcher.admit(4)
        t0 = time.perf_counter()
        with pytest.raises(OverloadedError) as info:
            batcher.admit(1)
        assert time.perf_counter() - t0 < 0.001
        assert info.value.http_status == 429 and int(info.value.headers["Retry-After"]) >= 1
        held.release()
        batcher.admit(4).release()  # slots came back
        await batcher.stop()

    run(main())


def test_expired_requests_are_dropped_before_compute() -> None:
    async def main() -> None:
        backend = FakeBackend(delay_s=0.3)
        batcher = make(backend, max_batch_size=1, max_wait_s=0.0)
        await batcher.start()
        busy = asyncio.create_task(submit(batcher))  # occupies the backend for 0.3 s
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExceededError) as info:
            await submit(batcher, deadline_s=0.1, value=5.0)
        assert info.value.stage == "queue"
        await busy
        await asyncio.sleep(0.05)
        await batcher.stop()
        assert backend.calls == [1]  # the expired image never reached the backend
        assert batcher.admitted == 0

    run(main())


def test_cancelled_requests_are_dropped_before_compute() -> None:
    async def main() -> None:
        backend = FakeBackend(delay_s=0.2)
        metrics = ServiceMetrics(8)
        batcher = DynamicBatcher(backend, max_batch_size=8, max_wait_s=0.0, max_queue=64, metrics=metrics)
        await batcher.start()
        busy = asyncio.create_task(submit(batcher))
        await asyncio.sleep(0.05)
        doomed = asyncio.create_task(submit(batcher, 3))
        await asyncio.sleep(0.02)
        doomed.cancel()  # what a client disconnect does to the request's task
        await busy
        await asyncio.sleep(0.05)
        await batcher.stop()
        assert backend.calls == [1]
        assert metrics.dropped.labels("cancelled")._value.get() == 3
        assert batcher.admitted == 0

    run(main())


def test_failing_batch_is_bisected_so_only_the_bad_input_fails() -> None:
    async def main() -> None:
        backend = FakeBackend(poison=lambda p: float(p.mean()) > 50)
        batcher = make(backend, max_wait_s=0.05)
        await batcher.start()
        tasks = [asyncio.create_task(submit(batcher, value=100.0 if i == 5 else 0.0)) for i in range(8)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.stop()
        failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
        assert failed == [5]
        assert isinstance(results[5], InferenceFailedError)
        assert backend.calls[0] == 8 and len(backend.calls) > 2  # one full try, then the halves
        assert batcher.metrics.bisections._value.get() >= 3

    run(main())


def test_mixed_outputs_share_a_batch_and_each_gets_its_own() -> None:
    async def main() -> None:
        backend = FakeBackend()
        batcher = make(backend, max_wait_s=0.05)
        await batcher.start()
        a, b = await asyncio.gather(submit(batcher, outputs=("embedding",)), submit(batcher, outputs=("logits",)))
        await batcher.stop()
        assert backend.calls == [2]
        assert set(a.rows[0]) == {"embedding"} and set(b.rows[0]) == {"logits"}

    run(main())


def test_stop_finishes_queued_work() -> None:
    async def main() -> None:
        backend = FakeBackend(delay_s=0.05)
        batcher = make(backend, max_batch_size=2, max_wait_s=0.0)
        await batcher.start()
        tasks = [asyncio.create_task(submit(batcher)) for _ in range(6)]
        await asyncio.sleep(0.01)
        await batcher.stop()
        results = await asyncio.gather(*tasks)
        assert len(results) == 6 and sum(backend.calls) == 6

    run(main())
