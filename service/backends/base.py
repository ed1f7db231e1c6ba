"""The one protocol every inference backend implements (PyTorch, ONNX Runtime, TensorRT, and fakes in tests).

A backend takes a batch of preprocessed pixels and returns the requested outputs. Output names follow the export
graph contract in `aimcore.manifest`:
- "embedding": (B, D) mean over tokens of post_trunk_norm(last block), not L2-normalised;
- "pooled": (B, D) the head's attention-pooled vector (head required);
- "logits": (B, num_classes) (head required).
Backends are synchronous and called from worker threads by the batcher; they never see HTTP.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from aimcore import AimConfig, PreprocessConfig
from aimcore.manifest import ExportManifest
from service.redact import public_name

__all__ = ["BACKEND_OUTPUTS", "BackendInfo", "InferenceBackend"]

BACKEND_OUTPUTS = ("embedding", "pooled", "logits")


@dataclass
class BackendInfo:
    """What is being served, for /info, response recipes and index compatibility checks.

    model_id: a public name (a checkpoint's or export folder's file name, an HF id or "aim-demo": never a server
    path, it reaches unauthenticated clients); model_sha256: checksum of the weights or artefact (the embedding
    recipe's identity); precision: "fp32", "bf16", "fp16" or "int8"; device: "cpu", "cuda:0", ...
    """

    name: str
    model_id: str
    model_sha256: str
    config: AimConfig
    preprocess: PreprocessConfig
    labels: list[str] | None
    precision: str = "fp32"
    device: str = "cpu"
    max_batch_size: int = 32
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Backends pass what they were loaded from; clients see /info, recipes and metric labels built from this.
        self.model_id = public_name(str(self.model_id))

    @property
    def has_head(self) -> bool:
        return self.config.has_head

    @classmethod
    def from_manifest(
        cls, name: str, manifest: ExportManifest, directory: Any, *, device: str, max_batch_size: int, **extra: Any
    ) -> BackendInfo:
        """Info for a backend serving an exported artefact (ONNX Runtime, TensorRT). `weights_sha256` is the source
        checkpoint's digest, which the embedding recipe uses, so an export and its checkpoint share a recipe."""
        return cls(
            name=name,
            model_id=str(directory),
            model_sha256=manifest.artifact_sha256,
            config=manifest.model_config,
            preprocess=manifest.preprocess_config,
            labels=manifest.labels,
            precision=manifest.precision,
            device=device,
            max_batch_size=max_batch_size,
            extra={
                "weights_sha256": manifest.source.get("sha256"),
                "source": manifest.source,
                "export_parity": manifest.parity,
                **extra,
            },
        )


@runtime_checkable
class InferenceBackend(Protocol):
    info: BackendInfo

    def infer(self, pixels: np.ndarray, outputs: Collection[str]) -> dict[str, np.ndarray]:
        """pixels: float32 (B, C, S, S) with B <= info.max_batch_size. Returns float32 arrays for `outputs`."""
        ...

    def close(self) -> None:
        """Release sessions, threads and device memory."""
        ...
