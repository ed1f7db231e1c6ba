"""Durability: kill -9 mid-burst loses no acknowledged write; torn WAL tails are dropped; crashes inside a snapshot
leave a whole index; damage before the WAL's tail is reported, never papered over."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.index import EmbeddingRecipe, IndexCorruptError, VectorIndex, maintenance
from service.index.wal import WriteAheadLog, segments
from tests.index.conftest import clustered, small_config

REPO = Path(__file__).resolve().parents[2]


def _run_and_kill(directory: Path, start: int, acks_before_kill: int) -> tuple[set[str], set[str], int]:
    """Run the writer child, SIGKILL it after `acks_before_kill` acknowledgements. Returns (acked adds, acked
    deletes, last acknowledged batch)."""
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.index.crash_writer", str(directory), str(start)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    added: set[str] = set()
    deleted: set[str] = set()
    last_batch = start - 1

    def record(line: str) -> None:
        nonlocal last_batch
        kind, _, rest = line.strip().partition(" ")
        if kind == "add":
            ids = rest.split()
            added.update(ids)
            last_batch = int(ids[0].split("-")[0][1:])
        elif kind == "del":
            deleted.add(rest)

    assert child.stdout is not None
    try:
        for count, line in enumerate(child.stdout, start=1):
            record(line)
            if count >= acks_before_kill:
                os.kill(child.pid, signal.SIGKILL)
                break
        for line in child.stdout:  # lines written before the kill are acknowledgements too
            record(line)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    return added, deleted, last_batch


def test_kill9_mid_burst_loses_no_acknowledged_write(tmp_path: Path) -> None:
    directory = tmp_path / "index"
    rng = random.Random(1234)
    all_added: set[str] = set()
    all_deleted: set[str] = set()
    start = 0
    for _ in range(3):  # crash, recover and continue, three times over the same index
        added, deleted, last = _run_and_kill(directory, start, acks_before_kill=rng.randint(25, 70))
        all_added |= added
        all_deleted |= deleted
        # Unacknowledged, so either outcome is right: the next batch's add, or the last batch's delete.
        in_flight = {f"b{last + 1}-{j}" for j in range(8)}
        maybe_deleted = {f"b{last}-0"} if last % 3 == 0 else set()
        with VectorIndex.open(directory) as index:
            present = {i for i in all_added | in_flight if i in index}
            assert (all_added - all_deleted - maybe_deleted) <= present, "an acknowledged add was lost"
            assert not (all_deleted & present), "an acknowledged delete was lost"
            assert len(index) <= len(all_added | in_flight), "items that were never written appeared"
            # The recovered index answers correctly, not just holds ids.
            sample = sorted(all_added - all_deleted)[:5]
            for item_id in sample:
                vector = index.get(item_id, with_vector=True).vector
                assert index.search(vector, k=1, recipe=index.recipe)[0][0].id == item_id
            # What recovery kept of the unacknowledged operation is settled from now on.
            all_added |= in_flight & present
            all_deleted |= {i for i in maybe_deleted if i not in index}
        start = last + 2


def _filled(directory: Path, recipe: EmbeddingRecipe, batches: int = 3) -> np.ndarray:
    vectors = clustered(30)
    index = VectorIndex.create(directory, recipe, small_config("hnsw", snapshot_every_ops=0))
    for b in range(batches):
        index.upsert([f"i{b}-{j}" for j in range(10)], vectors[b * 10 : (b + 1) * 10], recipe=recipe)
    index.close(snapshot=False)  # a crash: everything only in the WAL
    return vectors


def test_torn_wal_tail_is_dropped_and_logged(
    index_dir: Path, recipe: EmbeddingRecipe, caplog: pytest.LogCaptureFixture
) -> None:
    vectors = _filled(index_dir, recipe)
    ((_, wal_path),) = segments(index_dir)
    size = wal_path.stat().st_size
    with open(wal_path, "rb+") as fh:  # the last append was cut short by the crash
        fh.truncate(size - 17)
    with caplog.at_level(logging.WARNING), VectorIndex.open(index_dir) as index:
        assert "torn tail" in caplog.text
        assert len(index) == 20 and "i1-9" in index and "i2-0" not in index
        index.upsert(["after"], vectors[25:26], recipe=recipe)  # appends after the cut, not after garbage
        index.close(snapshot=False)
    with VectorIndex.open(index_dir) as index:
        assert len(index) == 21 and "after" in index


def test_zero_filled_tail_is_dropped(index_dir: Path, recipe: EmbeddingRecipe) -> None:
    _filled(index_dir, recipe)
    ((_, wal_path),) = segments(index_dir)
    with open(wal_path, "ab") as fh:  # a file extended by the filesystem but whose data never reached the disk
        fh.write(b"\0" * 4096)
    with VectorIndex.open(index_dir) as index:
        assert len(index) == 30


def test_damage_before_the_tail_is_corruption(index_dir: Path, recipe: EmbeddingRecipe) -> None:
    _filled(index_dir, recipe)
    ((_, wal_path),) = segments(index_dir)
    data = bytearray(wal_path.read_bytes())
    data[40] ^= 0xFF  # inside the first record's payload, with two good records after it
    wal_path.write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError, match="damaged"):
        VectorIndex.open(index_dir)


def test_crash_inside_snapshot_keeps_a_whole_index(
    index_dir: Path, recipe: EmbeddingRecipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    vectors = _filled(index_dir, recipe)
    index = VectorIndex.open(index_dir)
    index.delete(["i0-0"])

    # 1. Snapshot files written, manifest not yet replaced: the old manifest (no snapshot) + the WAL still hold all.
    def no_commit(*args: object) -> None:
        raise OSError("simulated crash before the manifest rename")

    monkeypatch.setattr(maintenance, "write_manifest", no_commit)
    with pytest.raises(OSError, match="simulated"):
        index.snapshot()
    index.close(snapshot=False)
    monkeypatch.undo()
    assert any(p.name.startswith("snap-") for p in index_dir.iterdir())  # orphans from the "crash"
    index = VectorIndex.open(index_dir)
    assert len(index) == 29 and "i0-0" not in index
    assert not any(p.name.startswith("snap-") for p in index_dir.iterdir())  # cleaned on open

    # 2. Manifest committed, WAL not yet rotated: replay must skip what the snapshot already holds.
    def no_rotate(self: WriteAheadLog) -> None:
        raise OSError("simulated crash before the WAL rotation")

    monkeypatch.setattr(WriteAheadLog, "rotate", no_rotate)
    with pytest.raises(OSError, match="simulated"):
        index.snapshot()
    index.close(snapshot=False)
    monkeypatch.undo()
    with VectorIndex.open(index_dir) as index:
        assert len(index) == 29 and "i0-0" not in index and index.stats().tombstones <= 1
        assert index.search(vectors[5], k=1, recipe=recipe)[0][0].id == "i0-5"
        index.upsert(["new"], vectors[:1], recipe=recipe)
    with VectorIndex.open(index_dir) as index:
        assert len(index) == 30 and "new" in index
        assert [p.name for p in index_dir.iterdir() if p.name.startswith("wal-")] == [segments(index_dir)[-1][1].name]


def test_snapshot_checksum_is_verified(index_dir: Path, recipe: EmbeddingRecipe) -> None:
    _filled(index_dir, recipe)
    with VectorIndex.open(index_dir) as index:
        index.snapshot()
    items = next(p for p in index_dir.iterdir() if p.name.endswith(".items.json"))
    items.write_text(items.read_text().replace("i0-1", "i0-X"))
    with pytest.raises(IndexCorruptError, match="sha256"):
        VectorIndex.open(index_dir)


def test_failed_automatic_snapshot_does_not_fail_the_write(
    index_dir: Path, recipe: EmbeddingRecipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(maintenance, "write_snapshot", disk_full)
    vectors = clustered(4)
    index = VectorIndex.create(index_dir, recipe, small_config("flat", snapshot_every_ops=1))
    index.upsert(["a", "b"], vectors[:2], recipe=recipe)  # its automatic snapshot fails: logged, not raised
    index.delete("a")
    index.close(snapshot=False)
    monkeypatch.undo()
    with VectorIndex.open(index_dir) as again:
        assert "b" in again and "a" not in again and len(again) == 1
