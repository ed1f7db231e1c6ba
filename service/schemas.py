"""Request and response models (OpenAPI at /docs). Inputs come as JSON (`{"images": [<base64>, ...]}`) or as
multipart `files`; both shapes are declared in the spec, and parsed by `service.inputs`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ClassifyRequest",
    "ClassifyResponse",
    "EmbedRequest",
    "EmbedResponse",
    "ErrorDetail",
    "ErrorResponse",
    "Prediction",
    "Recipe",
    "error_responses",
    "limit_files_in_spec",
    "request_body",
]

Pooling = Literal["mean", "probe"]


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(
        ..., min_length=1, description="base64-encoded image files (JPEG, PNG, WEBP), optionally as data: URIs"
    )
    pooling: Pooling = Field(
        "mean", description="mean: mean of the final-normed tokens; probe: the head's attention-pooled vector"
    )
    normalize: bool = Field(True, description="L2-normalise each vector")


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(..., min_length=1, description="base64-encoded image files")
    top_k: int = Field(5, ge=1, le=1000, description="labels per image (capped at the number of classes)")


class Recipe(BaseModel):
    """What made the vectors: compare `fingerprint` before mixing vectors from different calls or services."""

    model_id: str
    model_sha256: str
    pooling: str
    normalize: bool
    layers: list[int] = Field(description="blocks whose outputs feed the vector")
    norm: str = Field(description="the normalisation applied to those outputs before pooling")
    dim: int
    preprocess: dict[str, Any]
    attention: str = "bidirectional"
    backend: str
    precision: str
    fingerprint: str | None = Field(None, description="index-compatible recipe id (L2-normalised vectors only)")


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]
    dim: int
    count: int
    recipe: Recipe


class Prediction(BaseModel):
    labels: list[str | None]
    indices: list[int]
    probs: list[float]


class ClassifyResponse(BaseModel):
    predictions: list[Prediction]
    model_id: str
    model_sha256: str


class ErrorDetail(BaseModel):
    code: str = Field(description="stable, machine-readable")
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


def _multipart_schema(extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["files"],
        # maxItems is the app's max_images_per_request, filled in per app (service.main.limit_files_in_spec).
        "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1},
            **extra,
        },
    }


_FORM_FIELDS = {
    "embed": {
        "pooling": {"type": "string", "enum": ["mean", "probe"], "default": "mean"},
        "normalize": {"type": "boolean", "default": True},
    },
    "classify": {"top_k": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 5}},
}


def openapi_body(model: str, form_fields: dict[str, Any]) -> dict[str, Any]:
    """`openapi_extra` declaring both body shapes of an image route: JSON (the pydantic model `model`'s schema) and
    multipart files plus `form_fields`. Shared by the inference and the index routes."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}},
                "multipart/form-data": {"schema": _multipart_schema(form_fields)},
            },
        }
    }


def limit_files_in_spec(schema: dict[str, Any], max_files: int) -> None:
    """Set `maxItems` of every multipart `files` array in an OpenAPI document (in place) to the app's limit."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            content = operation.get("requestBody", {}).get("content", {}) if isinstance(operation, dict) else {}
            files = content.get("multipart/form-data", {}).get("schema", {}).get("properties", {}).get("files")
            if isinstance(files, dict) and files.get("type") == "array":
                files["maxItems"] = max_files


def request_body(kind: Literal["embed", "classify"]) -> dict[str, Any]:
    return openapi_body("EmbedRequest" if kind == "embed" else "ClassifyRequest", _FORM_FIELDS[kind])


_ERROR_CASES = {
    401: "API key missing or wrong (when keys are configured)",
    409: "the model has no classification head",
    413: "body, image count or image pixels over the limit",
    415: "unsupported image format or content type",
    422: "invalid request or image (code names the problem)",
    429: "queue full: retry after Retry-After seconds",
    503: "not ready (loading, self-check failed, or draining)",
    504: "deadline passed (the message names the stage)",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorResponse, "description": _ERROR_CASES[s]} for s in statuses}
