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
from aimcore.manifest import INPUT_NAME, MANIFEST_NAME, PROBE_GRAPH_DIR, ExportManifest, read_manifest
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
        # Early exit (issue 13): batches that want no embedding run the probe-layer graph beside this one.
        self.probe_session: Any = None
        self.probe_outputs: list[str] = []
        probe = self._probe_manifest(manifest)
        if probe is not None:
            probe_dir = self.directory / PROBE_GRAPH_DIR
            probe_path = probe_dir / probe.artifact
            if verify_checksum and sha256_file(probe_path) != probe.artifact_sha256:
                raise ValueError(f"{probe_path} does not match its manifest: the early-exit graph is damaged")
            self.probe_session = create_session(
                probe_path, providers=providers, intra_op_threads=threads, allow_spinning=False
            )
            self.probe_outputs = [o.name for o in self.probe_session.get_outputs()]
            self.info.extra["early_exit"] = {
                "directory": str(probe_dir),
                "outputs": self.probe_outputs,
                "blocks_run": probe.runtime.get("blocks_run"),
                "of_blocks": manifest.model_config.depth,
                "parity": probe.parity,
            }
            logger.info(
                "early exit: %s for batches without embedding (%s blocks)", probe_dir, probe.runtime.get("blocks_run")
            )

    def _probe_manifest(self, manifest: ExportManifest) -> ExportManifest | None:
        """The probe-layer graph's manifest when it is present and belongs to this artefact (same source weights,
        precision and preprocessing), else None (logged)."""
        path = self.directory / PROBE_GRAPH_DIR / MANIFEST_NAME
        if not path.is_file():
            return None
        probe = read_manifest(path.parent)
        same = (
            probe.kind == "onnx"
            and probe.precision == manifest.precision
            and probe.source.get("sha256") == manifest.source.get("sha256")
            and probe.preprocess == manifest.preprocess
            and "embedding" not in probe.outputs
        )
        if not same:
            logger.warning("%s is not this artefact's early-exit graph (other weights or precision); not used", path)
            return None
        return probe

    def infer(self, pixels: np.ndarray, outputs: Collection[str]) -> dict[str, np.ndarray]:
        names = list(outputs)
        session, available = self.session, self.output_names
        if self.probe_session is not None and names and all(o in self.probe_outputs for o in names):
            session, available = self.probe_session, self.probe_outputs
        missing = [o for o in names if o not in available]
        if missing:
            raise ValueError(f"the ONNX graph has no output {missing}; it has {available}")
        x = np.ascontiguousarray(pixels, dtype=np.float32)  # (B, C, S, S)
        values = session.run(names, {INPUT_NAME: x})
        return {n: np.asarray(v, dtype=np.float32) for n, v in zip(names, values, strict=True)}

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
        self.probe_session = None
