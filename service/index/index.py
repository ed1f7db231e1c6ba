"""VectorIndex: a durable, thread-safe FAISS collection of (string id, unit vector, JSON metadata) items.

Durability: a mutation is validated, appended to the WAL and fdatasync'ed, then applied in memory, and only then
does the call return (see wal.py, snapshot.py). Opening loads the last snapshot and replays the WAL after it.

Concurrency: one writer at a time (`_mutex`: WAL order is apply order); the in-memory structures sit behind a
reader/writer lock, taken for writing only around the FAISS add/swap, so searches continue during the WAL fsync,
IVF training, compaction and snapshot writes (all of which only read the live structures).
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from service.index.config import IndexConfig
from service.index.errors import (
    IndexLockedError,
    IndexReadOnlyError,
    InvalidVectorError,
    ItemNotFoundError,
    VectorIndexError,
)
from service.index.faiss_ops import new_untrained, reconstruct_rows
from service.index.maintenance import MaintenanceMixin, ivf_of
from service.index.observer import IndexObserver, notify
from service.index.recipe import EmbeddingRecipe, RecipeLike, check_recipe
from service.index.rwlock import RWLock
from service.index.search import Item, SearchHit, unit_rows
from service.index.searcher import IndexStats, SearchMixin
from service.index.snapshot import FORMAT, cleanup, load_snapshot, read_manifest, write_manifest
from service.index.store import ItemTable, validate_ids, validate_metadata
from service.index.wal import OP_DELETE, OP_UPSERT, WalRecord, WriteAheadLog, encode_delete, encode_upsert, replay

__all__ = ["STRUCTURAL_FIELDS", "Item", "SearchHit", "VectorIndex"]

logger = logging.getLogger(__name__)

# Fields fixed when an index is built; the rest (search knobs, snapshot policy) may be overridden on open.
STRUCTURAL_FIELDS = ("kind", "hnsw_m", "ef_construction", "nlist", "pq_m", "pq_nbits", "train_min")


class VectorIndex(MaintenanceMixin, SearchMixin):
    """Use `create`, `open` or `open_or_create`; close() (or a with-block) snapshots and releases the lock."""

    def __init__(
        self,
        directory: Path,
        manifest: dict[str, Any],
        config: IndexConfig,
        *,
        observer: IndexObserver | None,
        read_only: bool,
        lock_fd: int | None,
    ) -> None:
        self.path = directory
        self._manifest = manifest
        self._config = config
        self._recipe = EmbeddingRecipe.from_dict(manifest["recipe"])
        self._observer = observer
        self.read_only = read_only
        self._lock_fd = lock_fd
        self._mutex = threading.RLock()
        self._rw = RWLock()
        self._faiss: faiss.Index
        self._gpu: faiss.Index | None
        self._table: ItemTable
        self._set_index(new_untrained(config, self._recipe.dim), ItemTable())
        self._lsn = 0  # last applied lsn
        self._wal: WriteAheadLog | None = None
        self._closed = False

    # ------------------------------------------------------------------------------------------------------------
    # Creating and opening
    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        recipe: EmbeddingRecipe,
        config: IndexConfig | None = None,
        *,
        observer: IndexObserver | None = None,
    ) -> VectorIndex:
        """A new, empty index in directory `path` (created; it must not hold an index already)."""
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock(directory)
        try:
            if (directory / "MANIFEST.json").exists():
                raise FileExistsError(f"an index already exists at {directory}; open it instead")
            config = config or IndexConfig()
            manifest = {
                "format": FORMAT,
                "config": config.to_dict(),
                "recipe": recipe.to_dict(),
                "created_at": time.time(),
                "snapshot": None,
            }
            write_manifest(directory, manifest)
            index = cls(directory, manifest, config, observer=observer, read_only=False, lock_fd=lock_fd)
            index._wal = WriteAheadLog(directory, next_lsn=1)
        except BaseException:
            _unlock(lock_fd)
            raise
        logger.info(
            "created %s index at %s (dim %d, recipe %s)", config.kind, directory, recipe.dim, recipe.fingerprint
        )
        return index

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        overrides: Mapping[str, Any] | None = None,
        observer: IndexObserver | None = None,
        read_only: bool = False,
    ) -> VectorIndex:
        """Load the last snapshot and replay the WAL. `overrides` changes search knobs and the snapshot policy
        (not the structure: see STRUCTURAL_FIELDS). read_only takes no lock and never writes (a torn WAL tail is
        skipped, not truncated), for inspecting an index another process serves."""
        directory = Path(path)
        manifest = read_manifest(directory)
        config = IndexConfig.from_dict(manifest["config"])
        if overrides:
            fixed = {k: v for k, v in overrides.items() if k in STRUCTURAL_FIELDS and v != getattr(config, k)}
            if fixed:
                raise ValueError(f"cannot change {sorted(fixed)} of an existing index; rebuild it instead")
            config = config.replace(**dict(overrides))
        lock_fd = None if read_only else _lock(directory)
        try:
            index = cls(directory, manifest, config, observer=observer, read_only=read_only, lock_fd=lock_fd)
            index._load()
        except BaseException:
            _unlock(lock_fd)
            raise
        return index

    @classmethod
    def open_or_create(
        cls,
        path: str | os.PathLike[str],
        recipe: EmbeddingRecipe,
        config: IndexConfig | None = None,
        *,
        observer: IndexObserver | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> VectorIndex:
        """The service's entry point: open the index at `path`, or create it for `recipe`. An existing index keeps
        its own recipe; compare `index.recipe` with the service's and refuse at startup if they differ."""
        if (Path(path) / "MANIFEST.json").exists():
            return cls.open(path, overrides=overrides, observer=observer)
        return cls.create(path, recipe, config, observer=observer)

    def _load(self) -> None:
        started = time.perf_counter()
        snapshot = self._manifest.get("snapshot")
        if not self.read_only:
            cleanup(self.path, self._manifest)
        if snapshot:
            index, table = load_snapshot(self.path, snapshot, verify=self._config.verify_checksums)
            self._set_index(index, table)
            self._lsn = int(snapshot["lsn"])
        replayed = 0
        for record in replay(self.path, self._lsn, truncate_torn_tail=not self.read_only):
            self._apply(record)
            self._lsn = record.lsn
            replayed += 1
            self._maybe_train()
        if not self.read_only:
            self._wal = WriteAheadLog(self.path, next_lsn=self._lsn + 1)
            if replayed:
                # Replayed records are in the WAL but in no snapshot yet: they are pending like fresh writes, so
                # close() and the snapshot timer fold them in (else a clean stop after a crash snapshots nothing
                # and every later start replays them again). Bytes: the segments on disk, an upper bound.
                self._wal.ops_since_rotate = replayed
                self._wal.bytes_since_rotate = self._wal.size_bytes
        logger.info(
            "opened %s index %s: %d items (%d tombstones), snapshot lsn %s, %d WAL records replayed in %.2fs",
            self._config.kind,
            self.path,
            self._table.n_live,
            self._table.n_dead,
            snapshot["lsn"] if snapshot else None,
            replayed,
            time.perf_counter() - started,
        )
        notify(self._observer, "size_changed", self._table.n_live, self._table.n_dead)

    # ------------------------------------------------------------------------------------------------------------
    # Properties
    # ------------------------------------------------------------------------------------------------------------
    @property
    def recipe(self) -> EmbeddingRecipe:
        return self._recipe

    @property
    def config(self) -> IndexConfig:
        return self._config

    @property
    def trained(self) -> bool:
        """False while an IVF index still searches its exact staging index (too few vectors to train)."""
        return not self._config.needs_training or isinstance(self._faiss, faiss.IndexIVF | faiss.IndexRefine)

    def __len__(self) -> int:
        return self._table.n_live

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._table

    def check_recipe(self, recipe: RecipeLike, action: str = "use this index") -> None:
        """Raise RecipeMismatchError unless `recipe` (or a fingerprint) matches the index's."""
        check_recipe(self._recipe, recipe, action)

    # ------------------------------------------------------------------------------------------------------------
    # Mutations
    # ------------------------------------------------------------------------------------------------------------
    def upsert(
        self,
        ids: Sequence[str],
        vectors: Any,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        *,
        recipe: RecipeLike,
    ) -> int:
        """Add items, replacing any with the same id (vector and metadata). Durable when it returns.
        vectors: (n, dim) raw embeddings (normalised here). Returns how many ids replaced existing items."""
        started = time.perf_counter()
        check_recipe(self._recipe, recipe, "add to this index")
        vecs = unit_rows(vectors, self._recipe.dim)
        ids = validate_ids([ids] if isinstance(ids, str) else ids)
        if len(ids) != vecs.shape[0]:
            raise InvalidVectorError(f"{len(ids)} ids for {vecs.shape[0]} vectors")
        metas = validate_metadata(metadata, len(ids))
        with self._mutex:
            wal = self._writable()
            lsn = wal.append(encode_upsert(ids, vecs, metas))
            replaced = self._apply(WalRecord(lsn, OP_UPSERT, ids, metas, vecs))
            self._lsn = lsn
            self._after_write()
        notify(self._observer, "added", len(ids), time.perf_counter() - started)
        notify(self._observer, "size_changed", self._table.n_live, self._table.n_dead)
        return replaced

    def delete(self, ids: Sequence[str]) -> int:
        """Delete items by id; ids not present are ignored. Durable when it returns. Returns how many existed."""
        wanted = validate_ids(list(dict.fromkeys([ids] if isinstance(ids, str) else ids)), new=False)
        with self._mutex:
            wal = self._writable()
            present = [i for i in wanted if i in self._table]
            if present:
                lsn = wal.append(encode_delete(present))
                self._apply(WalRecord(lsn, OP_DELETE, present, [None] * len(present), None))
                self._lsn = lsn
                self._after_write()
        notify(self._observer, "deleted", len(present))
        notify(self._observer, "size_changed", self._table.n_live, self._table.n_dead)
        return len(present)

    def _writable(self) -> WriteAheadLog:
        if self._closed:
            raise VectorIndexError(f"index {self.path} is closed")
        if self.read_only or self._wal is None:
            raise IndexReadOnlyError(f"index {self.path} was opened read-only")
        return self._wal

    def _apply(self, record: WalRecord) -> int:
        """Apply one logged mutation to memory (live path and replay alike). Returns the replaced/deleted count."""
        table = self._table
        with self._rw.write():
            hit = sum(table.tombstone(i) is not None for i in record.ids)
            if record.op == OP_UPSERT:
                assert record.vectors is not None
                table.append(record.ids, record.metas)
                self._faiss.add(record.vectors)
                if self._gpu is not None:
                    self._gpu.add(record.vectors)
        return hit

    def _after_write(self) -> None:
        """Housekeeping a write may trigger: IVF training, an automatic snapshot. The write is already durable, so
        a failure here (disk full, out of memory) is logged and retried after a later write, never raised to a
        caller whose data is safe in the WAL."""
        wal = self._wal
        cfg = self._config
        try:
            self._maybe_train()
            if wal is not None and (
                (cfg.snapshot_every_ops and wal.ops_since_rotate >= cfg.snapshot_every_ops)
                or (cfg.snapshot_every_bytes and wal.bytes_since_rotate >= cfg.snapshot_every_bytes)
            ):
                self._snapshot_locked(compact=None)
        except Exception:
            logger.exception("index housekeeping after a write failed; the write itself is durable in the WAL")

    # ------------------------------------------------------------------------------------------------------------
    # Reading items and stats (searching lives in SearchMixin)
    # ------------------------------------------------------------------------------------------------------------
    def get(self, item_id: str, *, with_vector: bool = False) -> Item:
        with self._rw.read():
            row = self._table.row_of.get(item_id)
            if row is None:
                raise ItemNotFoundError(item_id)
            vector = reconstruct_rows(self._faiss, np.array([row]))[0] if with_vector else None
            return Item(item_id, self._table.meta.get(row), vector)

    def stats(self) -> IndexStats:
        with self._rw.read():
            snap = self._manifest.get("snapshot") or {}
            wal = self._wal
            return IndexStats(
                path=str(self.path),
                kind=self._config.kind,
                faiss_class=type(self._faiss).__name__,
                dim=self._recipe.dim,
                count=self._table.n_live,
                tombstones=self._table.n_dead,
                trained=self.trained,
                recipe=self._recipe.to_dict(),
                params={
                    "ef_search": self._config.ef_search,
                    "nprobe": self._config.nprobe,
                    "nlist": getattr(ivf_of(self._faiss), "nlist", None),
                },
                lsn=self._lsn,
                snapshot_lsn=snap.get("lsn"),
                last_snapshot_at=snap.get("written_at"),
                wal_ops_pending=wal.ops_since_rotate if wal else 0,
                wal_bytes=wal.bytes_since_rotate if wal else 0,
                read_only=self.read_only,
                gpu=self._gpu is not None,
            )

    # ------------------------------------------------------------------------------------------------------------
    # Closing
    # ------------------------------------------------------------------------------------------------------------
    def close(self, *, snapshot: bool = True) -> None:
        """Snapshot pending WAL records (so the next open replays nothing) and release the lock. Idempotent."""
        with self._mutex:
            if self._closed:
                return
            try:
                if snapshot and self._wal is not None and self._wal.ops_since_rotate:
                    self._snapshot_locked(compact=None)
            finally:
                if self._wal is not None:
                    self._wal.close()
                _unlock(self._lock_fd)
                self._lock_fd = None
                self._closed = True

    def __enter__(self) -> VectorIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lock(directory: Path) -> int:
    """One writing process per index directory (flock: released by the kernel even on kill -9)."""
    fd = os.open(directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise IndexLockedError(
            f"index {directory} is open for writing elsewhere (another process, or this one)"
        ) from None
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
