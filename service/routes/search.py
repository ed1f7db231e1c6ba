"""The vector index over HTTP: POST /search, POST /index/items, GET|DELETE /index/items/{id}, GET /index,
POST /index/snapshot. Thin: inputs are parsed like /embed's, images go through the shared batcher, and every
blocking index call runs in the index's thread pool (service.retrieval). Mutating routes need an API key once keys
are configured (the middleware's default-deny for state-changing methods)."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from service.deps import EngineDep
from service.engine import Engine
from service.errors import InvalidRequestError, TooManyItemsError
from service.index import ItemNotFoundError, SearchHit, VectorIndex
from service.inputs import parse_inputs
from service.retrieval import Retrieval
from service.routes.inference import infer, query_params, text_routes
from service.schemas import ErrorResponse
from service.search_schemas import (
    AddItemsRequest,
    AddItemsResponse,
    DeleteItemResponse,
    IndexInfo,
    ItemResponse,
    SearchRequest,
    SearchResponse,
    SnapshotResponse,
    index_request_body,
)

__all__ = ["router"]

router = APIRouter(tags=["retrieval"])


async def get_retrieval(request: Request) -> Retrieval:
    return request.app.state.retrieval


RetrievalDep = Annotated[Retrieval, Depends(get_retrieval)]

_CASES = {
    401: "API key missing or wrong (mutating routes, once keys are configured)",
    403: "the index is read-only (a replica)",
    404: "no item with this id",
    409: "no index configured (no_index), or vectors of another embedding recipe (index_recipe_mismatch)",
    413: "body or image count over the limit",
    415: "unsupported image format or content type",
    422: "invalid request: ids, vectors, metadata, filter, k (code names the problem)",
    429: "queue full: retry after Retry-After seconds",
    503: "not ready (loading, startup failed, or draining)",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorResponse, "description": _CASES[s]} for s in statuses}


def _check_count(n: int, retrieval: Retrieval) -> None:
    cap = retrieval.settings.index_max_items_per_request
    if n > cap:
        raise TooManyItemsError(f"{n} items in one request; the limit is {cap} (index_max_items_per_request)")


async def _embed(request: Request, engine: Engine, retrieval: Retrieval, images: list[bytes | str]) -> np.ndarray:
    """The index's vector of each image (raw: the index normalises), through the shared batcher."""
    engine.admission_precheck()
    result = await infer(request, engine, images, [retrieval.output])
    return np.stack([row[retrieval.output] for row in result.rows])


_ITEMS = "/index/items/"


def _exact_id(request: Request, item_id: str) -> str:
    """The id exactly as the URL names it. Starlette anchors `{item_id:path}` with `$`, which also matches before a
    trailing newline: `/index/items/victim%0A` arrives as item_id "victim" and would name another item. The route
    path's tail after the prefix is the id, newline included (ids with control characters are refused at insert,
    so such a name answers 404, unless an index written before that rule holds it)."""
    path, root = request.scope["path"], request.scope.get("root_path", "")
    if root and path.startswith(root + "/"):
        path = path[len(root) :]
    return path[len(_ITEMS) :] if path.startswith(_ITEMS) else item_id


def _result(hits: list[SearchHit]) -> dict[str, Any]:
    return {"ids": [h.id for h in hits], "scores": [h.score for h in hits], "metadata": [h.metadata for h in hits]}


@router.post(
    "/search",
    response_model=SearchResponse,
    responses=_errors(401, 404, 409, 413, 415, 422, 429, 503),
    openapi_extra=index_request_body("search"),
    summary="Nearest neighbours of images, vectors or a stored item",
    description="Per query: ids, cosine scores and metadata of the k best items, optionally filtered by metadata "
    "equality (`where`) and a score floor. Images as JSON base64 or multipart `files` (embedded like /embed). "
    "LiT models also take `text` or `texts` (TextSearchRequest).",
)
async def search(request: Request, engine: EngineDep, retrieval: RetrievalDep) -> JSONResponse:
    query_params(request)  # options go in the body: an unknown query parameter is refused, not ignored
    index = retrieval.require()
    if (body := await text_routes().text_body(request)) is not None:  # `text` / `texts`: the LiT text tower
        return await text_routes().search_text(request, engine, body)
    inputs = await parse_inputs(request, SearchRequest, engine.settings.max_images_per_request)
    q = inputs.options
    knobs = {"where": q["where"], "score_threshold": q["score_threshold"]}
    knobs |= {"ef_search": q["ef_search"], "nprobe": q["nprobe"]}
    if q["id"] is not None:
        hits = [await retrieval.call(index.search_by_id, q["id"], q["k"], include_self=q["include_self"], **knobs)]
    else:
        if inputs.images:
            vectors: Any = await _embed(request, engine, retrieval, inputs.images)
            recipe: Any = retrieval.recipe
        else:
            _check_count(len(q["vectors"]), retrieval)
            vectors, recipe = q["vectors"], q["recipe"]
        hits = await retrieval.call(index.search, vectors, q["k"], recipe=recipe, **knobs)
    body = {"results": [_result(h) for h in hits], "k": q["k"], "recipe": index.recipe.to_dict()}
    return JSONResponse(body)


@router.post(
    "/index/items",
    response_model=AddItemsResponse,
    responses=_errors(401, 403, 409, 413, 415, 422, 429, 503),
    openapi_extra=index_request_body("add"),
    summary="Add or replace items (durable when answered)",
    description="Images (JSON base64 or multipart `files`, embedded like /embed) or raw `vectors` with their "
    "`recipe`, one id each, optional JSON metadata. An existing id is replaced. The answer comes after the write "
    "is fsynced to the index's write-ahead log.",
)
async def add_items(request: Request, engine: EngineDep, retrieval: RetrievalDep) -> JSONResponse:
    query_params(request)
    index = retrieval.require()
    inputs = await parse_inputs(request, AddItemsRequest, engine.settings.max_images_per_request)
    body = inputs.options
    ids: list[str] = body["ids"]
    _check_count(len(ids), retrieval)
    n = len(inputs.images) if inputs.images else len(body["vectors"])
    if len(ids) != n:
        raise InvalidRequestError(f"{len(ids)} ids for {n} {'images' if inputs.images else 'vectors'}")
    if inputs.images:
        vectors: Any = await _embed(request, engine, retrieval, inputs.images)
        recipe: Any = retrieval.recipe
    else:
        vectors, recipe = body["vectors"], body["recipe"]
    replaced = await retrieval.call(index.upsert, ids, vectors, body["metadata"], recipe=recipe)
    return JSONResponse({"added": len(ids), "replaced": replaced, "size": len(index)})


@router.get(
    "/index/items/{item_id:path}",
    response_model=ItemResponse,
    responses=_errors(404, 409, 503),
    summary="One stored item: its metadata (and unit vector with ?vector=true)",
)
async def get_item(
    request: Request, item_id: str, retrieval: RetrievalDep, vector: Annotated[bool, Query()] = False
) -> JSONResponse:
    index = retrieval.require()
    item_id = _exact_id(request, item_id)
    item = await retrieval.call(index.get, item_id, with_vector=vector)
    body: dict[str, Any] = {"id": item.id, "metadata": item.metadata}
    if item.vector is not None:
        body["vector"] = item.vector.tolist()
    return JSONResponse(body)


@router.delete(
    "/index/items/{item_id:path}",
    response_model=DeleteItemResponse,
    responses=_errors(401, 403, 404, 409, 422, 503),
    summary="Delete an item (durable when answered); 404 when it is not there",
)
async def delete_item(request: Request, item_id: str, retrieval: RetrievalDep) -> JSONResponse:
    index = retrieval.require()
    item_id = _exact_id(request, item_id)
    if not await retrieval.call(index.delete, [item_id]):
        raise ItemNotFoundError(item_id)
    return JSONResponse({"deleted": item_id, "size": len(index)})


def _describe(index: VectorIndex) -> dict[str, Any]:
    stats = index.stats()
    return {
        "type": stats.kind,
        "size": stats.count,
        "dim": stats.dim,
        "recipe": stats.recipe,
        "params": stats.params,
        "last_snapshot": None
        if stats.snapshot_lsn is None
        else {"lsn": stats.snapshot_lsn, "written_at": stats.last_snapshot_at},
        "tombstones": stats.tombstones,
        "trained": stats.trained,
        "lsn": stats.lsn,
        "wal_ops_pending": stats.wal_ops_pending,
        "read_only": stats.read_only,
        "faiss_class": stats.faiss_class,
        "gpu": stats.gpu,
    }


@router.get(
    "/index",
    response_model=IndexInfo,
    responses=_errors(409, 503),
    summary="The index: type, size, recipe, search parameters, last snapshot",
)
async def index_info(retrieval: RetrievalDep) -> JSONResponse:
    index = retrieval.require()
    return JSONResponse(await retrieval.call(_describe, index))


@router.post(
    "/index/snapshot",
    response_model=SnapshotResponse,
    responses=_errors(401, 403, 409, 503),
    summary="Fold the write-ahead log into a snapshot now",
    description="Writes happen meanwhile wait for it (searches do not); the background timer does this every "
    "index_snapshot_interval_s anyway.",
)
async def snapshot(retrieval: RetrievalDep) -> JSONResponse:
    index = retrieval.require()
    section = await retrieval.call(index.snapshot)
    return JSONResponse(
        {
            "lsn": section["lsn"],
            "size": section["count"],
            "bytes": sum(section["bytes"].values()),
            "written_at": section["written_at"],
        }
    )
