"""Text inputs on the existing routes (AIMv2-LiT models): `texts` in POST /embed, `text` / `texts` in POST /search,
`labels` (zero-shot) in POST /classify. The image routes call `text_body` first and hand a text request here, so
the routes, the error mapping, the API-key policy and the metrics stay one set.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.engine import Engine
from service.errors import ImageError, InvalidRequestError
from service.routes.inference import _deadline, _unless_disconnected, infer
from service.text import DEFAULT_TEMPLATES, TextInputError, TextService, zero_shot_probs

__all__ = [
    "TEXT_REQUESTS",
    "TextEmbedRequest",
    "TextSearchRequest",
    "ZeroShotRequest",
    "classify_labels",
    "embed_text_vectors",
    "embed_texts",
    "search_text",
    "text_body",
]

MAX_TEMPLATES = 32  # prompts per label: labels x templates texts are embedded once per label set (then cached)
TEXT_KEYS = {"/embed": ("texts",), "/search": ("text", "texts"), "/classify": ("labels",)}


class TextEmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(..., min_length=1, description="texts to embed with the LiT text tower")
    images: list[str] | None = Field(None, description="optional images, embedded by the image tower alongside")
    pooling: Literal["mean"] = "mean"
    normalize: bool = Field(True, description="L2-normalise each vector")


class TextSearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, description="one text query")
    texts: list[str] | None = Field(None, min_length=1, description="several text queries")
    k: int = Field(10, ge=1, le=1000)
    where: dict[str, Any] | None = None
    score_threshold: float | None = Field(None, ge=-1.0, le=1.0, allow_inf_nan=False)
    ef_search: int | None = Field(None, ge=1, le=4096)
    nprobe: int | None = Field(None, ge=1, le=65536)


class ZeroShotRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(..., min_length=1, description="base64-encoded image files")
    labels: list[str] = Field(..., min_length=1, description="class names, e.g. ['cat', 'dog']")
    templates: list[str] | None = Field(
        None, min_length=1, description="prompt templates with one '{}' (default: the 8-prompt ensemble in /info)"
    )
    top_k: int = Field(5, ge=1, le=1000)


TEXT_REQUESTS = (TextEmbedRequest, TextSearchRequest, ZeroShotRequest)


async def text_body(request: Request) -> dict[str, Any] | None:
    """The JSON body when it carries this route's text keys, else None (an image request: parsed as before)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (ctype == "application/json" or ctype.endswith("+json")):
        return None
    try:
        body = json.loads(await request.body())  # Starlette caches the body: the image path reads it again
    except ValueError:
        return None  # the image parser reports the malformed JSON as it always has
    keys = TEXT_KEYS.get(request.url.path, ())
    return body if isinstance(body, dict) and any(k in body for k in keys) else None


def _parse(model: type[BaseModel], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        msg = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        raise InvalidRequestError(msg) from None


def _text_service(request: Request) -> TextService:
    return request.app.state.text


async def _embed(request: Request, engine: Engine, texts: list[str]) -> np.ndarray:
    service = _text_service(request)
    service.require()
    texts = service.check_texts(texts)
    deadline = _deadline(request, engine)
    vectors, batch = await _unless_disconnected(request, service.embed(texts, deadline))
    timings = request.scope["state"]["timings"]
    timings |= {"queue": batch.queue_s, "compute": batch.compute_s, "batch_size": max(batch.batch_sizes)}
    return vectors


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


async def embed_text_vectors(request: Request, engine: Engine, texts: list[str]) -> np.ndarray:
    """(n, P) unit text vectors, as /embed answers them for `texts`; the OpenAI adapter calls this too."""
    return _unit(await _embed(request, engine, texts))


async def embed_texts(request: Request, engine: Engine, body: dict[str, Any]) -> JSONResponse:
    """POST /embed with `texts` (and optionally `images`): texts-only answers `embeddings` + `recipe` (the text
    tower's); with images too, images keep `embeddings` / `recipe` and texts come as `text_embeddings` /
    `text_recipe`."""
    q = _parse(TextEmbedRequest, body)
    service = _text_service(request)
    service.require()
    if q.images and len(q.images) > engine.settings.max_images_per_request:
        cap = engine.settings.max_images_per_request
        raise ImageError(
            f"{len(q.images)} images in one request; the limit is {cap}", code="too_many_images", http_status=413
        )
    texts = await _embed(request, engine, q.texts)
    if q.normalize:
        texts = _unit(texts)
    out: dict[str, Any] = {}
    if q.images:
        result = await infer(request, engine, q.images, ["embedding"])
        images = np.stack([r["embedding"] for r in result.rows]).astype(np.float32)
        if q.normalize:
            images = _unit(images)
        out = {"embeddings": images.tolist(), "dim": int(images.shape[1]), "count": len(images)}
        out |= {"recipe": engine.recipe("mean", q.normalize), "text_embeddings": texts.tolist()}
        out["text_recipe"] = service.recipe(q.normalize)
    else:
        out = {"embeddings": texts.tolist(), "dim": int(texts.shape[1]), "count": len(texts)}
        out["recipe"] = service.recipe(q.normalize)
    return JSONResponse(out)


async def search_text(request: Request, engine: Engine, body: dict[str, Any]) -> JSONResponse:
    """POST /search with `text` or `texts`: the text tower's vectors against an index of this model's image
    tower (LiT image and text vectors share one space; any other index is refused: 409)."""
    from service.index.errors import RecipeMismatchError

    q = _parse(TextSearchRequest, body)
    if (q.text is None) == (q.texts is None):
        raise InvalidRequestError("send exactly one of text or texts")
    retrieval = request.app.state.retrieval
    index = retrieval.require()
    service = _text_service(request)
    service.require()
    held, served = index.recipe, retrieval.recipe
    if held.pooling != "lit_image" or served is None or held.identity != served.identity:
        raise RecipeMismatchError(
            f"text queries need an index of this LiT model's image vectors; the index holds {held.pooling} vectors "
            f"of {held.model_id or held.model_sha256[:12]} (recipe {held.fingerprint})",
            expected=held.to_dict(),
            got=service.recipe(True),
        )
    vectors = await _embed(request, engine, [q.text] if q.text is not None else list(q.texts))
    knobs = {"where": q.where, "score_threshold": q.score_threshold, "ef_search": q.ef_search, "nprobe": q.nprobe}
    hits = await retrieval.call(index.search, vectors, q.k, recipe=held, **knobs)
    results = [
        {"ids": [h.id for h in hs], "scores": [h.score for h in hs], "metadata": [h.metadata for h in hs]}
        for hs in hits
    ]
    return JSONResponse({"results": results, "k": q.k, "recipe": held.to_dict(), "query_recipe": service.recipe()})


async def classify_labels(request: Request, engine: Engine, body: dict[str, Any]) -> JSONResponse:
    """POST /classify with `labels`: zero-shot over those labels (a trained head, if any, is not used)."""
    q = _parse(ZeroShotRequest, body)
    service = _text_service(request)
    service.require()  # 409 no_text_tower: labels need a LiT text tower
    labels = service.check_texts(q.labels, "labels")
    templates = q.templates or list(DEFAULT_TEMPLATES)
    for i, t in enumerate(templates):
        if t.count("{}") != 1:
            raise TextInputError(f"templates[{i}] must contain exactly one '{{}}', got {t!r}", code="bad_template")
    if len(templates) > MAX_TEMPLATES:
        raise TextInputError(f"{len(templates)} templates; the limit is {MAX_TEMPLATES}", code="too_many_texts")
    units = await _unless_disconnected(request, service.label_units(labels, templates, _deadline(request, engine)))
    result = await infer(request, engine, q.images, ["embedding"])
    images = np.stack([r["embedding"] for r in result.rows])  # (n, P)
    probs = zero_shot_probs(images, units, service.logit_scale)  # (n, C)
    k = min(q.top_k, len(labels))
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    info = engine.backend.info
    return JSONResponse(
        {
            "predictions": [
                {
                    "labels": [labels[i] for i in row],
                    "indices": [int(i) for i in row],
                    "probs": [float(probs[r, i]) for i in row],
                }
                for r, row in enumerate(top.tolist())
            ],
            "model_id": info.model_id,
            "model_sha256": str(info.extra.get("weights_sha256") or info.model_sha256),
            "zero_shot": {"templates": templates, "logit_scale": service.logit_scale},
        }
    )
