"""The index's API on every kind: add/search, delete, upsert, restart, filters, recipes, validation, stats."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import faiss
import numpy as np
import pytest

from service.index import (
    EmbeddingRecipe,
    IndexLockedError,
    IndexObserver,
    IndexReadOnlyError,
    InvalidMetadataError,
    InvalidRequestError,
    InvalidVectorError,
    ItemNotFoundError,
    RecipeMismatchError,
    VectorIndex,
    maintenance,
)
from service.index import searcher as searcher_module
from tests.index.conftest import DIM, clustered, small_config

N = 400  # above train_min (200): IVF kinds are trained by the time we search


def ids_of(n: int, prefix: str = "item") -> list[str]:
    return [f"{prefix}/{i:04d}.jpg" for i in range(n)]


def fill(index: VectorIndex, recipe: EmbeddingRecipe, n: int = N, seed: int = 0) -> np.ndarray:
    vectors = clustered(n, seed=seed)
    metas = [{"album": f"a{i % 4}", "even": i % 2 == 0} for i in range(n)]
    # Raw, unnormalised input (the backend's "embedding" output): the index normalises.
    index.upsert(ids_of(n), vectors * 3.0, metas, recipe=recipe)
    return vectors


def test_add_then_search_finds_it(make_index, recipe: EmbeddingRecipe, kind: str) -> None:
    index = make_index(kind)
    vectors = fill(index, recipe)
    assert index.trained and len(index) == N
    hits = index.search(vectors[:20], k=5, recipe=recipe)
    assert [h[0].id for h in hits] == ids_of(N)[:20]
    assert all(abs(h[0].score - 1.0) < 1e-3 for h in hits)
    assert hits[0][0].metadata == {"album": "a0", "even": True}
    assert all(len(h) == 5 and h[0].score >= h[-1].score for h in hits)


def test_delete_removes_it(make_index, recipe: EmbeddingRecipe, kind: str) -> None:
    index = make_index(kind)
    vectors = fill(index, recipe)
    gone = ids_of(N)[:10]
    assert index.delete([*gone, "never-added"]) == 10
    assert index.delete(gone) == 0  # idempotent
    assert len(index) == N - 10 and gone[0] not in index
    for hits in index.search(vectors[:10], k=10, recipe=recipe):
        assert not {h.id for h in hits} & set(gone)
        assert len(hits) == 10
    with pytest.raises(ItemNotFoundError):
        index.get(gone[0])


def test_upsert_replaces_vector_and_metadata(make_index, recipe: EmbeddingRecipe, kind: str) -> None:
    index = make_index(kind)
    vectors = fill(index, recipe)
    target = ids_of(N)[3]
    new_vector = clustered(1, seed=99)[0]
    assert index.upsert([target], new_vector[None], [{"album": "new"}], recipe=recipe) == 1
    assert len(index) == N
    top = index.search(new_vector, k=1, recipe=recipe)[0][0]
    assert top.id == target and top.metadata == {"album": "new"}
    old = index.search(vectors[3], k=3, recipe=recipe)[0]
    assert all(h.id != target or h.score < 0.999 for h in old)
    assert np.allclose(index.get(target, with_vector=True).vector, new_vector, atol=1e-5)


def test_restart_keeps_everything(index_dir: Path, make_index, recipe: EmbeddingRecipe, kind: str) -> None:
    index = make_index(kind)
    vectors = fill(index, recipe)
    index.delete(ids_of(N)[:5])
    index.snapshot()
    index.upsert(["late"], vectors[7:8], [{"late": True}], recipe=recipe)  # only in the WAL
    index.close(snapshot=False)
    with VectorIndex.open(index_dir) as again:
        assert len(again) == N - 5 + 1 and again.trained
        assert again.stats().wal_ops_pending == 1  # pending counts from the snapshot's lsn: "late", replayed
        hits = again.search(vectors[5:8], k=2, recipe=recipe)
        assert [h[0].id for h in hits[:2]] == ids_of(N)[5:7]
        assert {h.id for h in hits[2]} == {ids_of(N)[7], "late"}
        assert again.get("late").metadata == {"late": True}
        assert ids_of(N)[0] not in again


def test_metadata_filter(make_index, recipe: EmbeddingRecipe, monkeypatch: pytest.MonkeyPatch) -> None:
    index = make_index("hnsw")
    vectors = fill(index, recipe)
    for exact_max in (4096, 10):  # the exact-subset path, then the FAISS IDSelector path
        monkeypatch.setattr(searcher_module, "EXACT_FILTER_MAX", exact_max)
        hits = index.search(vectors[:4], k=7, recipe=recipe, where={"album": "a1", "even": False})
        for row in hits:
            assert len(row) == 7
            assert all(h.metadata == {"album": "a1", "even": False} for h in row)
        assert hits[1][0].id == ids_of(N)[1]  # item 1 is in album a1 and odd: itself first
    assert index.search(vectors[:1], k=3, recipe=recipe, where={"album": "nope"}) == [[]]
    assert index.search(vectors[:1], k=3, recipe=recipe, where={"even": 1}) == [[]]  # JSON: 1 is not true
    by_id = index.search_by_id(ids_of(N)[2], k=4, where={"album": "a2"})
    assert len(by_id) == 4 and ids_of(N)[2] not in {h.id for h in by_id}
    with pytest.raises(InvalidMetadataError):
        index.search(vectors[:1], k=3, recipe=recipe, where={"x": float("nan")})


def test_search_by_id_and_threshold(make_index, recipe: EmbeddingRecipe) -> None:
    index = make_index("flat")
    fill(index, recipe)
    hits = index.search_by_id(ids_of(N)[0], k=5, include_self=True)
    assert hits[0].id == ids_of(N)[0] and len(hits) == 5
    assert ids_of(N)[0] not in {h.id for h in index.search_by_id(ids_of(N)[0], k=5)}
    strict = index.search_by_id(ids_of(N)[0], k=50, score_threshold=0.9)
    assert all(h.score >= 0.9 for h in strict) and len(strict) < 50
    with pytest.raises(ItemNotFoundError):
        index.search_by_id("missing", k=3)


def test_recipe_mismatch_refused(
    index_dir: Path, make_index, recipe: EmbeddingRecipe, other_recipe: EmbeddingRecipe
) -> None:
    index = make_index("flat")
    fill(index, recipe, n=20)
    vec = clustered(1)
    with pytest.raises(RecipeMismatchError, match="model_sha256") as info:
        index.upsert(["x"], vec, recipe=other_recipe)
    assert info.value.http_status == 409 and info.value.expected["fingerprint"] == recipe.fingerprint
    with pytest.raises(RecipeMismatchError):
        index.search(vec, k=1, recipe=other_recipe.fingerprint)
    wider = EmbeddingRecipe(model_sha256=recipe.model_sha256, pooling="probe", dim=DIM)
    with pytest.raises(RecipeMismatchError, match="pooling"):
        index.search(vec, k=1, recipe=wider)
    assert index.search(vec, k=1, recipe=recipe.fingerprint)[0]  # a fingerprint string is accepted
    # Informational fields (backend, precision) do not change the identity.
    onnx = dataclasses.replace(recipe, backend="onnxruntime", precision="fp16")
    assert onnx.fingerprint == recipe.fingerprint
    assert EmbeddingRecipe.from_dict(recipe.to_dict()) == recipe
    index.close()
    reopened = VectorIndex.open_or_create(index_dir, other_recipe)
    try:
        assert reopened.recipe == recipe  # an existing index keeps its recipe; the service compares at startup
        with pytest.raises(RecipeMismatchError):
            reopened.check_recipe(other_recipe)
    finally:
        reopened.close()


def test_invalid_input_is_refused(make_index, recipe: EmbeddingRecipe) -> None:
    index = make_index("flat")
    good = clustered(2)
    bad_cases = [
        (["a", "b"], np.zeros((2, DIM)), InvalidVectorError),  # no direction
        (["a", "b"], good[:, :8], InvalidVectorError),  # wrong width
        (["a", "b"], np.full((2, DIM), np.nan), InvalidVectorError),
        (["a", "a"], good, InvalidVectorError),  # duplicate ids
        (["a"], good, InvalidVectorError),  # count mismatch
        (["", "b"], good, InvalidVectorError),
    ]
    for ids, vectors, error in bad_cases:
        with pytest.raises(error):
            index.upsert(ids, vectors, recipe=recipe)
    with pytest.raises(InvalidMetadataError):
        index.upsert(["a", "b"], good, [{"x": object()}, None], recipe=recipe)
    with pytest.raises(InvalidRequestError):
        index.search(good, k=0, recipe=recipe)
    assert len(index) == 0 and index.stats().lsn == 0  # nothing refused reached the WAL
    assert index.search(good, k=3, recipe=recipe) == [[], []]


def test_ivf_staging_then_training_then_compaction(make_index, recipe: EmbeddingRecipe) -> None:
    index = make_index("ivf", train_min=300, compact_ratio=0.1)
    vectors = clustered(500)
    index.upsert(ids_of(500)[:250], vectors[:250], recipe=recipe)
    assert not index.trained  # searches the exact staging index until 300 vectors
    assert index.search(vectors[0], k=1, recipe=recipe)[0][0].id == ids_of(500)[0]
    index.delete(ids_of(500)[:10])
    index.upsert(ids_of(500)[250:], vectors[250:], recipe=recipe)
    assert index.trained and index.stats().faiss_class == "IndexIVFFlat" and index.stats().tombstones == 0
    index.delete(ids_of(500)[10:100])
    assert index.stats().tombstones == 90
    index.snapshot()  # 90 / 490 rows dead > 10%: compacts
    stats = index.stats()
    assert stats.tombstones == 0 and stats.count == 400
    assert index.search(vectors[100:110], k=1, recipe=recipe)[0][0].id == ids_of(500)[100]
    assert index.recall_self_check(k=5, sample=50, seed=0) > 0.9


def test_observer_stats_and_locks(index_dir: Path, recipe: EmbeddingRecipe) -> None:
    events: list[tuple] = []

    class Recorder(IndexObserver):
        def searched(self, seconds, queries, top1_scores):
            events.append(("searched", queries, len(top1_scores)))

        def added(self, count, seconds):
            events.append(("added", count))

        def deleted(self, count):
            events.append(("deleted", count))

        def size_changed(self, live, tombstones):
            events.append(("size", live, tombstones))

        def snapshotted(self, seconds, lsn, size_bytes):
            raise RuntimeError("a broken metrics hook must not fail the index")

    index = VectorIndex.create(index_dir, recipe, small_config("hnsw"), observer=Recorder())
    try:
        vectors = fill(index, recipe, n=30)
        index.search(vectors[:3], k=2, recipe=recipe)
        index.delete(["item/0000.jpg"])
        index.snapshot()
        assert ("added", 30) in events and ("searched", 3, 3) in events and ("deleted", 1) in events
        assert ("size", 29, 1) in events
        stats = index.stats().to_dict()
        assert stats["count"] == 29 and stats["kind"] == "hnsw" and stats["recipe"]["dim"] == DIM
        assert stats["snapshot_lsn"] == stats["lsn"] == 2 and stats["last_snapshot_at"] is not None
        with pytest.raises(IndexLockedError):
            VectorIndex.open(index_dir)
        with VectorIndex.open(index_dir, read_only=True) as reader:
            assert len(reader) == 29
            with pytest.raises(IndexReadOnlyError):
                reader.delete(["item/0001.jpg"])
        with pytest.raises(ValueError, match="kind"):
            VectorIndex.open(index_dir, overrides={"kind": "flat"})
    finally:
        index.close()
    with VectorIndex.open(index_dir, overrides={"ef_search": 256}) as again:
        assert again.config.ef_search == 256 and len(again) == 29


def test_gpu_mirror_path(make_index, recipe: EmbeddingRecipe, monkeypatch: pytest.MonkeyPatch) -> None:
    """faiss-gpu is absent here: a CPU clone stands in for the GPU copy, to check the mirror is kept in step."""
    monkeypatch.setattr(maintenance, "to_gpu", lambda index: faiss.clone_index(index))
    index = make_index("flat", use_gpu=True)
    vectors = fill(index, recipe, n=50)
    assert index.stats().gpu and index._gpu.ntotal == 50
    assert index.search(vectors[:5], k=1, recipe=recipe)[0][0].id == ids_of(50)[0]
    index.delete([ids_of(50)[0]])  # tombstones: searched on the CPU index with a selector
    assert index.search(vectors[:1], k=1, recipe=recipe)[0][0].id != ids_of(50)[0]
