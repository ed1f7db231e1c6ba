"""OpenAI-compatible embeddings for images: POST /v1/embeddings, GET /v1/models, GET /v1/models/{model}.

A thin adapter: the request is read in OpenAI's shape (plus Infinity's `modality: "image"` and Jina's
`[{"image": ...}]` inputs), and the images go through /embed's own pipeline (`embed_vectors`: the same admission,
decoder, batcher, deadlines and metrics; the middleware applies the same auth and body cap). Errors come in
OpenAI's shape (service.errors.dialect_error). `encoding_format=base64` is the little-endian float32 bytes of each
vector, as the openai SDK requests by default and decodes.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response

from service.deps import EngineDep
from service.engine import Engine
from service.errors import ImageError
from service.routes.adapters import ParamError, check_model, read_json, served_model_name
from service.routes.inference import embed_vectors
from service.routes.openai_schemas import (
    EmbeddingsRequest,
    EmbeddingsResponse,
    ImageInput,
    ModelList,
    ModelObject,
    OpenAIErrorResponse,
)
from service.urlfetch import FetchPolicy, UrlFetcher

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])

_CREATED = int(time.time())  # OpenAI's `created` of the served model: when this process loaded the routes
_URL_PREFIXES = ("http://", "https://")
_CASES = {
    400: "invalid request (param names the field): wrong dimensions, token or text input, bad base64 or image",
    401: "API key missing or wrong (when the server's auth scope covers inference)",
    404: "no such model (GET /v1/models lists the served one)",
    413: "body, image count, image pixels or a fetched URL over the limit",
    415: "unsupported content type or image format",
    429: "queue full: retry after Retry-After seconds",
    503: "not ready (loading, self-check failed, or draining)",
    504: "deadline passed",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": OpenAIErrorResponse, "description": _CASES[s]} for s in statuses}


def _fetcher(request: Request, engine: Engine) -> UrlFetcher:
    fetcher = getattr(request.app.state, "url_fetcher", None)
    if fetcher is None:
        fetcher = request.app.state.url_fetcher = UrlFetcher(FetchPolicy.from_settings(engine.settings))
    return fetcher


class _Inputs:
    """One request's inputs by tower, in request order: `images[i]` and `urls` (index, url) for the image tower,
    `texts` (index, text) for a LiT text tower; `order` says which tower answers each position."""

    def __init__(self) -> None:
        self.images: list[bytes | str] = []
        self.image_at: list[int] = []  # request position of each entry of `images`
        self.urls: list[tuple[int, str]] = []  # (position in `images`, url)
        self.texts: list[str] = []
        self.text_at: list[int] = []

    @property
    def count(self) -> int:
        return len(self.images) + len(self.texts)


def _split_inputs(req: EmbeddingsRequest, engine: Engine, text_ok: bool) -> _Inputs:
    """Sort each input to its tower; anything neither tower takes is refused by name. A bare string is a text when
    the model has a text tower (what the openai SDK sends for `input="a photo of a cat"`), a base64 image with
    `modality=image`, and refused otherwise; data: URIs, URLs and `{"image": ...}` objects are always images."""
    items = [req.input] if isinstance(req.input, str) else req.input
    if not items:
        raise ParamError("input is empty: send one or more images or texts", param="input")
    cap = engine.settings.max_images_per_request
    if len(items) > cap:
        raise ParamError(
            f"{len(items)} inputs in one request; the limit is {cap}",
            param="input",
            code="too_many_images",
            http_status=413,
        )
    if req.modality == "text" and not text_ok:
        raise ParamError(
            "this model embeds images, not text (it has no LiT text tower): send images with modality=image",
            param="modality",
        )
    out = _Inputs()
    for i, item in enumerate(items):
        if isinstance(item, ImageInput):
            value = item.image
        elif isinstance(item, str) and req.modality == "text":
            out.texts.append(item)
            out.text_at.append(i)
            continue
        elif isinstance(item, str) and (req.modality == "image" or item.startswith(("data:", *_URL_PREFIXES))):
            value = item
        elif isinstance(item, str) and text_ok:
            out.texts.append(item)
            out.text_at.append(i)
            continue
        elif isinstance(item, str):
            raise ParamError(
                f"input[{i}] is a bare string and this model has no text tower: for images send modality=image with "
                'base64 strings, data:image/...;base64, URIs, or {"image": ...} objects',
                param=f"input[{i}]",
            )
        else:
            what = "send texts as strings" if text_ok else "this model embeds images"
            raise ParamError(f"input[{i}]: token arrays are not accepted; {what}", param=f"input[{i}]")
        if value.startswith(_URL_PREFIXES):
            if not engine.settings.url_fetch:
                raise ParamError(
                    f"input[{i}] is a URL and URL fetching is off on this server (url_fetch): send the image as "
                    "base64 or a data: URI",
                    param=f"input[{i}]",
                    code="url_fetch_disabled",
                )
            out.urls.append((len(out.images), value))
            value = ""
        out.images.append(value)
        out.image_at.append(i)
    return out


def _encode(vectors: np.ndarray, encoding: str) -> list[Any]:
    if encoding == "base64":
        return [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in vectors]
    return vectors.tolist()


@router.post(
    "/embeddings",
    response_model=EmbeddingsResponse,
    responses=_errors(400, 401, 404, 413, 415, 429, 503, 504),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/EmbeddingsRequest"}}},
        }
    },
    summary="Embed images, and texts on a LiT model (OpenAI embeddings API)",
    description="The vectors /embed answers (pooling mean by default, L2-normalised), in OpenAI's response shape. "
    'Inputs: base64 strings with `"modality": "image"`, data:image/...;base64, URIs, `[{"image": ...}]` objects, '
    "or http(s) URLs when URL fetching is on (allow-listed hosts, public addresses only). On an AIMv2-LiT model, "
    "bare strings (or any string with `modality=text`) are texts, embedded by the text tower into the same space.",
)
async def embeddings(request: Request, engine: EngineDep) -> Response:
    engine.admission_precheck()
    req = await read_json(request, EmbeddingsRequest)
    name = check_model(engine, req.model)
    dim = int(engine.recipe(req.pooling, True)["dim"]) if req.dimensions is not None else 0
    if req.dimensions is not None and req.dimensions != dim:
        raise ParamError(
            f"dimensions={req.dimensions} is not available: this model's vectors have {dim} dimensions (omit it, or "
            f"send {dim})",
            param="dimensions",
            code="unsupported_dimensions",
        )
    text = getattr(request.app.state, "text", None)
    text_ok = text is not None and text.batcher is not None
    inputs = _split_inputs(req, engine, text_ok)
    if inputs.texts and req.pooling != "mean":
        raise ParamError("texts have one pooling (the LiT text tower's): omit pooling or send mean", param="pooling")
    if inputs.urls:
        fetched = await _fetcher(request, engine).fetch_all(inputs.urls)
        for i, data in fetched.items():
            if not data:
                raise ImageError("the URL returned an empty body", code="empty_image", index=inputs.image_at[i])
            inputs.images[i] = data
    rows: list[np.ndarray] = [np.empty(0, np.float32)] * inputs.count  # (D,) each, in request order
    cfg = engine.backend.info.config
    tokens = len(inputs.images) * (cfg.img_size // cfg.patch_size) ** 2
    if inputs.images:
        vectors = await embed_vectors(request, engine, inputs.images, req.pooling, True)  # (n_images, D)
        for i, row in zip(inputs.image_at, vectors, strict=True):
            rows[i] = row
    if inputs.texts:  # the LiT text tower, into the image tower's shared space (both L2-normalised)
        from service.routes.text import embed_text_vectors

        vectors = await embed_text_vectors(request, engine, inputs.texts)  # (n_texts, P), P == D for LiT
        for i, row in zip(inputs.text_at, vectors, strict=True):
            rows[i] = row
        tokens += sum(len(text.tokenizer.tokenize(t)) for t in inputs.texts)
    body = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": e}
            for i, e in enumerate(_encode(np.stack(rows), req.encoding_format))
        ],
        "model": name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")


def _model(engine: Engine) -> dict[str, Any]:
    return {"id": served_model_name(engine), "object": "model", "created": _CREATED, "owned_by": "aim-service"}


@router.get("/models", response_model=ModelList, responses=_errors(401, 503), summary="The served model (OpenAI)")
async def models(engine: EngineDep) -> dict[str, Any]:
    return {"object": "list", "data": [_model(engine)]}


@router.get(
    "/models/{model}", response_model=ModelObject, responses=_errors(401, 404, 503), summary="One model (OpenAI)"
)
async def model(model: str, engine: EngineDep) -> dict[str, Any]:
    check_model(engine, model)
    return _model(engine)
