"""KServe v2 / Open Inference Protocol, as Triton's clients speak it: server and model metadata, health, and
POST /v2/models/{name}/infer, with JSON tensors and the binary-data extension.

Inputs (exactly one tensor):
- IMAGE, BYTES, shape [N] or [N, 1]: encoded image files. In JSON each element is base64 text (JSON strings must be
  UTF-8; tritonclient refuses raw bytes there); in binary form, Triton's serialisation: per element a 4-byte
  little-endian length, then the bytes.
- PIXELS, FP32, shape [N, 3, S, S]: pixels already preprocessed as the model's manifest says; decoding is skipped.
Outputs, FP32: embedding (N, D) and pooled (N, D), L2-normalised like /embed's pooling=mean and pooling=probe
unless the request's parameters say normalize=false; logits (N, C). Each output is JSON or, with binary_data, raw
little-endian bytes after the JSON header, whose length is the Inference-Header-Content-Length header.

A thin adapter: images go through /embed's pipeline (`infer`: the same admission, decoder, batcher, deadlines and
metrics; the middleware applies the same auth and body cap). Errors are `{"error": <message>, "code": ...}`.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response

from service.deps import EngineDep
from service.engine import Engine
from service.routes.adapters import ModelNotFoundError, ParamError, check_model
from service.routes.inference import infer, l2_normalize
from service.routes.kserve_schemas import (
    InferInputTensor,
    InferRequest,
    InferResponse,
    KServeError,
    ModelMetadata,
    ServerMetadata,
)

__all__ = ["router"]

router = APIRouter(prefix="/v2", tags=["KServe v2 / Triton"])

HEADER_LENGTH = "inference-header-content-length"
VERSION = "1"
_CASES = {
    400: "invalid request: tensor name, datatype, shape, data or output (the message says which)",
    401: "API key missing or wrong (when the server's auth scope covers inference)",
    404: "no such model or version",
    413: "body, image count or image pixels over the limit",
    415: "unsupported image format or content encoding",
    429: "queue full: retry after Retry-After seconds",
    503: "not ready (loading, self-check failed, or draining)",
    504: "deadline passed",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": KServeError, "description": _CASES[s]} for s in statuses}


def _bad(message: str) -> ParamError:
    return ParamError(message, param=None, http_status=400)


def _check(engine: Engine, name: str, version: str | None) -> str:
    served = check_model(engine, name)
    if version not in (None, "", VERSION):
        raise ModelNotFoundError(f"model {served!r} has only version {VERSION}, not {version!r}")
    return served


def _outputs(engine: Engine) -> dict[str, int]:
    """Output name -> its width, for this model."""
    cfg = engine.backend.info.config
    out = {"embedding": cfg.embed_dim}
    if cfg.has_head:
        out |= {"pooled": cfg.embed_dim, "logits": cfg.num_classes}
    return out


# ----- metadata and health -----
@router.get("", response_model=ServerMetadata, summary="Server metadata (KServe v2)")
async def server_metadata(request: Request) -> dict[str, Any]:
    return {"name": "aim-service", "version": request.app.version, "extensions": ["binary_tensor_data"]}


@router.get("/health/live", summary="Liveness (KServe v2): 200 while the process can serve", responses=_errors(503))
@router.head("/health/live", include_in_schema=False)  # load balancers probe with HEAD
async def live(engine: EngineDep) -> Response:
    return Response(status_code=200 if engine.alive else 503)


@router.get("/health/ready", summary="Readiness (KServe v2): 200 once the model is ready", responses=_errors(503))
@router.head("/health/ready", include_in_schema=False)
async def ready(engine: EngineDep) -> Response:
    return Response(status_code=200 if engine.ready else 503)


@router.get(
    "/models/{name}", response_model=ModelMetadata, responses=_errors(404, 503), summary="Model metadata (KServe v2)"
)
@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata, include_in_schema=False)
async def model_metadata(name: str, engine: EngineDep, version: str | None = None) -> dict[str, Any]:
    served = _check(engine, name, version)
    info = engine.backend.info
    s = info.preprocess.img_size
    return {
        "name": served,
        "versions": [VERSION],
        "platform": f"aim_{info.name}",
        "inputs": [
            {"name": "IMAGE", "datatype": "BYTES", "shape": [-1]},
            {"name": "PIXELS", "datatype": "FP32", "shape": [-1, info.config.num_channels, s, s]},
        ],
        "outputs": [{"name": k, "datatype": "FP32", "shape": [-1, d]} for k, d in _outputs(engine).items()],
    }


@router.get("/models/{name}/ready", responses=_errors(404, 503), summary="Model readiness (KServe v2)")
@router.get("/models/{name}/versions/{version}/ready", include_in_schema=False)
async def model_ready(name: str, engine: EngineDep, version: str | None = None) -> Response:
    _check(engine, name, version)
    return Response(status_code=200 if engine.ready else 503)


# ----- inference -----
def _split_body(request: Request, body: bytes) -> tuple[bytes, bytes]:
    """(JSON header, binary tail) per the binary-data extension."""
    raw = request.headers.get(HEADER_LENGTH)
    if raw is None:
        return body, b""
    if not raw.isdigit() or int(raw) > len(body):
        raise _bad(f"Inference-Header-Content-Length {raw!r} is not a length within the {len(body)}-byte body")
    n = int(raw)
    return body[:n], body[n:]


def _flat(data: list[Any]) -> list[Any]:
    out: list[Any] = []
    stack = [iter(data)]
    while stack:  # iterative: a deeply nested body must not exhaust the recursion limit
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            out.append(value)
        else:
            stack.pop()
    return out


def _tensor_bytes(tensor: InferInputTensor, tail: bytes, offset: int) -> bytes | None:
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or size < 0 or offset + size > len(tail):
        raise _bad(f"input {tensor.name}: binary_data_size {size!r} does not fit the {len(tail)}-byte binary data")
    return tail[offset : offset + size]


def _images(tensor: InferInputTensor, raw: bytes | None, max_images: int) -> list[bytes | str]:
    shape = tensor.shape
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] < 1:
        raise _bad(f"input IMAGE has shape {shape}; expected [N] or [N, 1] with N >= 1")
    n = shape[0]
    if n > max_images:
        raise ParamError(
            f"{n} images in one request; the limit is {max_images}",
            param=None,
            code="too_many_images",
            http_status=413,
        )
    if raw is not None:
        images: list[bytes | str] = []
        pos = 0
        while pos < len(raw):  # Triton's BYTES serialisation: <uint32 LE length><bytes>, per element
            if pos + 4 > len(raw):
                raise _bad("input IMAGE: truncated element length in the binary data")
            size = int.from_bytes(raw[pos : pos + 4], "little")
            pos += 4
            if pos + size > len(raw):
                raise _bad("input IMAGE: an element runs past the end of the binary data")
            images.append(raw[pos : pos + size])
            pos += size
    else:
        if tensor.data is None:
            raise _bad("input IMAGE has neither data nor binary_data_size")
        images = _flat(tensor.data)
        if not all(isinstance(v, str) for v in images):
            raise _bad("input IMAGE: JSON BYTES elements must be strings (base64-encoded image files)")
    if len(images) != n:
        raise _bad(f"input IMAGE has shape {shape} but {len(images)} elements")
    return images


def _pixels(tensor: InferInputTensor, raw: bytes | None, engine: Engine) -> np.ndarray:
    info = engine.backend.info
    s, c = info.preprocess.img_size, info.config.num_channels
    shape = tensor.shape
    if len(shape) != 4 or shape[1:] != [c, s, s] or shape[0] < 1:
        raise _bad(f"input PIXELS has shape {shape}; expected [N, {c}, {s}, {s}] (preprocessed as the model says)")
    if shape[0] > engine.settings.max_images_per_request:
        cap = engine.settings.max_images_per_request
        raise ParamError(
            f"{shape[0]} images in one request; the limit is {cap}",
            param=None,
            code="too_many_images",
            http_status=413,
        )
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != 4 * count:
            raise _bad(f"input PIXELS: {len(raw)} bytes of binary data for shape {shape} ({4 * count} expected)")
        pixels = np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)
    else:
        values = _flat(tensor.data or [])
        if len(values) != count:
            raise _bad(f"input PIXELS has shape {shape} but {len(values)} values")
        try:
            pixels = np.asarray(values, dtype=np.float32).reshape(shape)
        except (TypeError, ValueError):
            raise _bad("input PIXELS: every value must be a number") from None
    if not np.isfinite(pixels).all():
        raise _bad("input PIXELS contains NaN or infinity")
    return pixels


def _parse_request(request: Request, body: bytes) -> tuple[InferRequest, bytes]:
    head, tail = _split_body(request, body)
    try:
        return InferRequest.model_validate_json(head), tail
    except ValueError as exc:
        errors = getattr(exc, "errors", lambda: [])()
        where = ".".join(str(p) for p in errors[0].get("loc", ())) if errors else ""
        msg = errors[0].get("msg", "invalid") if errors else str(exc)
        raise _bad(f"inference request {where or 'body'}: {msg}") from None


@router.post(
    "/models/{name}/infer",
    response_model=InferResponse,
    responses=_errors(400, 401, 404, 413, 415, 429, 503, 504),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}},
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                    "description": "binary-data extension: the JSON header (Inference-Header-Content-Length bytes), "
                    "then each tensor's bytes",
                },
            },
        }
    },
    summary="Infer (KServe v2): image bytes or pixels in, embedding / pooled / logits out",
    description="Input IMAGE (BYTES: encoded files; base64 text in JSON) or PIXELS (FP32 (N, 3, S, S)). Outputs "
    "embedding and pooled (L2-normalised like /embed unless parameters.normalize=false) and logits; JSON or binary.",
)
@router.post("/models/{name}/versions/{version}/infer", include_in_schema=False)
async def model_infer(name: str, request: Request, engine: EngineDep, version: str | None = None) -> Response:
    engine.admission_precheck()
    served = _check(engine, name, version)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ParamError(
            f"Content-Encoding {encoding} is not accepted: send the request uncompressed",
            param=None,
            code="unsupported_media_type",
            http_status=415,
        )
    req, tail = _parse_request(request, await request.body())
    tensor = req.inputs[0]
    raw = _tensor_bytes(tensor, tail, 0)
    if tensor.name == "IMAGE" and tensor.datatype == "BYTES":
        images: list[bytes | str] | np.ndarray = _images(tensor, raw, engine.settings.max_images_per_request)
    elif tensor.name == "PIXELS" and tensor.datatype == "FP32":
        images = _pixels(tensor, raw, engine)
    else:
        raise _bad(
            f"input {tensor.name!r} of datatype {tensor.datatype} is not accepted: send IMAGE (BYTES, encoded image "
            "files) or PIXELS (FP32, preprocessed)"
        )
    available = _outputs(engine)
    params = req.parameters or {}
    binary_all = bool(params.get("binary_data_output", False))
    wanted = [(o.name, bool((o.parameters or {}).get("binary_data", binary_all))) for o in req.outputs or []] or [
        (k, binary_all) for k in available
    ]
    for out_name, _ in wanted:
        if out_name not in available:
            raise _bad(f"output {out_name!r} is not produced by this model; it has {', '.join(available)}")
    normalize = params.get("normalize", True)
    if not isinstance(normalize, bool):
        raise _bad("parameters.normalize must be true or false")
    result = await infer(request, engine, images, [n for n, _ in wanted])
    outputs, blobs = [], []
    for out_name, binary in wanted:
        values = np.stack([row[out_name] for row in result.rows]).astype(np.float32)  # (N, D) or (N, C)
        if normalize and out_name != "logits":
            values = l2_normalize(values)
        entry: dict[str, Any] = {"name": out_name, "datatype": "FP32", "shape": list(values.shape)}
        if binary:
            blob = values.astype("<f4").tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = values.ravel().tolist()
        outputs.append(entry)
    header: dict[str, Any] = {"model_name": served, "model_version": VERSION, "outputs": outputs}
    if req.id is not None:
        header["id"] = req.id
    head = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(
        b"".join([head, *blobs]),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
