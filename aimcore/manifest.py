"""The manifest written beside every exported artefact (ONNX, TensorRT) and read by the service.

It lives in aimcore because both `export` (writer) and `service` (reader) depend on it and neither may import the
other. One JSON file, `manifest.json`, per artefact directory.

Graph contract for every artefact (ONNX and TensorRT alike):
- input  `pixels`: float32 (B, C, S, S), the output of `aimcore.preprocess`; B is dynamic.
- output `embedding`: float32 (B, D), mean over tokens of post_trunk_norm(last block), NOT L2-normalised
  (the consumer normalises; keeping it raw lets one graph serve both choices).
- output `pooled`: float32 (B, D), the head's attention-pooled vector (only with a head).
- output `logits`: float32 (B, num_classes) (only with a head).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aimcore.config import AimConfig
from aimcore.fsio import atomic_write_text
from aimcore.preprocess import PreprocessConfig

__all__ = [
    "INPUT_NAME",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "OUTPUT_EMBEDDING",
    "OUTPUT_LOGITS",
    "OUTPUT_POOLED",
    "PROBE_GRAPH_DIR",
    "ExportManifest",
    "read_manifest",
    "write_manifest",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "aim-export/1"
# Subdirectory of an ONNX artefact holding its early-exit graph (pooled + logits only, stopping after the last
# probe layer), an artefact of its own with its own manifest and parity; the service routes logits-only batches to it.
PROBE_GRAPH_DIR = "probe"
INPUT_NAME = "pixels"
OUTPUT_EMBEDDING = "embedding"
OUTPUT_POOLED = "pooled"
OUTPUT_LOGITS = "logits"


@dataclass
class ExportManifest:
    """What an artefact is, where it came from, and how well it matches PyTorch.

    artifact: file name relative to the manifest's directory (e.g. "model.onnx", "model.plan").
    kind: "onnx" or "tensorrt". precision: "fp32", "fp16", "bf16" or "int8".
    source: {"checkpoint": str, "sha256": str} of the weights that were exported.
    outputs: output name -> shape with "B" for the dynamic batch axis, e.g. {"embedding": ["B", 1536]}.
    parity: measured agreement with PyTorch, free-form but numeric (e.g. {"embedding_max_rel_err": 3e-6}).
    runtime: versions and settings (opset, onnxruntime / TensorRT version, batch profile).
    labels: class names for the logits, when the checkpoint carried them.
    reference: optional golden outputs beside the artefact for a start-up self-check, e.g. {"file":
        "reference.npz", "sha256": ..., "rows": 5, "tolerance": {"max_rel_err": 1e-4}}; the .npz holds `pixels`
        (rows, C, S, S) and PyTorch fp32 arrays named like the outputs. None in manifests that predate it.
    """

    artifact: str
    kind: str
    precision: str
    artifact_sha256: str
    config: dict[str, Any]
    preprocess: dict[str, Any]
    source: dict[str, Any]
    outputs: dict[str, list[Any]]
    parity: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)
    labels: list[str] | None = None
    reference: dict[str, Any] | None = None
    format: str = MANIFEST_FORMAT

    def __post_init__(self) -> None:
        if self.kind not in ("onnx", "tensorrt"):
            raise ValueError(f"manifest kind must be 'onnx' or 'tensorrt', got {self.kind!r}")
        if self.precision not in ("fp32", "fp16", "bf16", "int8"):
            raise ValueError(f"manifest precision must be fp32/fp16/bf16/int8, got {self.precision!r}")
        if self.format != MANIFEST_FORMAT:
            raise ValueError(f"unsupported manifest format {self.format!r}; this version reads {MANIFEST_FORMAT!r}")

    @property
    def model_config(self) -> AimConfig:
        return AimConfig.from_dict(self.config)

    @property
    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.preprocess)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExportManifest:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown manifest fields {unknown}")
        return cls(**dict(data))


def read_manifest(directory: str | os.PathLike[str]) -> ExportManifest:
    """Read `<directory>/manifest.json` (or a manifest file path)."""
    path = Path(directory)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no export manifest at {path}")
    return ExportManifest.from_dict(json.loads(path.read_text()))


def write_manifest(manifest: ExportManifest, directory: str | os.PathLike[str]) -> Path:
    """Write `<directory>/manifest.json` atomically (temp file, fsync, rename)."""
    target = Path(directory) / MANIFEST_NAME
    return atomic_write_text(target, json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
