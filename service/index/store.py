"""The item table beside the FAISS index: external string ids, JSON metadata, tombstones and filter postings.

Rows are FAISS's sequential ids. Deleting or replacing an item tombstones its row (the vector stays in FAISS until
the next compaction); searches exclude tombstones through a selector. We chose tombstones over remove_ids because
HNSW cannot remove vectors and IVF removal is O(list length) per id, and one mechanism for every kind keeps the
durability logic in one place. Metadata equality filters use postings (key -> canonical JSON value -> rows), so a
filter costs the size of its smallest posting list, not a scan of every item.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from service.index.errors import InvalidIdError, InvalidMetadataError, InvalidVectorError

__all__ = [
    "MAX_ID_LENGTH",
    "ItemTable",
    "canonical_value",
    "id_problem",
    "validate_filter",
    "validate_id",
    "validate_ids",
    "validate_metadata",
]

MAX_ID_LENGTH = 1024
# C0 controls, DEL and C1 controls. A newline in an id made it unreachable over HTTP (a route's `$` matches before a
# trailing newline, so `/index/items/victim%0A` named "victim"), and control characters in ids are never meant.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def id_problem(item_id: object, *, new: bool = True) -> str | None:
    """Why `item_id` cannot be an id, or None when it can: a non-empty string of at most MAX_ID_LENGTH characters
    without control characters. Shared by the index and the HTTP schemas, so both refuse alike. `new=False` (naming
    an existing item, to delete it) skips the control-character rule: an index written before it may hold such ids."""
    if not isinstance(item_id, str) or not item_id:
        return f"ids are non-empty strings, got {item_id!r}"
    if len(item_id) > MAX_ID_LENGTH:
        return f"id {item_id[:40]!r}... has {len(item_id)} characters; the limit is {MAX_ID_LENGTH}"
    if new and (bad := _CONTROL.search(item_id)) is not None:
        return (
            f"id {item_id!r} contains the control character U+{ord(bad.group()):04X}; ids are text without control "
            "characters (C0, DEL, C1)"
        )
    return None


def validate_id(item_id: object, *, new: bool = True) -> str:
    if (problem := id_problem(item_id, new=new)) is not None:
        raise InvalidIdError(problem)
    return item_id  # type: ignore[return-value]


def canonical_value(value: Any) -> str:
    """One string per JSON value, so equality is JSON equality (1 and true differ; key order does not matter)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def validate_ids(ids: Sequence[str], *, new: bool = True) -> list[str]:
    out = [validate_id(item_id, new=new) for item_id in ids]
    if len(set(out)) != len(out):
        dupes = sorted({i for i in out if out.count(i) > 1})[:5]
        raise InvalidVectorError(f"duplicate ids in one request: {dupes}")
    return out


def validate_metadata(metadata: Sequence[Mapping[str, Any] | None] | None, n: int) -> list[dict[str, Any] | None]:
    if metadata is None:
        return [None] * n
    metas = list(metadata)
    if len(metas) != n:
        raise InvalidMetadataError(f"{len(metas)} metadata entries for {n} items")
    out: list[dict[str, Any] | None] = []
    for meta in metas:
        if meta is None:
            out.append(None)
            continue
        if not isinstance(meta, Mapping) or not all(isinstance(k, str) for k in meta):
            raise InvalidMetadataError(f"metadata must be a JSON object with string keys, got {type(meta).__name__}")
        try:
            # Round trip: what we return later is exactly what the WAL and snapshot hold.
            out.append(json.loads(json.dumps(dict(meta), allow_nan=False)))
        except (TypeError, ValueError) as exc:
            raise InvalidMetadataError(f"metadata is not JSON-serialisable: {exc}") from exc
    return out


def validate_filter(where: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not where:
        return None
    if not isinstance(where, Mapping) or not all(isinstance(k, str) for k in where):
        raise InvalidMetadataError("a filter is a JSON object {key: value}, matched by equality on every key")
    try:
        json.dumps(dict(where), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidMetadataError(f"filter values must be JSON: {exc}") from exc
    return dict(where)


class ItemTable:
    def __init__(self) -> None:
        self.row_ids: list[str | None] = []  # row -> external id, None once tombstoned
        self.row_of: dict[str, int] = {}  # external id -> its live row
        self.meta: dict[int, dict[str, Any]] = {}  # live row -> metadata (rows without metadata absent)
        self._live = np.zeros(1024, dtype=bool)
        self._postings: dict[str, dict[str, set[int]]] = {}
        self._live_bits: np.ndarray | None = None  # cached packed bitmap for FAISS, dropped on every change

    # ----- sizes -----
    @property
    def n_rows(self) -> int:
        return len(self.row_ids)

    @property
    def n_live(self) -> int:
        return len(self.row_of)

    @property
    def n_dead(self) -> int:
        return self.n_rows - self.n_live

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.row_of

    def live_rows(self) -> np.ndarray:
        return np.flatnonzero(self._live[: self.n_rows]).astype(np.int64)

    # ----- mutations (the caller holds the index's write lock) -----
    def append(self, ids: Sequence[str], metas: Sequence[dict[str, Any] | None]) -> np.ndarray:
        """New rows for ids not in the table (tombstone replaced ones first). Returns their row numbers."""
        start = self.n_rows
        need = start + len(ids)
        if need > self._live.size:
            grown = np.zeros(max(need, 2 * self._live.size), dtype=bool)
            grown[:start] = self._live[:start]
            self._live = grown
        for offset, (item_id, meta) in enumerate(zip(ids, metas, strict=True)):
            row = start + offset
            self.row_ids.append(item_id)
            self.row_of[item_id] = row
            if meta:
                self.meta[row] = meta
                self._post(row, meta, add=True)
        self._live[start:need] = True
        self._live_bits = None
        return np.arange(start, need, dtype=np.int64)

    def tombstone(self, item_id: str) -> int | None:
        row = self.row_of.pop(item_id, None)
        if row is None:
            return None
        self.row_ids[row] = None
        meta = self.meta.pop(row, None)
        if meta:
            self._post(row, meta, add=False)
        self._live[row] = False
        self._live_bits = None
        return row

    def _post(self, row: int, meta: Mapping[str, Any], *, add: bool) -> None:
        for key, value in meta.items():
            by_value = self._postings.setdefault(key, {})
            canon = canonical_value(value)
            rows = by_value.setdefault(canon, set())
            if add:
                rows.add(row)
            else:
                rows.discard(row)
                if not rows:
                    del by_value[canon]

    # ----- queries (the caller holds at least the read lock) -----
    def id_at(self, row: int) -> str | None:
        return self.row_ids[row] if 0 <= row < self.n_rows else None

    def filter_rows(self, where: Mapping[str, Any]) -> np.ndarray:
        """Sorted live rows whose metadata equals `where` on every key."""
        sets = []
        for key, value in where.items():
            rows = self._postings.get(key, {}).get(canonical_value(value))
            if not rows:
                return np.zeros(0, dtype=np.int64)
            sets.append(rows)
        sets.sort(key=len)
        result = set(sets[0]).intersection(*sets[1:]) if len(sets) > 1 else sets[0]
        return np.fromiter(sorted(result), dtype=np.int64, count=len(result))

    def live_bitmap(self) -> np.ndarray:
        """Live rows as a little-endian packed bitmap (faiss.IDSelectorBitmap's layout)."""
        if self._live_bits is None:
            self._live_bits = np.packbits(self._live[: self.n_rows], bitorder="little")
        return self._live_bits

    # ----- persistence and compaction -----
    def to_json(self) -> dict[str, Any]:
        return {"rows": self.row_ids, "meta": {str(r): m for r, m in self.meta.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ItemTable:
        table = cls()
        rows: list[str | None] = list(data["rows"])
        n = len(rows)
        table.row_ids = rows
        table._live = np.zeros(max(1024, n), dtype=bool)
        for row, item_id in enumerate(rows):
            if item_id is not None:
                table.row_of[item_id] = row
                table._live[row] = True
        for key, meta in data.get("meta", {}).items():
            row = int(key)
            if table._live[row] and meta:
                table.meta[row] = meta
                table._post(row, meta, add=True)
        return table

    def compacted(self) -> tuple[ItemTable, np.ndarray]:
        """A table of the live items only, renumbered from 0 in row order, and the old rows they came from."""
        keep = self.live_rows()
        table = ItemTable()
        ids = [self.row_ids[r] for r in keep]
        table.append([i for i in ids if i is not None], [self.meta.get(int(r)) for r in keep])
        return table, keep

    def items(self, rows: Iterable[int]) -> list[tuple[str | None, dict[str, Any] | None]]:
        return [(self.id_at(int(r)), self.meta.get(int(r))) for r in rows]
