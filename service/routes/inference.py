"""POST /embed and POST /classify: the same inputs and the same batcher, different outputs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Collection
from typing import Any, TypeVar

import numpy as np
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

__all__ = ["infer", "router"]

router = APIRouter(tags=["inference"])
T = TypeVar("T")

_ERRORS = error_responses(401, 413, 415, 422, 429, 503, 504)


def text_routes() -> Any:
    """service.routes.text, imported late (it builds on this module's helpers)."""
    from service.routes import text

    return text


def _json(body: dict[str, Any]) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")


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
    request: Request, engine: Engine, images: list[bytes | str], outputs: Collection[str]
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
    engine.admission_precheck()
    if (body := await text_routes().text_body(request)) is not None:  # `texts`: the LiT text tower
        return await text_routes().embed_texts(request, engine, body)
    inputs = await parse_inputs(request, EmbedRequest, engine.settings.max_images_per_request)
    pooling, normalize = inputs.options["pooling"], inputs.options["normalize"]
    if pooling == "probe" and not engine.backend.info.has_head:
        raise NoHeadError("pooling=probe needs the model's attention-pooling head, and this model has none; use mean")
    output = "embedding" if pooling == "mean" else "pooled"
    result = await infer(request, engine, inputs.images, [output])
    vectors = np.stack([row[output] for row in result.rows]).astype(np.float32)  # (n, D)
    if normalize:
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return _json(
        {
            "embeddings": vectors.tolist(),
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
    "LiT models: zero-shot over the request's `labels` (ZeroShotRequest).",
)
async def classify(request: Request, engine: EngineDep) -> Response:
    engine.admission_precheck()
    if (body := await text_routes().text_body(request)) is not None:  # `labels`: zero-shot, even with a head
        return await text_routes().classify_labels(request, engine, body)
    inputs = await parse_inputs(request, ClassifyRequest, engine.settings.max_images_per_request)
    info = engine.backend.info
    if not info.has_head:
        raise NoHeadError(f"model {info.model_id!r} has no classification head; load a head or use /embed")
    result = await infer(request, engine, inputs.images, ["logits"])
    logits = np.stack([row["logits"] for row in result.rows]).astype(np.float64)  # (n, C)
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    k = min(int(inputs.options["top_k"]), probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    labels = info.labels
    predictions = [
        {
            "labels": [labels[i] if labels else None for i in row],
            "indices": [int(i) for i in row],
            "probs": [float(probs[r, i]) for i in row],
        }
        for r, row in enumerate(top.tolist())
    ]
    return _json(
        {
            "predictions": predictions,
            "model_id": info.model_id,
            "model_sha256": str(info.extra.get("weights_sha256") or info.model_sha256),
        }
    )
