"""Vector checks and exact top-k helpers (small filtered subsets, the untrained IVF stage, recall self-checks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from service.index.errors import InvalidVectorError
from service.index.faiss_ops import reconstruct_rows

__all__ = ["Item", "SearchHit", "exact_scan", "exact_topk", "unit_rows"]

SCAN_CHUNK = 65_536  # rows reconstructed at a time by exact_scan: bounds memory at 1M x 1536 (384 MiB a chunk)


@dataclass(frozen=True)
class SearchHit:
    id: str
    score: float  # cosine similarity in [-1, 1]
    metadata: dict[str, Any] | None


@dataclass(frozen=True)
class Item:
    id: str
    metadata: dict[str, Any] | None
    vector: np.ndarray | None  # the stored unit vector (d,), when asked for


def unit_rows(vectors: Any, dim: int) -> np.ndarray:
    """(n, dim) float32 rows scaled to unit length. One vector (dim,) is one row. Raises InvalidVectorError."""
    try:
        arr = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidVectorError(f"vectors must be numeric arrays: {exc}") from exc
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise InvalidVectorError(f"vectors must have shape (n, {dim}) for this index, got {tuple(arr.shape)}")
    if arr.shape[0] == 0:
        raise InvalidVectorError("no vectors given")
    if not np.isfinite(arr).all():
        raise InvalidVectorError("vectors contain NaN or Inf")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if (norms < 1e-12).any():
        raise InvalidVectorError("a zero vector has no direction: it cannot be compared by cosine similarity")
    return np.ascontiguousarray(arr / norms, dtype=np.float32)


def exact_topk(queries: np.ndarray, candidates: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k of `candidates` (m, d) for each query (q, d) by inner product: (scores, rows), each (q, k), padded
    with -inf / -1 where m < k."""
    nq = queries.shape[0]
    scores_out = np.full((nq, k), -np.inf, dtype=np.float32)
    rows_out = np.full((nq, k), -1, dtype=np.int64)
    if rows.size == 0:
        return scores_out, rows_out
    scores = queries @ candidates.T  # (q, m)
    take = min(k, rows.size)
    part = (
        np.argpartition(-scores, take - 1, axis=1)[:, :take]
        if take < rows.size
        else np.tile(np.arange(rows.size), (nq, 1))
    )
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    scores_out[:, :take] = np.take_along_axis(part_scores, order, axis=1)
    rows_out[:, :take] = rows[np.take_along_axis(part, order, axis=1)]
    return scores_out, rows_out


def exact_scan(index: faiss.Index, rows: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over the stored vectors of `rows`, read back in chunks so memory stays bounded."""
    best_s = np.full((queries.shape[0], k), -np.inf, dtype=np.float32)
    best_r = np.full((queries.shape[0], k), -1, dtype=np.int64)
    for start in range(0, rows.size, SCAN_CHUNK):
        chunk = rows[start : start + SCAN_CHUNK]
        s, r = exact_topk(queries, reconstruct_rows(index, chunk), chunk, k)
        both_s, both_r = np.concatenate([best_s, s], axis=1), np.concatenate([best_r, r], axis=1)
        order = np.argsort(-both_s, axis=1, kind="stable")[:, :k]
        best_s, best_r = np.take_along_axis(both_s, order, axis=1), np.take_along_axis(both_r, order, axis=1)
    return best_s, best_r
