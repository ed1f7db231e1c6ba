"""KServe v2 / Open Inference Protocol shapes (what Triton's clients speak), JSON part only: the binary-data
extension appends raw tensor bytes after the JSON header (service.routes.kserve)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "InferInputTensor",
    "InferOutputTensor",
    "InferRequest",
    "InferResponse",
    "KServeError",
    "ModelMetadata",
    "RequestedOutput",
    "ServerMetadata",
    "TensorMetadata",
]


class InferInputTensor(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="IMAGE (BYTES: encoded image files) or PIXELS (FP32 (N, 3, S, S) preprocessed)")
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size: bytes of this tensor in the tail")
    data: list[Any] | None = Field(None, description="row-major values; BYTES as base64 text in JSON")


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="embedding, pooled or logits")
    parameters: dict[str, Any] | None = Field(None, description="binary_data: true for raw float32 bytes")


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="normalize (default true: L2-normalised like /embed), binary_data_output"
    )
    inputs: list[InferInputTensor] = Field(..., min_length=1, max_length=1)
    outputs: list[RequestedOutput] | None = Field(None, description="default: every output the model has")


class InferOutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[float] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[InferOutputTensor]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class KServeError(BaseModel):
    error: str
    code: str = Field(description="the service's stable error code")
