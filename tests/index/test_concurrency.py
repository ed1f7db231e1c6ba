"""Searches run while adds, deletes and snapshots happen, from several threads, without errors or wrong answers."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from service.index import EmbeddingRecipe
from tests.index.conftest import clustered


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_concurrent_search_during_writes(make_index, recipe: EmbeddingRecipe, kind: str) -> None:
    index = make_index(kind, snapshot_every_ops=15, train_min=300)
    vectors = clustered(1200, seed=3)
    ids = [f"v{i}" for i in range(len(vectors))]
    index.upsert(ids[:200], vectors[:200], recipe=recipe)
    acked = 200  # ids[:acked] are acknowledged: every search that starts later must see them
    deleted: set[str] = set()  # acknowledged deletes: never returned by a search that starts later
    deleting: set[str] = set()  # deletes started (acknowledged or not)
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []
    searches = [0]

    def writer() -> None:
        nonlocal acked
        try:
            for start in range(200, len(vectors), 40):
                index.upsert(ids[start : start + 40], vectors[start : start + 40], recipe=recipe)
                with lock:
                    acked = start + 40
                victim = ids[start - 150]
                with lock:
                    deleting.add(victim)  # visible to searches from the moment it is applied, before the ack
                index.delete([victim])
                with lock:
                    deleted.add(victim)
        except BaseException as exc:
            errors.append(exc)
        finally:
            stop.set()

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                with lock:
                    known, gone = acked, set(deleted)
                rows = rng.integers(0, known, size=4)
                hits = index.search(vectors[rows], k=3, recipe=recipe)
                with lock:
                    maybe_gone = set(deleting)  # deletes in flight during the search may or may not show
                for row, found in zip(rows, hits, strict=True):
                    assert not {h.id for h in found} & gone, "a deleted item came back"
                    if ids[row] not in maybe_gone:
                        assert found[0].id == ids[row] and found[0].score > 0.999, (ids[row], found[:1])
                    assert [h.score for h in found] == sorted((h.score for h in found), reverse=True)
                searches[0] += 1
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[0]
    assert time.monotonic() - started < 60 and searches[0] > 10
    assert len(index) == len(vectors) - len(deleted)
    assert index.trained
