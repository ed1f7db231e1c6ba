"""Domain errors of the vector index. The service maps each class to one HTTP status in its single error handler;
`http_status` and `code` say which, so the mapping can be generic (`exc.http_status`, `exc.code`)."""

from __future__ import annotations

from typing import Any

__all__ = [
    "IndexCorruptError",
    "IndexLockedError",
    "IndexNotFoundError",
    "IndexReadOnlyError",
    "InvalidIdError",
    "InvalidMetadataError",
    "InvalidRequestError",
    "InvalidVectorError",
    "ItemNotFoundError",
    "RecipeMismatchError",
    "VectorIndexError",
]


class VectorIndexError(Exception):
    """Base class of every error the index raises on purpose."""

    http_status = 500
    code = "index_error"


class RecipeMismatchError(VectorIndexError):
    """Vectors made by another embedding recipe (model weights, pooling, dimension, normalisation, preprocessing)
    than the one the index was built with. Mixing them would return meaningless neighbours."""

    http_status = 409
    code = "index_recipe_mismatch"

    def __init__(self, message: str, *, expected: dict[str, Any] | None = None, got: dict[str, Any] | None = None):
        super().__init__(message)
        self.expected = expected
        self.got = got


class InvalidRequestError(VectorIndexError):
    """A request the index cannot serve as asked (k out of range, malformed input); the subclasses say which."""

    http_status = 422
    code = "invalid_request"


class InvalidVectorError(InvalidRequestError):
    """Wrong shape or width, NaN/Inf, a zero vector (no direction to normalise), or ids that do not match."""

    http_status = 422
    code = "invalid_vector"


class InvalidIdError(InvalidVectorError):
    """An id that is empty, too long, or holds a control character (C0, DEL, C1): such ids could not be named
    exactly in a URL path (`DELETE /index/items/{id}`), so they are refused where items come in."""

    http_status = 422
    code = "invalid_id"


class InvalidMetadataError(InvalidRequestError):
    """Metadata that is not a JSON object, or a filter that is not a {key: value} equality mapping."""

    http_status = 422
    code = "invalid_metadata"


class ItemNotFoundError(VectorIndexError):
    """Search by id, or get, for an id that is not in the index."""

    http_status = 404
    code = "item_not_found"

    def __init__(self, item_id: str):
        super().__init__(f"no item with id {item_id!r} in the index")
        self.item_id = item_id


class IndexNotFoundError(VectorIndexError):
    """`VectorIndex.open` on a path that holds no index."""

    http_status = 404
    code = "index_not_found"


class IndexLockedError(VectorIndexError):
    """Another process holds the index open for writing (one writer per index directory)."""

    http_status = 503
    code = "index_locked"


class IndexReadOnlyError(VectorIndexError):
    """A mutation on an index opened with read_only=True."""

    http_status = 403
    code = "index_read_only"


class IndexCorruptError(VectorIndexError):
    """Snapshot files that fail their checksum, or a WAL damaged before its tail (not a torn last append)."""

    http_status = 500
    code = "index_corrupt"
