"""OpenAI's embeddings request and response shapes, with the image inputs of Infinity and Jina."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "EmbeddingObject",
    "EmbeddingsRequest",
    "EmbeddingsResponse",
    "ImageInput",
    "ModelList",
    "ModelObject",
    "OpenAIError",
    "OpenAIErrorResponse",
    "Usage",
]


class ImageInput(BaseModel):
    """Jina's input object: `{"image": <base64 | data URI | URL>}`."""

    model_config = ConfigDict(extra="forbid")
    image: str


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str | list[str | ImageInput | int | list[int]] = Field(
        ...,
        description="images: base64 strings (with modality=image), data:image/...;base64, URIs, "
        '[{"image": ...}] objects (Jina), or http(s) URLs when the operator turns URL fetching on; on an '
        "AIMv2-LiT model, bare strings are texts (the text tower)",
    )
    model: str = Field(..., description="the served model's name (GET /v1/models)")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: little-endian float32 bytes, as the openai SDK asks by default"
    )
    dimensions: int | None = Field(None, description="accepted only when equal to the model's dimension")
    user: str | None = Field(None, description="accepted and ignored")
    modality: Literal["image", "text"] | None = Field(
        None, description="Infinity's switch: image makes bare strings base64 images"
    )
    pooling: Literal["mean", "probe"] = Field("mean", description="as /embed's pooling")


class EmbeddingObject(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int = Field(description="image patches processed")
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingObject]
    model: str
    usage: Usage


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class OpenAIErrorResponse(BaseModel):
    error: OpenAIError
