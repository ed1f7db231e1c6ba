"""Images dropped from the batcher's queue are counted under the reason that dropped them.

The route waits on its images with the request's deadline; when that wait times out first it cancels the images'
futures, and the worker finds them already done. Those are deadline drops, not client cancellations.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from service.backends.fake_backend import FakeBackend
from service.batching import DynamicBatcher
from service.errors import DeadlineExceededError
from service.metrics import ServiceMetrics
from tests.service.test_batching import pixels


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 30))


def _batcher(metrics: ServiceMetrics, delay_s: float) -> DynamicBatcher:
    return DynamicBatcher(FakeBackend(delay_s=delay_s), max_batch_size=1, max_wait_s=0.0, max_queue=64, metrics=metrics)


async def _submit(batcher: DynamicBatcher, n: int, deadline_s: float) -> object:
    with batcher.admit(n) as reservation:
        return await batcher.submit(pixels(n), ("embedding",), time.monotonic() + deadline_s, reservation)


def test_a_deadline_that_times_out_the_route_first_is_counted_as_deadline() -> None:
    async def main() -> None:
        metrics = ServiceMetrics(1)
        batcher = _batcher(metrics, delay_s=0.3)
        await batcher.start()
        busy = asyncio.create_task(_submit(batcher, 1, 5.0))  # holds the backend for 0.3 s
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExceededError):
            await _submit(batcher, 2, 0.05)  # expires while queued behind the busy batch
        await busy
        await asyncio.sleep(0.05)
        await batcher.stop()
        assert metrics.dropped.labels("deadline")._value.get() == 2
        assert metrics.dropped.labels("cancelled")._value.get() == 0

    _run(main())


def test_a_client_that_goes_away_before_its_deadline_is_counted_as_cancelled() -> None:
    async def main() -> None:
        metrics = ServiceMetrics(1)
        batcher = _batcher(metrics, delay_s=0.2)
        await batcher.start()
        busy = asyncio.create_task(_submit(batcher, 1, 5.0))
        await asyncio.sleep(0.05)
        doomed = asyncio.create_task(_submit(batcher, 3, 5.0))
        await asyncio.sleep(0.02)
        doomed.cancel()
        await busy
        await asyncio.sleep(0.05)
        await batcher.stop()
        assert metrics.dropped.labels("cancelled")._value.get() == 3
        assert metrics.dropped.labels("deadline")._value.get() == 0

    _run(main())
