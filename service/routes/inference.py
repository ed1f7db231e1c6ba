"""POST /embed and POST /classify: the same inputs and the same batcher, different outputs."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Collection
from typing import Any, TypeVar

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response

from service.deps import EngineDep
from service.engine import Engine, InferenceResult
from service.errors import ClientDisconnectedError, InvalidRequestError, NoHeadError
from service.inputs import parse_inputs
from service.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    EmbedRequest,
    EmbedResponse,
    error_responses,
    request_body,
)

__all__ = [
    "embed_vectors",
    "infer",
    "json_response",
    "l2_normalize",
    "query_params",
    "router",
    "top_k_predictions",
]

router = APIRouter(tags=["inference"])
T = TypeVar("T")

_ERRORS = error_responses(401, 413, 415, 422, 429, 503, 504)


def json_response(body: dict[str, Any]) -> Response:
    """orjson writes numpy arrays natively (float32 as its shortest round-trip text): about 20x faster than
    `.tolist()` + json.dumps for a batch of vectors, and this runs on the event loop once per request."""
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


_json = json_response


def top_k_predictions(logits: np.ndarray, k: int, labels: list[str] | None) -> list[dict[str, Any]]:
    """(n, C) logits -> per image the k best labels, class indices and softmax probabilities (float64 softmax)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=1, keepdims=True)
    k = min(int(k), probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [
        {
            "labels": [labels[i] if labels else None for i in row],
            "indices": [int(i) for i in row],
            "probs": [float(probs[r, i]) for i in row],
        }
        for r, row in enumerate(top.tolist())
    ]


def query_params(request: Request, allowed: Collection[str] = ()) -> dict[str, str]:
    """The query parameters of a body-carrying route: the few it documents, else 422 naming the others. An ignored
    parameter looks applied to the client (`/classify?top_k=2` used to answer five labels)."""
    params = request.query_params
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        takes = "only " + ", ".join(sorted(allowed)) if allowed else "none (options go in the body)"
        raise InvalidRequestError(
            f"unknown query parameter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: "
            f"{request.url.path} takes {takes}"
        )
    for name in allowed:
        if len(params.getlist(name)) > 1:
            raise InvalidRequestError(f"query parameter {name!r} given {len(params.getlist(name))} times")
    return {name: params[name] for name in allowed if name in params}


def _query_top_k(request: Request) -> int | None:
    """/classify?top_k=N: the body field's meaning and bounds."""
    raw = query_params(request, ("top_k",)).get("top_k")
    if raw is None:
        return None
    field = ClassifyRequest.model_fields["top_k"]
    low, high = (next(getattr(m, a) for m in field.metadata if hasattr(m, a)) for a in ("ge", "le"))
    try:
        k = int(raw)
    except ValueError:
        raise InvalidRequestError(f"query parameter top_k must be an integer, got {raw!r}") from None
    if not low <= k <= high:
        raise InvalidRequestError(f"query parameter top_k must be between {low} and {high}, got {k}")
    return k


def _top_k(query: int | None, body: Any, body_given: bool) -> Any:
    if query is None or not body_given:
        return body if query is None else query
    if query != body:
        raise InvalidRequestError(f"top_k is {query} in the query but {body} in the body: give it once")
    return body


def text_routes() -> Any:
    """service.routes.text, imported late (it builds on this module's helpers)."""
    from service.routes import text

    return text


def _deadline(request: Request, engine: Engine) -> float:
    """time.monotonic() deadline: X-Request-Timeout (seconds) capped by settings, else the default."""
    s = engine.settings
    raw = request.headers.get("x-request-timeout")
    timeout = s.request_timeout_s
    if raw is not None:
        try:
            timeout = float(raw)
        except ValueError:
            raise InvalidRequestError(f"X-Request-Timeout must be seconds as a number, got {raw!r}") from None
        if not timeout > 0:  # also refuses NaN
            raise InvalidRequestError("X-Request-Timeout must be > 0 seconds")
        timeout = min(timeout, s.max_request_timeout_s)
    return time.monotonic() + timeout


async def _watch_disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so `receive` only reports that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`; if the client goes away first, cancel it (queued images are dropped before compute)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_watch_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientDisconnectedError("the client disconnected; its images were dropped")


async def infer(
    request: Request, engine: Engine, images: list[bytes | str] | np.ndarray, outputs: Collection[str]
) -> InferenceResult:
    """Images through the shared decoder and batcher under the request's deadline (/embed, /classify, /search and
    /index/items alike), cancelled if the client goes away; records the stage timings for the response headers."""
    deadline = _deadline(request, engine)
    result = await _unless_disconnected(request, engine.run(images, outputs, deadline))
    timings = request.scope["state"]["timings"]
    timings |= {
        "decode": result.decode_s,
        "queue": result.batch.queue_s,
        "compute": result.batch.compute_s,
        "batch_size": max(result.batch.batch_sizes),
    }
    engine.metrics.images.labels(request.url.path).inc(len(images))
    return result


async def embed_vectors(
    request: Request, engine: Engine, images: list[bytes | str] | np.ndarray, pooling: str, normalize: bool
) -> np.ndarray:
    """float32 (n, D) vectors as /embed answers them; the OpenAI and KServe adapters call this too."""
    if pooling == "probe" and not engine.backend.info.has_head:
        raise NoHeadError("pooling=probe needs the model's attention-pooling head, and this model has none; use mean")
    output = "embedding" if pooling == "mean" else "pooled"
    result = await infer(request, engine, images, [output])
    vectors = np.stack([row[output] for row in result.rows]).astype(np.float32)  # (n, D)
    return l2_normalize(vectors) if normalize else vectors


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """(n, D) float32 rows scaled to unit length, in place (an all-zero row stays zero)."""
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors


@router.post(
    "/embed",
    response_model=EmbedResponse,
    responses=_ERRORS,
    openapi_extra=request_body("embed"),
    summary="Embed images",
    description="One vector per image: mean of the final-normed tokens (pooling=mean) or the head's attention-pooled "
    "vector (pooling=probe), L2-normalised unless normalize=false. Images as JSON base64 or multipart `files`. "
    "LiT models also take `texts` (TextEmbedRequest).",
)
async def embed(request: Request, engine: EngineDep) -> Response:
    query_params(request)
    engine.admission_precheck()
    if (body := await text_routes().text_body(request)) is not None:  # `texts`: the LiT text tower
        return await text_routes().embed_texts(request, engine, body)
    inputs = await parse_inputs(request, EmbedRequest, engine.settings.max_images_per_request)
    pooling, normalize = inputs.options["pooling"], inputs.options["normalize"]
    vectors = await embed_vectors(request, engine, inputs.images, pooling, normalize)
    return _json(
        {
            "embeddings": vectors,
            "dim": int(vectors.shape[1]),
            "count": len(vectors),
            "recipe": engine.recipe(pooling, normalize),
        }
    )


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses={**_ERRORS, **error_responses(409)},
    openapi_extra=request_body("classify"),
    summary="Classify images",
    description="Top-k labels, class indices and softmax probabilities per image (needs a classification head). "
    "`top_k` as a body field or a query parameter (`/classify?top_k=3`). LiT models: zero-shot over the "
    "request's `labels` (ZeroShotRequest).",
)
async def classify(request: Request, engine: EngineDep) -> Response:
    query_top_k = _query_top_k(request)
    engine.admission_precheck()
    if (body := await text_routes().text_body(request)) is not None:  # `labels`: zero-shot, even with a head
        if query_top_k is not None:
            body["top_k"] = _top_k(query_top_k, body.get("top_k"), "top_k" in body)
        return await text_routes().classify_labels(request, engine, body)
    inputs = await parse_inputs(request, ClassifyRequest, engine.settings.max_images_per_request)
    top_k = _top_k(query_top_k, inputs.options["top_k"], "top_k" in inputs.given)
    info = engine.backend.info
    if not info.has_head:
        raise NoHeadError(f"model {info.model_id!r} has no classification head; load a head or use /embed")
    result = await infer(request, engine, inputs.images, ["logits"])
    logits = np.stack([row["logits"] for row in result.rows])  # (n, C)
    predictions = top_k_predictions(logits, top_k, info.labels)
    return _json(
        {
            "predictions": predictions,
            "model_id": info.model_id,
            "model_sha256": str(info.extra.get("weights_sha256") or info.model_sha256),
        }
    )
