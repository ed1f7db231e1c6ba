"""The metrics hook: the index reports what happened, the service's metrics module decides how to record it.

The index never imports prometheus_client. The service passes an object with these methods (subclass
IndexObserver and override what it records); exceptions raised by an observer are logged and swallowed, so a
metrics bug can never fail a search or lose a write.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

__all__ = ["IndexObserver", "notify"]

logger = logging.getLogger(__name__)


class IndexObserver:
    """No-op base. All durations are in seconds."""

    def searched(self, seconds: float, queries: int, top1_scores: Sequence[float]) -> None:
        """One search call of `queries` queries finished; top1_scores has the best score of each query that found
        anything (a histogram of these shows drift: scores falling means the index no longer fits the traffic)."""

    def added(self, count: int, seconds: float) -> None:
        """An upsert of `count` items was acknowledged (durable); seconds includes the WAL fsync."""

    def deleted(self, count: int) -> None:
        """`count` items were deleted (ids that were not present are not counted)."""

    def size_changed(self, live: int, tombstones: int) -> None:
        """The number of searchable items and of tombstoned rows awaiting compaction."""

    def snapshotted(self, seconds: float, lsn: int, size_bytes: int) -> None:
        """A snapshot was committed."""

    def recall_measured(self, k: int, recall: float) -> None:
        """ANN self-check: recall@k of the index against exact search on a sample of its own vectors."""


def notify(observer: IndexObserver | None, method: str, *args: object) -> None:
    if observer is None:
        return
    try:
        getattr(observer, method)(*args)
    except Exception:  # a metrics bug must not turn into a failed request
        logger.exception("index observer %s.%s failed", type(observer).__name__, method)
