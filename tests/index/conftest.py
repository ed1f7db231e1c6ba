"""Fixtures for the index tests: a recipe, clustered unit vectors shaped like embeddings, small configs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from service.index import EmbeddingRecipe, IndexConfig, VectorIndex

DIM = 32


def clustered(n: int, dim: int = DIM, seed: int = 0, clusters: int = 8) -> np.ndarray:
    """Unit vectors around a few centres (like embeddings of a photo collection), never uniform noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def small_config(kind: str, **changes: object) -> IndexConfig:
    """Small-collection settings: IVF trains at 200 vectors; IVF-PQ with 8 sub-quantisers of 4 dims and a wide
    re-rank (a few hundred vectors only train 5-bit codebooks)."""
    base = {
        "kind": kind,
        "train_min": 200,
        "pq_m": 8,
        "refine_factor": 8,
        "nprobe": 64,
        "ef_search": 64,
        "hnsw_m": 16,
        "ef_construction": 64,
    }
    base.update(changes)
    return IndexConfig(**base)


@pytest.fixture
def recipe() -> EmbeddingRecipe:
    return EmbeddingRecipe(model_sha256="ab" * 32, pooling="mean", dim=DIM, model_id="test-model")


@pytest.fixture
def other_recipe() -> EmbeddingRecipe:
    return EmbeddingRecipe(model_sha256="cd" * 32, pooling="mean", dim=DIM, model_id="other-model")


@pytest.fixture(params=["flat", "hnsw", "ivf", "ivfpq"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def index_dir(tmp_path: Path) -> Path:
    return tmp_path / "index"


@pytest.fixture
def make_index(index_dir: Path, recipe: EmbeddingRecipe) -> Iterator:
    opened: list[VectorIndex] = []

    def make(kind: str = "flat", **changes: object) -> VectorIndex:
        index = VectorIndex.create(index_dir, recipe, small_config(kind, **changes))
        opened.append(index)
        return index

    yield make
    for index in opened:
        index.close(snapshot=False)
