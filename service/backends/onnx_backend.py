"""ONNX Runtime backend over an exported artefact directory (`model.onnx` + `manifest.json`, see aimcore.manifest).

Providers: TensorRT > CUDA > CPU, whichever this onnxruntime build has (`export.runtime.provider_chain`), or CPU
only when the device is "cpu". The session factory is export's, so the exporter's parity checks and the service run
the graph with the same options.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from aimcore import sha256_file
from aimcore.manifest import INPUT_NAME, ExportManifest, read_manifest
from service.backends.base import BackendInfo

__all__ = ["OnnxBackend", "onnx_providers"]

logger = logging.getLogger(__name__)


def onnx_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


class OnnxBackend:
    def __init__(
        self,
        directory: str | Path,
        *,
        device: str = "auto",
        max_batch_size: int = 32,
        threads: int | None = None,
        verify_checksum: bool = True,
    ) -> None:
        try:
            from export.runtime import create_session, provider_chain
        except ImportError as exc:  # onnxruntime missing
            raise RuntimeError(
                f"the onnxruntime backend needs the onnxruntime package ({exc}); pip install onnxruntime "
                "(or onnxruntime-gpu)"
            ) from exc
        self.directory = Path(directory)
        manifest: ExportManifest = read_manifest(self.directory)
        if manifest.kind != "onnx":
            raise ValueError(f"{self.directory} holds a {manifest.kind!r} artefact, not ONNX")
        path = self.directory / manifest.artifact
        if verify_checksum:
            actual = sha256_file(path)
            if actual != manifest.artifact_sha256:
                raise ValueError(
                    f"{path} does not match its manifest (sha256 {actual[:12]}..., manifest says "
                    f"{manifest.artifact_sha256[:12]}...): the artefact is damaged or was replaced; export it again"
                )
        if device == "cpu":
            providers: list[Any] = ["CPUExecutionProvider"]
        else:
            index = int(device.split(":")[1]) if device.startswith("cuda:") else 0
            providers = provider_chain(device_id=index)
        self.session = create_session(path, providers=providers, intra_op_threads=threads, allow_spinning=False)
        self.output_names = [o.name for o in self.session.get_outputs()]
        used = self.session.get_providers()
        checked = int(manifest.runtime.get("batch_profile", {}).get("max", max_batch_size))
        if max_batch_size > checked:  # the batch axis is dynamic; only the parity check stopped there
            logger.warning("max batch size %d > the %d the export checked for parity", max_batch_size, checked)
        on_gpu = used[0] in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
        self.info = BackendInfo.from_manifest(
            "onnxruntime",
            manifest,
            self.directory,
            device=(device if device.startswith("cuda") else "cuda") if on_gpu else "cpu",
            max_batch_size=max_batch_size,
            providers=used,
            manifest_runtime=manifest.runtime,
        )
        self.manifest = manifest

    def infer(self, pixels: np.ndarray, outputs: Collection[str]) -> dict[str, np.ndarray]:
        missing = [o for o in outputs if o not in self.output_names]
        if missing:
            raise ValueError(f"the ONNX graph has no output {missing}; it has {self.output_names}")
        names = list(outputs)
        x = np.ascontiguousarray(pixels, dtype=np.float32)  # (B, C, S, S)
        values = self.session.run(names, {INPUT_NAME: x})
        return {n: np.asarray(v, dtype=np.float32) for n, v in zip(names, values, strict=True)}

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
