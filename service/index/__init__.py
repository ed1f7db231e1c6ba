"""FAISS retrieval for the service: a durable, thread-safe vector index and its offline builder.

    index = VectorIndex.open_or_create(path, EmbeddingRecipe.from_backend(backend.info), IndexConfig(kind="hnsw"))
    index.upsert(ids, vectors, metadata, recipe=recipe)        # durable on return
    hits = index.search(vectors, k=10, recipe=recipe, where={"album": "x"})
    index.delete(ids); index.search_by_id(id, k); index.stats(); index.snapshot(); index.close()

Offline: `python -m service.index build --images DIR --out INDEX [--type hnsw]`.
"""

from service.index.config import INDEX_KINDS, IndexConfig
from service.index.errors import (
    IndexCorruptError,
    IndexLockedError,
    IndexNotFoundError,
    IndexReadOnlyError,
    InvalidIdError,
    InvalidMetadataError,
    InvalidRequestError,
    InvalidVectorError,
    ItemNotFoundError,
    RecipeMismatchError,
    VectorIndexError,
)
from service.index.index import VectorIndex
from service.index.observer import IndexObserver
from service.index.recipe import EmbeddingRecipe, RecipeLike
from service.index.search import Item, SearchHit
from service.index.searcher import IndexStats

__all__ = [
    "INDEX_KINDS",
    "EmbeddingRecipe",
    "IndexConfig",
    "IndexCorruptError",
    "IndexLockedError",
    "IndexNotFoundError",
    "IndexObserver",
    "IndexReadOnlyError",
    "IndexStats",
    "InvalidIdError",
    "InvalidMetadataError",
    "InvalidRequestError",
    "InvalidVectorError",
    "Item",
    "ItemNotFoundError",
    "RecipeLike",
    "RecipeMismatchError",
    "SearchHit",
    "VectorIndex",
    "VectorIndexError",
]
