"""Re-check artefacts against PyTorch: checksums first, then parity on fresh random inputs and real images.

`validate_directory(DIR)` checks DIR's manifest and those of its sub-folders (the fp16/ and int8/ variants the CLI
writes), reloading the source checkpoint recorded in each manifest and refusing one whose weights changed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from aimcore import AimModel, sha256_file
from aimcore.manifest import INPUT_NAME, MANIFEST_NAME, ExportManifest, read_manifest
from export.parity import ParityError, Runner, default_image_paths, load_images, run_parity
from export.provenance import SourceMismatchError, load_source_model
from export.runtime import ProviderSpec, create_session, provider_chain

__all__ = ["ValidationResult", "find_manifests", "onnx_runner", "validate_directory", "validate_onnx_file"]

logger = logging.getLogger(__name__)


@dataclass
class ValidationResult:
    directory: str
    kind: str
    precision: str
    passed: bool
    problems: list[str] = field(default_factory=list)
    parity: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "directory": self.directory,
            "kind": self.kind,
            "precision": self.precision,
            "passed": self.passed,
            "problems": self.problems,
            "worst": self.parity.get("worst"),
            "real_images": self.parity.get("real_images"),
            "not_validated": self.parity.get("not_validated"),
        }


def onnx_runner(session: ort.InferenceSession, outputs: Sequence[str]) -> Runner:
    names = list(outputs)

    def run(pixels: np.ndarray) -> dict[str, np.ndarray]:
        values = session.run(names, {INPUT_NAME: np.ascontiguousarray(pixels, dtype=np.float32)})
        return dict(zip(names, values, strict=True))

    return run


def parity_providers(precision: str) -> list[ProviderSpec]:
    """fp32 and int8 are checked on the CPU provider (exact fp32 arithmetic; int8 dynamic quantisation is a CPU
    format). fp16 is checked on CUDA where installed, its intended provider, else on the CPU."""
    if precision == "fp16":
        return provider_chain(["CUDAExecutionProvider", "CPUExecutionProvider"])
    return ["CPUExecutionProvider"]


def validate_onnx_file(
    path: str | os.PathLike[str],
    model: AimModel,
    outputs: Sequence[str],
    precision: str,
    *,
    max_batch: int,
    images: np.ndarray,
    providers: Sequence[ProviderSpec] | None = None,
    raise_on_failure: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parity of an ONNX file against `model`: (the manifest's parity section, runtime facts about the check).

    An fp16 graph that the CPU provider cannot run is recorded as not validated, with the reason, rather than
    failing: fp16 is meant for GPU providers. Every other failure is loud (ParityError or the runtime's error).
    """
    chain = list(providers) if providers is not None else parity_providers(precision)
    cpu_only = all((p if isinstance(p, str) else p[0]) == "CPUExecutionProvider" for p in chain)
    try:
        session = create_session(path, providers=chain)
        provider = session.get_providers()[0]
        parity = run_parity(
            onnx_runner(session, outputs),
            model,
            outputs,
            precision,
            max_batch=max_batch,
            images=images,
            raise_on_failure=raise_on_failure,
        )
    except ParityError:
        raise
    except Exception as exc:
        if precision != "fp16" or not cpu_only:
            raise
        reason = f"onnxruntime {ort.__version__} CPU provider cannot run this fp16 graph: {type(exc).__name__}: {exc}"
        logger.warning("%s", reason)
        return {"not_validated": reason}, {"parity_provider": "CPUExecutionProvider"}
    facts: dict[str, Any] = {"parity_provider": provider}
    if precision == "fp16" and provider == "CPUExecutionProvider":
        facts["parity_note"] = (
            "checked on the CPU provider, which runs float16 nodes that lack CPU kernels in float32: the figures "
            "measure float16 weights and activations between nodes, not GPU float16 arithmetic"
        )
    return parity, facts


def find_manifests(directory: str | os.PathLike[str]) -> list[Path]:
    """DIR/manifest.json and DIR/*/manifest.json, sorted."""
    root = Path(directory)
    found = [root / MANIFEST_NAME] if (root / MANIFEST_NAME).is_file() else []
    found += sorted(p for p in root.glob(f"*/{MANIFEST_NAME}") if p.is_file())
    return found


def _checksum_problems(folder: Path, manifest: ExportManifest) -> list[str]:
    problems = []
    files = [(manifest.artifact, manifest.artifact_sha256)]
    external = manifest.runtime.get("external_data")
    if isinstance(external, dict):
        files.append((external["file"], external["sha256"]))
    if manifest.reference:
        files.append((manifest.reference["file"], manifest.reference["sha256"]))
    for name, expected in files:
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(path) != expected:
            problems.append(f"{name} sha256 differs from the manifest (file changed after export)")
    return problems


def validate_directory(
    directory: str | os.PathLike[str],
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    images: str | os.PathLike[str] | None = None,
    max_batch: int | None = None,
) -> list[ValidationResult]:
    """Validate every artefact under `directory`. Never raises for a failed artefact: each result says why."""
    manifests = find_manifests(directory)
    if not manifests:
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {directory} or its sub-folders")
    models: dict[tuple[str, str], AimModel] = {}
    results = []
    for path in manifests:
        manifest = read_manifest(path)
        folder = path.parent
        result = ValidationResult(str(folder), manifest.kind, manifest.precision, passed=False)
        results.append(result)
        result.problems += _checksum_problems(folder, manifest)
        key = (str(checkpoint or manifest.source.get("checkpoint")), str(manifest.source.get("sha256")))
        try:
            if key not in models:
                models[key] = load_source_model(manifest.source, manifest.config, checkpoint)
        except (SourceMismatchError, OSError, ValueError) as exc:
            result.problems.append(f"cannot reload the PyTorch reference: {exc}")
            continue
        model = models[key]
        batch = max_batch or int(manifest.runtime.get("batch_profile", {}).get("max", 8))
        pixels = load_images(default_image_paths(images), manifest.preprocess_config)
        outputs = list(manifest.outputs)
        try:
            if manifest.kind == "onnx":
                parity, _ = validate_onnx_file(
                    folder / manifest.artifact,
                    model,
                    outputs,
                    manifest.precision,
                    max_batch=batch,
                    images=pixels,
                    raise_on_failure=False,
                )
            else:
                from export.tensorrt import validate_engine_file

                parity = validate_engine_file(
                    folder / manifest.artifact,
                    model,
                    outputs,
                    manifest.precision,
                    max_batch=batch,
                    images=pixels,
                    raise_on_failure=False,
                )
        except Exception as exc:  # a graph that will not load or run is a failed artefact, reported as such
            result.problems.append(f"{type(exc).__name__}: {exc}")
            continue
        result.parity = parity
        result.problems += parity.get("failures", [])
        result.passed = not result.problems
    for r in results:
        (logger.info if r.passed else logger.error)(
            "%s %s %s: %s", r.directory, r.kind, r.precision, "ok" if r.passed else "; ".join(r.problems)
        )
    return results
