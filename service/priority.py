"""Worker threads yield the CPU to the event loop.

The event loop only admits, refuses and answers; the decode and compute threads do the heavy work. On a busy host
(2 cores, a saturated server) a refusal that takes 0.1 ms of loop time still waits for a CPU slice behind those
threads, so a client saw 429s after p99 0.3-4.6 s. py-spy shows the GIL is free about 70 % of the time under 4x
overload, so the wait is the OS scheduler's, not the GIL's. Linux gives each thread its own nice value: the worker
threads run at `worker_nice` (default 10) and CFS runs the loop first whenever it is runnable; when the loop is
idle the workers still get every core, so throughput does not drop.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

__all__ = ["lower_thread_priority"]

logger = logging.getLogger(__name__)


def lower_thread_priority(nice: int) -> Callable[[], None]:
    """A ThreadPoolExecutor initializer that raises the calling thread's nice value by `nice` (0: leave it)."""

    def initializer() -> None:
        if nice <= 0 or not hasattr(os, "setpriority"):
            return
        tid = threading.get_native_id()
        try:  # on Linux PRIO_PROCESS with a thread id sets that thread alone
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        except OSError as exc:  # pragma: no cover - a sandbox without the permission: run at normal priority
            logger.debug("could not lower the priority of thread %d: %s", tid, exc)

    return initializer
