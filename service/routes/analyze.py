"""POST /analyze: one request, one decode and one forward per image, several answers (issue 13).

A user who wants an image's vector, its top-k classes and its nearest neighbours in the index would otherwise send
/embed, /classify and /search: three uploads, three decodes and two or three forwards. Here the images are decoded
once and go through the shared batcher once with the union of the outputs asked for ("embedding", "pooled",
"logits"), which every backend computes in a single call (torch: one trunk pass, early exit only when no
embedding is asked; ONNX: one session.run with several outputs). The neighbours come from the index's own vector
(its pooling), already among those outputs.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.deps import EngineDep
from service.errors import NoHeadError
from service.inputs import parse_inputs
from service.routes.inference import infer, json_response, query_params, top_k_predictions
from service.routes.search import RetrievalDep
from service.schemas import error_responses, openapi_body

__all__ = ["AnalyzeRequest", "router"]

router = APIRouter(tags=["inference"])

Answer = Literal["embedding", "probe_embedding", "classes", "neighbors"]
# answer -> backend output it needs (neighbours: the index's own, see Retrieval.output)
_OUTPUT = {"embedding": "embedding", "probe_embedding": "pooled", "classes": "logits"}


class AnalyzeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(..., min_length=1, description="base64-encoded image files (JPEG, PNG, WEBP)")
    include: list[Answer] = Field(
        ["embedding", "classes"],
        min_length=1,
        description="answers per image: embedding (mean pooling), probe_embedding (the head's attention pooling), "
        "classes (top-k), neighbors (the index's k nearest items)",
    )
    normalize: bool = Field(True, description="L2-normalise the embeddings")
    top_k: int = Field(5, ge=1, le=1000, description="classes per image")
    k: int = Field(10, ge=1, le=1000, description="neighbours per image")

    @field_validator("include", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        """Multipart sends one form field: `include=embedding,classes`."""
        return [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else value


_FORM = {
    "include": {"type": "string", "description": "comma-separated answers, e.g. embedding,classes,neighbors"},
    "normalize": {"type": "boolean", "default": True},
    "top_k": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 5},
    "k": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 10},
}


def _unit(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float32)  # (n, D)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


@router.post(
    "/analyze",
    responses={**error_responses(401, 409, 413, 415, 422, 429, 503, 504)},
    openapi_extra=openapi_body("AnalyzeRequest", _FORM),
    summary="Embedding, classes and neighbours of images from one forward",
    description="Per image any of: the mean embedding, the probe (attention-pooled) embedding, top-k classes and "
    "the index's nearest neighbours, all from one decode and one forward. Images as JSON base64 or multipart.",
)
async def analyze(request: Request, engine: EngineDep, retrieval: RetrievalDep) -> Response:
    query_params(request)  # options go in the body: an unknown query parameter is refused, not ignored
    engine.admission_precheck()
    inputs = await parse_inputs(request, AnalyzeRequest, engine.settings.max_images_per_request)
    opts = inputs.options
    include: list[str] = list(dict.fromkeys(opts["include"]))
    info = engine.backend.info
    if {"probe_embedding", "classes"} & set(include) and not info.has_head:
        raise NoHeadError(f"model {info.model_id!r} has no head: probe_embedding and classes need one")
    index = retrieval.require() if "neighbors" in include else None  # 409 no_index before any decoding
    outputs = {_OUTPUT[a] for a in include if a in _OUTPUT}
    if index is not None:
        outputs.add(retrieval.output)
    result = await infer(request, engine, inputs.images, sorted(outputs))
    got = {o: np.stack([row[o] for row in result.rows]) for o in outputs}  # output -> (n, ...)
    body: dict[str, Any] = {"count": len(result.rows)}
    recipes: dict[str, Any] = {}
    for answer, pooling in (("embedding", "mean"), ("probe_embedding", "probe")):
        if answer in include:
            vectors = got[_OUTPUT[answer]].astype(np.float32)
            body[answer] = _unit(vectors) if opts["normalize"] else vectors
            recipes[answer] = engine.recipe(pooling, opts["normalize"])
    if "classes" in include:
        body["classes"] = top_k_predictions(got["logits"], opts["top_k"], info.labels)
    if index is not None:
        hits = await retrieval.call(index.search, got[retrieval.output], opts["k"], recipe=retrieval.recipe)
        body["neighbors"] = [
            {"ids": [h.id for h in q], "scores": [h.score for h in q], "metadata": [h.metadata for h in q]}
            for q in hits
        ]
    body["recipes"] = recipes
    body["batch_sizes"] = result.batch.batch_sizes
    return json_response(body)
