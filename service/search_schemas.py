"""Request and response models of the index routes (/search, /index). Like /embed, the image-carrying requests
come as JSON (base64 `images`) or multipart (`files` plus form fields); in a form, the structured fields (`ids`,
`metadata`, `where`) are JSON text, decoded here so both shapes validate alike."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.index.errors import InvalidIdError
from service.index.store import MAX_ID_LENGTH, id_problem
from service.schemas import openapi_body

__all__ = [
    "MAX_ID_LENGTH",
    "MAX_K",
    "AddItemsRequest",
    "AddItemsResponse",
    "DeleteItemResponse",
    "IndexInfo",
    "ItemResponse",
    "SearchRequest",
    "SearchResponse",
    "SearchResult",
    "SnapshotResponse",
    "index_request_body",
]

MAX_K = 1000

_RECIPE_HELP = (
    "with `vectors`: the recipe fingerprint that made them (`recipe.fingerprint` of an /embed answer with "
    "normalize=true), or that whole `recipe` object; vectors of another recipe are refused (409)"
)


def _json_text(value: Any) -> Any:
    """Form fields arrive as text: decode JSON there (a JSON body already holds the structure)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise ValueError("must be JSON (in a multipart form, send this field as JSON text)") from None
    return value


def _fingerprint(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    fingerprint = value.get("fingerprint")
    if not isinstance(fingerprint, str):
        raise ValueError("the recipe object has no fingerprint: embed with normalize=true, or send the fingerprint")
    return fingerprint


class _VectorInputs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: list[str] | None = Field(None, min_length=1, description="base64-encoded image files (JPEG, PNG, WEBP)")
    vectors: list[list[float]] | None = Field(None, min_length=1, description="raw embeddings, one row per item")
    recipe: str | dict[str, Any] | None = Field(None, description=_RECIPE_HELP)

    @field_validator("recipe")
    @classmethod
    def _recipe_fingerprint(cls, value: Any) -> str | None:
        return _fingerprint(value)

    def _check_vectors_have_recipe(self) -> None:
        if self.vectors is not None and not self.recipe:
            raise ValueError("`vectors` need their `recipe` (fingerprint), so vectors of another model are refused")


class SearchRequest(_VectorInputs):
    """Exactly one query kind: `images`, `vectors` (+ `recipe`) or the `id` of a stored item."""

    id: str | None = Field(None, min_length=1, max_length=MAX_ID_LENGTH, description="search by a stored item")
    k: int = Field(10, ge=1, le=MAX_K, description="neighbours per query")
    where: dict[str, Any] | None = Field(None, description="metadata equality filter {key: value} (all must match)")
    score_threshold: float | None = Field(
        None, ge=-1.0, le=1.0, allow_inf_nan=False, description="drop hits below this cosine similarity"
    )
    include_self: bool = Field(False, description="with `id`: keep the item itself in its answer")
    ef_search: int | None = Field(None, ge=1, le=4096, description="HNSW beam width for this query")
    nprobe: int | None = Field(None, ge=1, le=65536, description="IVF lists searched for this query")

    _where_json = field_validator("where", mode="before")(_json_text)

    @model_validator(mode="after")
    def _one_query_kind(self) -> SearchRequest:
        given = [name for name in ("images", "vectors", "id") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"send exactly one of images (or multipart files), vectors or id; got {given or 'none'}")
        self._check_vectors_have_recipe()
        return self


class AddItemsRequest(_VectorInputs):
    """`ids` (one per image or vector) and either `images` or `vectors` (+ `recipe`); upsert semantics."""

    ids: list[str] = Field(..., min_length=1, description="external ids, unique in the request; existing ones replaced")
    metadata: list[dict[str, Any] | None] | None = Field(
        None, description="one JSON object (or null) per id; filterable by equality in /search `where`"
    )

    _ids_json = field_validator("ids", "metadata", mode="before")(_json_text)

    @field_validator("ids")
    @classmethod
    def _valid_ids(cls, ids: list[str]) -> list[str]:
        for item_id in ids:  # the index's own rule (no control characters: every id must be nameable in a URL)
            if (problem := id_problem(item_id)) is not None:
                # Not a ValueError: pydantic lets it through, and it answers 422 `invalid_id` like the index would.
                raise InvalidIdError(f"ids: {problem}")
        if len(set(ids)) != len(ids):
            dupes = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise ValueError(f"duplicate ids in one request: {dupes}")
        return ids

    @model_validator(mode="after")
    def _one_input_kind(self) -> AddItemsRequest:
        if (self.images is None) == (self.vectors is None):
            raise ValueError("send exactly one of images (or multipart files) or vectors")
        if self.metadata is not None and len(self.metadata) != len(self.ids):
            raise ValueError(f"{len(self.metadata)} metadata entries for {len(self.ids)} ids")
        self._check_vectors_have_recipe()
        return self


class SearchResult(BaseModel):
    ids: list[str]
    scores: list[float] = Field(description="cosine similarity, best first")
    metadata: list[dict[str, Any] | None]


class SearchResponse(BaseModel):
    results: list[SearchResult] = Field(description="one per query, in request order")
    k: int
    recipe: dict[str, Any] = Field(description="the index's embedding recipe (fingerprint included)")


class AddItemsResponse(BaseModel):
    added: int
    replaced: int = Field(description="ids that existed before (their vector and metadata were replaced)")
    size: int = Field(description="searchable items after this request")


class DeleteItemResponse(BaseModel):
    deleted: str
    size: int


class ItemResponse(BaseModel):
    id: str
    metadata: dict[str, Any] | None
    vector: list[float] | None = None


class IndexInfo(BaseModel):
    type: Literal["flat", "hnsw", "ivf", "ivfpq"]
    size: int
    dim: int
    recipe: dict[str, Any]
    params: dict[str, Any]
    last_snapshot: dict[str, Any] | None
    tombstones: int
    trained: bool
    lsn: int
    wal_ops_pending: int
    read_only: bool
    faiss_class: str
    gpu: bool


class SnapshotResponse(BaseModel):
    lsn: int
    size: int
    bytes: int
    written_at: float


_FORM_FIELDS: dict[str, dict[str, Any]] = {
    "search": {
        "k": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10},
        "where": {"type": "string", "description": "JSON object"},
        "score_threshold": {"type": "number", "minimum": -1, "maximum": 1},
    },
    "add": {
        "ids": {"type": "string", "description": "JSON array of strings, one per file"},
        "metadata": {"type": "string", "description": "JSON array of objects (or null), one per file"},
    },
}


def index_request_body(kind: Literal["search", "add"]) -> dict[str, Any]:
    return openapi_body("SearchRequest" if kind == "search" else "AddItemsRequest", _FORM_FIELDS[kind])
