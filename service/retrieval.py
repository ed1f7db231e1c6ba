"""The vector index's life inside the service: opened for the served model before the service turns ready, its
blocking calls (WAL fsync, FAISS search, snapshots) run in a thread pool off the event loop, snapshots and recall
self-checks on a background timer, a final snapshot and the writer lock released on shutdown.

Startup policy: an existing index whose embedding recipe differs from the served model's (other weights, pooling,
preprocessing, dimension) fails the start (`startup_failed`, exit 1 under `python -m service`). Serving it would
only answer id searches: every image query and every add would be refused, so a loud failure is more useful than
a half-working server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from service.engine import Engine
from service.errors import NoIndexError, NotReadyError
from service.index import EmbeddingRecipe, IndexConfig, IndexLockedError, RecipeMismatchError, VectorIndex
from service.index.snapshot import MANIFEST_NAME, read_manifest
from service.metrics import IndexMetrics, ServiceMetrics
from service.settings import Settings

__all__ = ["INDEX_THREADS", "RECALL_K", "Retrieval"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Searches run concurrently under the index's read lock; writes serialise on its mutex anyway.
INDEX_THREADS = 4
# 50 stored vectors as queries: an exact scan of them costs ~2-3 s of CPU at 1M x 1536 (under the read lock)
RECALL_K, RECALL_SAMPLE = 10, 50
POOLING_OUTPUT = {"mean": "embedding", "probe": "pooled"}


class Retrieval:
    def __init__(self, settings: Settings, engine: Engine, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.engine = engine
        self.observer = IndexMetrics(metrics)
        self.index: VectorIndex | None = None
        self.recipe: EmbeddingRecipe | None = None  # the served model's, identical to the index's once open
        self._pool = concurrent.futures.ThreadPoolExecutor(INDEX_THREADS, thread_name_prefix="aim-index")
        self._opening: concurrent.futures.Future[VectorIndex] | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.settings.index_path is not None

    @property
    def output(self) -> str:
        """The backend output the index holds ("embedding" or "pooled")."""
        return POOLING_OUTPUT[self.settings.index_pooling]

    def require(self) -> VectorIndex:
        """The open index, or the error a request should get instead."""
        if not self.enabled:
            raise NoIndexError(
                "this service runs without a vector index: start it with --index-path DIR (AIM_INDEX_PATH); "
                "build one offline with `python -m service.index build --images DIR --out INDEX`"
            )
        index = self.index
        if index is None:
            self.engine.check_serving()  # loading / startup_failed / draining, with the engine's reason
            raise NotReadyError("the vector index is not open (shutting down)", code="draining")
        return index

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking index call in the index's thread pool. A cancelled request does not cancel a write that
        has started: it completes (and is durable) even though the client never sees the answer."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    # ----- startup (an Engine.before_ready hook) -----
    async def open(self) -> None:
        if not self.enabled:
            return
        info = self.engine.backend.info
        if self.output == "pooled" and not info.has_head:
            raise RuntimeError(
                f"index_pooling=probe needs the model's attention-pooling head and {info.model_id} has none; "
                "use index_pooling=mean"
            )
        served = EmbeddingRecipe.from_backend(info, self.output)
        self._opening = self._pool.submit(self._open_blocking, served)
        self.index = await asyncio.wrap_future(self._opening)
        self.recipe = served
        self._task = asyncio.create_task(self._maintain(), name="aim-index-maintenance")

    def _overrides(self) -> dict[str, Any]:
        s = self.settings
        out: dict[str, Any] = {}
        if s.index_ef_search is not None:
            out["ef_search"] = s.index_ef_search
        if s.index_nprobe is not None:
            out["nprobe"] = s.index_nprobe
        if s.index_snapshot_interval_s > 0:
            # The timer snapshots instead: the core's size thresholds would snapshot inside a write request.
            out |= {"snapshot_every_ops": 0, "snapshot_every_bytes": 0}
        return out

    def _open_blocking(self, served: EmbeddingRecipe) -> VectorIndex:
        s = self.settings
        path = Path(str(s.index_path))
        exists = (path / MANIFEST_NAME).exists()
        if s.index_read_only:
            if not exists:
                raise RuntimeError(f"index_read_only is set but there is no index at {path}")
            index = VectorIndex.open(path, overrides=self._overrides(), observer=self.observer, read_only=True)
        else:
            if not exists:
                # Created, then opened like any existing index so the overrides apply to both alike.
                VectorIndex.create(path, served, IndexConfig(kind=s.index_kind)).close(snapshot=False)
            try:
                index = VectorIndex.open(path, overrides=self._overrides(), observer=self.observer)
            except IndexLockedError as exc:
                raise RuntimeError(f"{exc}; serve replicas with index_read_only") from None
        try:
            index.check_recipe(served, "serve this index with the loaded model")
        except RecipeMismatchError as exc:
            index.close(snapshot=False)
            held = index.recipe
            raise RuntimeError(
                f"index {path} holds {held.pooling}-pooled vectors of {held.model_id or held.model_sha256[:12]} "
                f"(recipe {held.fingerprint}), not the served model's ({served.fingerprint}): {exc}"
            ) from None
        if exists and index.config.kind != s.index_kind:
            logger.info(
                "index %s is %s: index_kind=%s only applies to new indexes", path, index.config.kind, s.index_kind
            )
        return index

    # ----- background work -----
    async def _maintain(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        every = {"snapshot": s.index_snapshot_interval_s, "recall": s.index_recall_check_interval_s}
        due = {name: loop.time() + (t if t > 0 else math.inf) for name, t in every.items()}
        while (wake := min(due.values())) != math.inf:
            await asyncio.sleep(max(0.0, wake - loop.time()))
            for name in [n for n, t in due.items() if t <= loop.time()]:
                due[name] = loop.time() + every[name]
                work = self._snapshot_or_reload if name == "snapshot" else self._recall_check
                try:
                    await self.call(work)
                except Exception:  # the next tick retries; a failed snapshot loses nothing (the WAL holds it)
                    logger.exception("index %s failed; retrying in %.0fs", name, every[name])

    def _snapshot_or_reload(self) -> None:
        index = self.index
        if index is None:
            return
        if not index.read_only:
            if index.stats().wal_ops_pending:
                index.snapshot()
            return
        # A replica: reopen when the writer has committed a newer snapshot (the reopen replays its WAL too).
        section = read_manifest(index.path).get("snapshot") or {}
        if section.get("lsn") == index.stats().snapshot_lsn:
            return
        fresh = VectorIndex.open(index.path, overrides=self._overrides(), observer=self.observer, read_only=True)
        self.index = fresh
        index.close(snapshot=False)
        logger.info("replica reloaded %s at lsn %s (%d items)", index.path, fresh.stats().lsn, len(fresh))

    def _recall_check(self) -> None:
        index = self.index
        if index is not None and len(index):
            recall = index.recall_self_check(RECALL_K, RECALL_SAMPLE)
            logger.info("index recall@%d self-check: %.3f", RECALL_K, recall)

    # ----- shutdown -----
    async def stop(self) -> None:
        """Stop the timer, then a final snapshot and close (releases the writer lock)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        index, self.index = self.index, None
        opening = self._opening
        if index is None and opening is not None and not opening.cancelled():
            # The start was cancelled while the index was opening: wait for it, so its lock is released too.
            with contextlib.suppress(Exception):
                index = await asyncio.wrap_future(opening)
        try:
            if index is not None:
                await self.call(index.close)
        finally:
            self._pool.shutdown(wait=False)
