"""A clean close after a crash folds the replayed WAL records into a snapshot (docs/SERVICE.md: "the next start
replays nothing"), and the replayed records count as pending for the snapshot timer and GET /index."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from service.index import EmbeddingRecipe, VectorIndex
from tests.index.conftest import clustered, small_config


def _crashed_index(directory: Path, recipe: EmbeddingRecipe, n: int) -> None:
    """Adds acknowledged in the WAL, no snapshot of them: what kill -9 leaves (close without snapshot)."""
    index = VectorIndex.create(directory, recipe, small_config("flat"))
    index.upsert([f"item-{i}" for i in range(n)], clustered(n), recipe=recipe)
    index.close(snapshot=False)


def test_clean_close_after_a_crash_snapshots_the_replayed_records(
    index_dir: Path, recipe: EmbeddingRecipe, caplog: pytest.LogCaptureFixture
) -> None:
    _crashed_index(index_dir, recipe, 12)
    with VectorIndex.open(index_dir) as index:
        stats = index.stats()
        assert stats.lsn > (stats.snapshot_lsn or 0)
        assert stats.wal_ops_pending > 0  # the snapshot timer and GET /index see the replayed records as pending
    # Clean shutdown happened: the next open loads them from the snapshot and replays nothing.
    with caplog.at_level(logging.INFO, logger="service.index.index"), VectorIndex.open(index_dir) as index:
        stats = index.stats()
        assert len(index) == 12 and stats.snapshot_lsn == stats.lsn and stats.wal_ops_pending == 0
    assert any("0 WAL records replayed" in r.getMessage() for r in caplog.records), caplog.text
