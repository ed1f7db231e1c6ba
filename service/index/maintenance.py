"""Training, compaction and snapshots of a VectorIndex (mixed in). Every method here runs with the writer mutex
held, so no mutation interleaves; the slow part (k-means, re-adding vectors, writing files) only reads the live
structures, so searches continue, and the write lock is taken just for the final swap.

Snapshot order (the crash analysis is in snapshot.py): write the snapshot files, replace MANIFEST.json (the commit
point), rotate the WAL (a new segment at lsn+1, then delete the old ones), delete the previous snapshot's files.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from service.index.faiss_ops import (
    auto_nlist,
    new_untrained,
    reconstruct_rows,
    to_gpu,
    train_index,
    training_sample_size,
)
from service.index.observer import notify
from service.index.snapshot import cleanup, write_manifest, write_snapshot

if TYPE_CHECKING:
    from service.index.config import IndexConfig
    from service.index.observer import IndexObserver
    from service.index.recipe import EmbeddingRecipe
    from service.index.rwlock import RWLock
    from service.index.store import ItemTable
    from service.index.wal import WriteAheadLog

__all__ = ["ADD_CHUNK", "MaintenanceMixin", "ivf_of"]

logger = logging.getLogger(__name__)

ADD_CHUNK = 65_536  # rows per reconstruct/add during rebuilds: bounds the transient copy


class MaintenanceMixin:
    path: Path
    _mutex: threading.RLock
    _rw: RWLock
    _faiss: faiss.Index
    _gpu: faiss.Index | None
    _table: ItemTable
    _config: IndexConfig
    _recipe: EmbeddingRecipe
    _observer: IndexObserver | None
    _manifest: dict[str, Any]
    _wal: WriteAheadLog | None
    _lsn: int
    trained: bool

    def _writable(self) -> WriteAheadLog:
        raise NotImplementedError

    def _maybe_train(self) -> None:
        if not self.trained and self._table.n_live >= self._config.train_min:
            self._train_locked()

    def train(self) -> bool:
        """Train an IVF index now on the vectors it holds (the builder calls this at the end of a small build).
        Returns False when there is nothing to do (not an IVF kind, already trained, or empty)."""
        with self._mutex:
            self._writable()
            if self.trained or self._table.n_live == 0:
                return False
            self._train_locked()
            return True

    def _train_locked(self) -> None:
        """Train on a sample of the live vectors, then move every live vector into the trained index (dropping
        tombstones). Searches use the old index until the swap."""
        started = time.perf_counter()
        table, keep = self._table.compacted()
        # A fixed seed: replaying the same WAL trains the same sample.
        rng = np.random.default_rng(0)
        size = training_sample_size(keep.size, self._config)
        sample = np.sort(rng.choice(keep, size=size, replace=False)) if size < keep.size else keep
        index = train_index(self._config, reconstruct_rows(self._faiss, sample), n_total=keep.size)
        for start in range(0, keep.size, ADD_CHUNK):
            index.add(reconstruct_rows(self._faiss, keep[start : start + ADD_CHUNK]))
        with self._rw.write():
            self._set_index(index, table)
        logger.info(
            "trained %s (nlist %d) on %d of %d vectors in %.2fs",
            self._config.kind,
            ivf_of(index).nlist,
            sample.size,
            keep.size,
            time.perf_counter() - started,
        )

    def _outgrown(self) -> bool:
        """An IVF index trained on a small collection keeps few, ever longer lists; once the collection supports
        twice the lists it has, a snapshot retrains it."""
        ivf = ivf_of(self._faiss)
        if ivf is None:
            return False
        return auto_nlist(self._table.n_live, self._config.nlist) >= 2 * ivf.nlist

    def _rebuilt_empty(self) -> faiss.Index:
        if isinstance(self._faiss, faiss.IndexIVF | faiss.IndexRefine):
            # Keep the trained quantisers: reset() drops the vectors only.
            index = faiss.clone_index(self._faiss)
            index.reset()
            return index
        return new_untrained(self._config, self._recipe.dim)

    def _compact_locked(self) -> None:
        started = time.perf_counter()
        dropped = self._table.n_dead
        table, keep = self._table.compacted()
        index = self._rebuilt_empty()
        for start in range(0, keep.size, ADD_CHUNK):
            index.add(reconstruct_rows(self._faiss, keep[start : start + ADD_CHUNK]))
        with self._rw.write():
            self._set_index(index, table)
        logger.info("compacted: %d tombstones dropped in %.2fs", dropped, time.perf_counter() - started)
        notify(self._observer, "size_changed", table.n_live, 0)

    def compact(self) -> None:
        """Rebuild without tombstones and snapshot now."""
        with self._mutex:
            self._writable()
            self._snapshot_locked(compact=True, force=True)

    def snapshot(self) -> dict[str, Any]:
        """Fold the WAL into a new snapshot now (compacting when tombstones exceed compact_ratio)."""
        with self._mutex:
            self._writable()
            return self._snapshot_locked(compact=None)

    def _snapshot_locked(self, *, compact: bool | None, force: bool = False) -> dict[str, Any]:
        wal = self._wal
        assert wal is not None
        current = self._manifest.get("snapshot")
        if compact is None:
            compact = self._table.n_dead > self._config.compact_ratio * max(self._table.n_rows, 1)
        if current and current["lsn"] == self._lsn and not compact and not force:
            return current
        started = time.perf_counter()
        if self._outgrown():
            self._train_locked()  # retraining rebuilds without tombstones too
        elif compact and self._table.n_dead:
            self._compact_locked()
        section = write_snapshot(self.path, self._lsn, self._faiss, self._table)
        manifest = {**self._manifest, "snapshot": section}
        write_manifest(self.path, manifest)  # the commit point
        self._manifest = manifest
        wal.rotate()
        cleanup(self.path, manifest)
        notify(self._observer, "snapshotted", time.perf_counter() - started, self._lsn, sum(section["bytes"].values()))
        return section

    def _set_index(self, index: faiss.Index, table: ItemTable) -> None:
        self._faiss = index
        self._table = table
        self._gpu = to_gpu(index) if self._config.use_gpu else None


def ivf_of(index: faiss.Index) -> Any:
    if isinstance(index, faiss.IndexRefine):
        return faiss.downcast_index(index.base_index)
    return index if isinstance(index, faiss.IndexIVF) else None
