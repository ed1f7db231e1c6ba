"""Inference backends behind one protocol (see base.py), and `create_backend(settings)`.

What `settings.model` names decides what can serve it:
- an export directory (`manifest.json` beside `model.onnx` / `model.plan`), or a folder of such directories:
  onnxruntime or tensorrt;
- anything else `aimcore.load_model` takes (checkpoint file or folder, aim-demo, released flavor, HF id): torch;
- nothing: the bundled aim-demo when shipped (on a CPU with onnxruntime, its int8 ONNX export, the fastest CPU path
  within cosine 0.999 of fp32), else aim-debug with random weights (and a loud warning).
`auto` with a checkpoint source (or none) measures the candidates at start and serves the fastest that keeps cosine
0.999 to fp32 and is batch-invariant (service.backends.autoselect; `autoselect=false` restores the static order).
For an export source `auto` picks, best first: a TensorRT engine (tensorrt package + GPU), ONNX Runtime (its
TensorRT/CUDA providers first), PyTorch; each choice and each skipped candidate is logged with its reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import aimcore
from aimcore import AimModel, ModelUnavailableError, build_model, get_flavor, sha256_file
from aimcore.lit_sources import is_lit_source
from aimcore.manifest import MANIFEST_NAME, ExportManifest, read_manifest
from aimcore.sources import BUNDLED_DIR
from service.backends.base import BACKEND_OUTPUTS, BackendInfo, InferenceBackend
from service.backends.lit_onnx import is_lit_export
from service.backends.onnx_backend import onnx_providers
from service.backends.torch_backend import TorchBackend, resolve_device
from service.backends.trt_backend import tensorrt_available
from service.settings import Settings

__all__ = [
    "BACKEND_OUTPUTS",
    "BackendInfo",
    "InferenceBackend",
    "LoadedBackend",
    "create_backend",
    "find_artifacts",
    "golden_path_for",
]

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS_WARNING = (
    "SERVING aim-debug WITH RANDOM WEIGHTS: no model was configured and the bundled aim-demo is not installed. "
    "Embeddings and labels are meaningless. Set AIM_MODEL (or --model) to a checkpoint, export directory or "
    "released model (aim-600M ...)"
)


@dataclass
class LoadedBackend:
    """A ready backend plus what the boot self-check needs.

    golden_path: where reference outputs stored with the model live (read if present).
    reference: a torch model in fp32 to compute reference outputs from when none are stored (None: the backend
    itself at batch 1 serves as reference, a batch-consistency check only).
    """

    backend: InferenceBackend
    reason: str
    golden_path: Path | None = None
    reference: AimModel | None = None
    warnings: list[str] = field(default_factory=list)
    manifest: ExportManifest | None = None
    selection: dict[str, Any] | None = None  # what autoselect measured (service.backends.autoselect)


def find_artifacts(source: str | None) -> list[tuple[Path, ExportManifest]]:
    """Export artefact directories named by `source` (the directory itself, its subdirectories, or the directory
    of an artefact file). Empty when `source` is not an export."""
    if source is None:
        return []
    path = Path(source)
    if path.is_file() and path.suffix in (".onnx", ".plan", ".engine"):
        path = path.parent
    if not path.is_dir():
        return []
    dirs = (
        [path]
        if (path / MANIFEST_NAME).is_file()
        else sorted(p for p in path.iterdir() if (p / MANIFEST_NAME).is_file())
    )
    return [(d, read_manifest(d)) for d in dirs]


def golden_path_for(model: AimModel | None, source: str | None) -> Path | None:
    """Reference outputs live beside the weights: `<checkpoint stem>.golden.npz`, or `golden.npz` in a folder."""
    if source is not None and Path(source).is_dir():
        return Path(source) / "golden.npz"
    files = [Path(f) for f in getattr(model, "checkpoint_files", []) or []]
    if not files:
        return None
    if len(files) > 1:  # backbone + head: the pair's folder
        return files[0].parent / "golden.npz"
    return files[0].with_suffix(".golden.npz")


BUNDLED_CPU_ARTIFACT = BUNDLED_DIR / "aim-demo" / "onnx-int8"
# The int8 export is the bundled default on CPUs only while it stays this close to fp32 (issue: export benchmark).
BUNDLED_INT8_MIN_COSINE = 0.999


def bundled_cpu_artifact(settings: Settings) -> Path | None:
    """With no model configured, on a CPU: the bundled demo's int8 ONNX export, the fastest CPU path whose
    embeddings stay within cosine 0.999 of fp32 (docs/BENCHMARKS.md). None where it does not apply."""
    if settings.model is not None or settings.backend not in ("auto", "onnxruntime"):
        return None
    if resolve_device(settings.device) != "cpu" or not (BUNDLED_CPU_ARTIFACT / MANIFEST_NAME).is_file():
        return None
    if not onnx_providers():
        logger.info("bundled int8 export skipped: onnxruntime is not installed; serving aim-demo with torch")
        return None
    cosine = read_manifest(BUNDLED_CPU_ARTIFACT).parity.get("real_images", {}).get("embedding_min_cosine", 0.0)
    if cosine < BUNDLED_INT8_MIN_COSINE:
        logger.warning("bundled int8 export skipped: embedding cosine %.5f < %.3f", cosine, BUNDLED_INT8_MIN_COSINE)
        return None
    logger.info("no model configured, CPU: serving the bundled aim-demo int8 ONNX export (cosine %.5f to fp32)", cosine)
    return BUNDLED_CPU_ARTIFACT


def _load_torch_model(settings: Settings) -> tuple[AimModel, str, list[str]]:
    """(model, model id, warnings) for a non-artefact source, with the no-configuration fallbacks."""
    layers: str | tuple[int, ...] | None = settings.probe_layers
    if layers and layers not in ("best", "last"):
        layers = tuple(int(i) for i in layers.split(","))
    if settings.model is not None:
        return aimcore.load_model(settings.model, head=settings.head, probe_layers=layers), settings.model, []
    try:
        return aimcore.load_model("aim-demo", probe_layers=layers), "aim-demo", []
    except ModelUnavailableError:
        pass
    torch.manual_seed(0)  # the same random weights on every start, so vectors are at least stable
    model = build_model(get_flavor("aim-debug")).eval()
    banner = "!" * 100
    logger.warning("\n%s\n%s\n%s", banner, RANDOM_WEIGHTS_WARNING, banner)
    return model, "aim-debug (random weights)", [RANDOM_WEIGHTS_WARNING]


def _reference_from_source(manifest: ExportManifest) -> AimModel | None:
    """The torch model an artefact was exported from, when its weight files are still here and unchanged."""
    ckpt = manifest.source.get("checkpoint")
    entries = manifest.source.get("files") or []
    if not ckpt or not entries:
        return None
    for entry in entries:
        path = Path(entry.get("path", ""))
        if not path.is_file() or sha256_file(path) != entry.get("sha256"):
            logger.info("export source %s is missing or changed; not using it as the self-check reference", path)
            return None
    return aimcore.load_model(ckpt, config=manifest.model_config)


def _pick_artifact(settings: Settings, artifacts: list[tuple[Path, ExportManifest]]) -> tuple[str, Path, str]:
    """(backend name, directory, reason) for an export source."""
    by_kind = {m.kind: d for d, m in reversed(artifacts)}
    trt_ok, trt_why = tensorrt_available()
    providers = onnx_providers()
    wanted = settings.backend
    if wanted == "tensorrt" or (wanted == "auto" and "tensorrt" in by_kind and trt_ok):
        if "tensorrt" not in by_kind:
            raise ValueError(f"backend tensorrt needs a TensorRT engine directory; {settings.model} has none")
        return "tensorrt", by_kind["tensorrt"], "a TensorRT engine is present and TensorRT + a GPU are usable"
    skipped = []
    if "tensorrt" in by_kind:
        skipped.append(f"tensorrt skipped: {trt_why}")
    if wanted in ("onnxruntime", "auto") and "onnx" in by_kind:
        if not providers:
            raise ValueError("the onnxruntime package is not installed: pip install onnxruntime")
        gpu = [p for p in providers if p in ("TensorrtExecutionProvider", "CUDAExecutionProvider")]
        where = f"GPU providers {gpu}" if gpu and settings.device != "cpu" else "CPUExecutionProvider"
        return "onnxruntime", by_kind["onnx"], "; ".join([f"ONNX artefact with {where}", *skipped])
    if wanted == "torch":
        return "torch", artifacts[0][0], "torch asked for: serving the artefact's source checkpoint"
    raise ValueError(f"backend {wanted!r} cannot serve {settings.model}: artefacts there are {sorted(by_kind)}")


def _onnx_loaded(backend: InferenceBackend, directory: Path, manifest: ExportManifest, reason: str) -> LoadedBackend:
    """An ONNX Runtime / TensorRT backend with its stored reference outputs (or its source model to compute them)."""
    stored = directory / "golden.npz"
    if not stored.is_file() and manifest.reference:
        stored = directory / str(manifest.reference.get("file", "reference.npz"))
    ref = None if stored.is_file() else _reference_from_source(manifest)
    return LoadedBackend(backend, reason, stored, reference=ref, manifest=manifest)


def _autoselected(settings: Settings) -> LoadedBackend | None:
    """backend=auto with a checkpoint source (or none): measure the candidates here and serve the fastest that
    passes (service.backends.autoselect). None when the source is an export directory (picked by kind)."""
    from service.backends.autoselect import onnx_candidate, select_backend, torch_candidates

    if find_artifacts(settings.model):
        return None
    model, model_id, warnings = _load_torch_model(settings)
    device = resolve_device(settings.device)
    extra = {"random_weights": True} if warnings else {}
    candidates = torch_candidates(model, settings, device, model_id, extra=extra)
    bundled = BUNDLED_CPU_ARTIFACT / MANIFEST_NAME
    if settings.model is None and not warnings and device == "cpu" and bundled.is_file() and onnx_providers():
        candidates.append(onnx_candidate(BUNDLED_CPU_ARTIFACT, read_manifest(BUNDLED_CPU_ARTIFACT), settings))
    chosen, backend, selection = select_backend(candidates, model, settings)
    m = next(m for m in selection.measurements if m.name == chosen.name)
    what = "random weights" if warnings else "no model configured: the bundled demo" if settings.model is None else ""
    what = what or "the source is a checkpoint, not an export"
    reason = (
        f"{what}; measured at start: {chosen.name} is the fastest passing candidate ({m.images_per_s:.0f} img/s "
        f"at batch {selection.max_batch}; "
        + ", ".join(f"{c.name} {c.images_per_s:.0f}" for c in selection.measurements)
        + ")"
    )
    logger.info("backend for %s: %s", model_id, reason)
    if chosen.directory is not None and chosen.manifest is not None:
        loaded = _onnx_loaded(backend, chosen.directory, chosen.manifest, reason)
    else:
        source = settings.model if settings.model is not None else None
        loaded = LoadedBackend(backend, reason, golden_path_for(model, source), reference=model, warnings=warnings)
    loaded.selection = selection.to_dict()
    return loaded


def create_backend(settings: Settings) -> LoadedBackend:
    """Load what `settings` names on the backend it asks for (or the best present for `auto`)."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    if is_lit_export(settings.model):  # an AIMv2-LiT ONNX export: both towers on ONNX Runtime
        from service.backends.lit_onnx import load_lit_onnx_backend

        return load_lit_onnx_backend(settings)
    lit_source = settings.model is not None and is_lit_source(settings.model)
    if settings.backend == "auto" and settings.autoselect and not lit_source:
        selected = _autoselected(settings)
        if selected is not None:
            return selected
    bundled = bundled_cpu_artifact(settings)
    artifacts = find_artifacts(str(bundled) if bundled is not None else settings.model)
    if artifacts:
        name, directory, reason = _pick_artifact(settings, artifacts)
        manifest = read_manifest(directory)
        if name == "tensorrt":
            from service.backends.trt_backend import TensorRTBackend

            device = settings.device if settings.device.startswith("cuda") else "cuda"
            backend: InferenceBackend = TensorRTBackend(
                directory, device=device, max_batch_size=settings.max_batch_size
            )
        elif name == "onnxruntime":
            from service.backends.onnx_backend import OnnxBackend

            backend = OnnxBackend(
                directory,
                device=settings.device,
                max_batch_size=settings.max_batch_size,
                threads=settings.torch_threads,
            )
        else:
            ref = _reference_from_source(manifest)
            if ref is None:
                raise ValueError(f"backend torch: the source checkpoint of {directory} is not available here")
            backend = TorchBackend(
                ref,
                model_id=str(manifest.source.get("checkpoint")),
                device=settings.device,
                precision=settings.precision,
                max_batch_size=settings.max_batch_size,
            )
            return LoadedBackend(backend, reason, golden_path_for(ref, None), reference=ref)
        logger.info("backend %s for %s: %s", name, directory, reason)
        return _onnx_loaded(backend, directory, manifest, reason)

    if settings.backend in ("onnxruntime", "tensorrt"):
        raise ValueError(
            f"backend {settings.backend} serves an exported artefact, and {settings.model or 'the default model'} is "
            "a checkpoint: export it first (python -m export ...) and pass the export directory as --model"
        )
    if lit_source:  # AIMv2-LiT: image and text towers (not autoselected: one torch path serves both towers)
        from service.backends.lit_backend import load_lit_backend

        return load_lit_backend(settings)
    model, model_id, warnings = _load_torch_model(settings)
    device = resolve_device(settings.device)
    what = "random weights" if warnings else "a checkpoint, not an export"
    reason = f"the source is {what}: torch on {device}"
    if settings.backend == "torch":
        reason = f"torch asked for, on {device}"
    if settings.backend == "auto" and device == "cpu" and torch.cuda.is_available() is False:
        reason += " (no CUDA GPU; export to ONNX for onnxruntime)"
    logger.info("backend torch for %s: %s", model_id, reason)
    extra = {"random_weights": True} if warnings else {}
    backend = TorchBackend(
        model,
        model_id=model_id,
        device=device,
        precision=settings.precision,
        max_batch_size=settings.max_batch_size,
        extra=extra,
    )
    source = settings.model if settings.model is not None else None
    return LoadedBackend(backend, reason, golden_path_for(model, source), reference=model, warnings=warnings)
