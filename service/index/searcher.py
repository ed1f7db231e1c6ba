"""Searching a VectorIndex: by vectors or by stored id, with an optional metadata equality filter, plus the ANN
recall self-check (ANCHORS §11). Mixed into VectorIndex; every method here runs under the read lock.

Filters: a filter matching few rows (<= EXACT_FILTER_MAX) is searched exactly over those rows; a broader one goes
to FAISS with an IDSelector of the matching rows. Tombstones are excluded the same way. When a graph or IVF search
under a selector returns fewer than k results although k candidates exist (a very restrictive selector starves
HNSW's beam), that query is redone exactly (pools up to EXACT_FALLBACK_MAX rows), so a filter does not silently
shorten the answer.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from service.index.errors import InvalidRequestError, ItemNotFoundError
from service.index.faiss_ops import reconstruct_rows, search_params
from service.index.observer import notify
from service.index.recipe import RecipeLike, check_recipe
from service.index.search import SearchHit, exact_scan, unit_rows
from service.index.store import validate_filter

if TYPE_CHECKING:
    from service.index.config import IndexConfig
    from service.index.observer import IndexObserver
    from service.index.recipe import EmbeddingRecipe
    from service.index.rwlock import RWLock
    from service.index.store import ItemTable

__all__ = ["EXACT_FILTER_MAX", "MAX_K", "IndexStats", "SearchMixin"]

EXACT_FILTER_MAX = 4096
# Short answers are redone exactly only over pools up to this size (an exact scan of 1M x 1536 is ~1 s a query).
EXACT_FALLBACK_MAX = 262_144
MAX_K = 10_000


@dataclass(frozen=True)
class IndexStats:
    """What GET /index reports."""

    path: str
    kind: str
    faiss_class: str
    dim: int
    count: int
    tombstones: int
    trained: bool
    recipe: dict[str, Any]
    params: dict[str, Any]
    lsn: int
    snapshot_lsn: int | None
    last_snapshot_at: float | None  # unix time of the last committed snapshot
    wal_ops_pending: int  # logged operations not yet folded into a snapshot (replayed on the next start)
    wal_bytes: int
    read_only: bool
    gpu: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SearchMixin:
    _rw: RWLock
    _table: ItemTable
    _faiss: faiss.Index
    _gpu: faiss.Index | None
    _config: IndexConfig
    _recipe: EmbeddingRecipe
    _observer: IndexObserver | None
    trained: bool

    def search(
        self,
        vectors: Any,
        k: int = 10,
        *,
        recipe: RecipeLike,
        where: Mapping[str, Any] | None = None,
        score_threshold: float | None = None,
        ef_search: int | None = None,
        nprobe: int | None = None,
    ) -> list[list[SearchHit]]:
        """The k nearest items (cosine, best first) for each query row of `vectors` (n, dim) or (dim,).

        where: metadata equality filter {key: value}; score_threshold drops hits scoring below it; ef_search /
        nprobe override the index's default speed/recall knob for this call."""
        started = time.perf_counter()
        check_recipe(self._recipe, recipe, "search this index")
        queries = unit_rows(vectors, self._recipe.dim)
        where = validate_filter(where)
        k = _check_k(k)
        with self._rw.read():
            scores, rows = self._search_locked(queries, k, where, ef_search, nprobe)
            hits = [self._hits(s, r, score_threshold) for s, r in zip(scores, rows, strict=True)]
        self._report(started, hits)
        return hits

    def search_by_id(
        self,
        item_id: str,
        k: int = 10,
        *,
        where: Mapping[str, Any] | None = None,
        score_threshold: float | None = None,
        include_self: bool = False,
        ef_search: int | None = None,
        nprobe: int | None = None,
    ) -> list[SearchHit]:
        """Neighbours of a stored item (the item itself left out unless include_self). No recipe needed: the
        query is the index's own vector."""
        started = time.perf_counter()
        where = validate_filter(where)
        k = _check_k(k)
        with self._rw.read():
            row = self._table.row_of.get(item_id)
            if row is None:
                raise ItemNotFoundError(item_id)
            query = reconstruct_rows(self._faiss, np.array([row]))
            want = k if include_self else k + 1
            scores, rows = self._search_locked(query, want, where, ef_search, nprobe)
            hits = self._hits(scores[0], rows[0], score_threshold)
        if not include_self:
            hits = [h for h in hits if h.id != item_id][:k]
        self._report(started, [hits])
        return hits

    def recall_self_check(self, k: int = 10, sample: int = 100, seed: int | None = None) -> float:
        """recall@k of the index's default search against exact search, with `sample` stored vectors as queries.
        Holds the read lock for an exact scan of every vector (seconds at 1M): run it rarely, off the hot path."""
        k = _check_k(k)
        with self._rw.read():
            live = self._table.live_rows()
            if live.size == 0:
                return 1.0
            rng = np.random.default_rng(seed)
            picked = rng.choice(live, size=min(sample, live.size), replace=False)
            queries = reconstruct_rows(self._faiss, picked)
            _, ann = self._search_locked(queries, k, None, None, None)
            _, exact = exact_scan(self._faiss, live, queries, min(k, live.size))
        found = [
            len(set(a[a >= 0]) & set(e[e >= 0])) / max(1, int((e >= 0).sum())) for a, e in zip(ann, exact, strict=True)
        ]
        recall = float(np.mean(found))
        notify(self._observer, "recall_measured", k, recall)
        return recall

    # ------------------------------------------------------------------------------------------------------------
    def _search_locked(
        self, queries: np.ndarray, k: int, where: dict[str, Any] | None, ef_search: int | None, nprobe: int | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (q, k); rows -1 where fewer than k candidates exist."""
        table = self._table
        if table.n_live == 0:
            return np.full((queries.shape[0], k), -np.inf, np.float32), np.full((queries.shape[0], k), -1, np.int64)
        candidates: np.ndarray | None = None  # rows allowed, when not every live row is
        bits: np.ndarray | None = None
        if where is not None:
            candidates = table.filter_rows(where)
            if candidates.size <= EXACT_FILTER_MAX:
                return exact_scan(self._faiss, candidates, queries, k)
            mask = np.zeros(table.n_rows, dtype=bool)
            mask[candidates] = True
            bits = np.packbits(mask, bitorder="little")
        elif table.n_dead:
            bits = table.live_bitmap()
        if bits is None and self._gpu is not None:
            # GPU indexes take no selector: only used while there is nothing to exclude.
            scores, rows = self._gpu.search(queries, k)
            return scores, rows
        selector = faiss.IDSelectorBitmap(bits.size, faiss.swig_ptr(bits)) if bits is not None else None
        params = search_params(self._faiss, self._config, selector, ef_search=ef_search, nprobe=nprobe)
        scores, rows = self._faiss.search(queries, k, params=params)
        del selector  # only now: FAISS held a raw pointer to it (and to `bits`) during the search
        pool_size = candidates.size if candidates is not None else table.n_live
        short = np.flatnonzero((rows >= 0).sum(axis=1) < min(k, pool_size))
        if short.size and pool_size <= EXACT_FALLBACK_MAX:
            pool = candidates if candidates is not None else table.live_rows()
            scores[short], rows[short] = exact_scan(self._faiss, pool, queries[short], k)
        return scores, rows

    def _hits(self, scores: np.ndarray, rows: np.ndarray, threshold: float | None) -> list[SearchHit]:
        hits = []
        for score, row in zip(scores.tolist(), rows.tolist(), strict=True):
            item_id = self._table.id_at(row) if row >= 0 else None
            if item_id is None or (threshold is not None and score < threshold):
                continue
            meta = self._table.meta.get(row)
            hits.append(SearchHit(item_id, float(score), dict(meta) if meta else None))
        return hits

    def _report(self, started: float, hits: list[list[SearchHit]]) -> None:
        top1 = [h[0].score for h in hits if h]
        notify(self._observer, "searched", time.perf_counter() - started, len(hits), top1)


def _check_k(k: int) -> int:
    if not isinstance(k, int | np.integer) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise InvalidRequestError(f"k must be an integer in [1, {MAX_K}], got {k!r}")
    return int(k)
