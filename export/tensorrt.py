"""ONNX -> TensorRT engine (`model.plan`) with a batch profile, a timing cache, a parity check and a manifest.

Needs the `tensorrt` Python package and a CUDA GPU visible to torch (torch's CUDA tensors hold the engine's
buffers, so no extra CUDA binding is needed). Elsewhere every entry point raises TensorRTUnavailable with the
reason, and the CLI exits with status 3: never a silent fallback.

Precision. TensorRT 11 removed the builder's precision flags: a network's types come from the ONNX graph
("strongly typed"). So:
- an fp16 engine is built from the fp16 ONNX (`python -m export onnx --fp16`: float16 inside, float32 in and
  out) as a strongly typed network, on any TensorRT version; TensorRT 10 can also build it from the fp32 ONNX
  with the FP16 flag;
- a bf16 engine needs TensorRT 10's BF16 flag and a GPU of compute capability 8.0 or newer;
- an fp32 engine is built from the fp32 ONNX with TF32 turned off, so it can meet the 1e-4 parity bound.
The batch profile is min/opt/max on the `pixels` batch axis; the engine is tied to this GPU model and this
TensorRT version, both recorded in the manifest.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from aimcore import AimModel, sha256_file
from aimcore.fsio import atomic_write_bytes
from aimcore.manifest import INPUT_NAME, ExportManifest, read_manifest, write_manifest
from export.artefact import clear_manifest, make_readable, write_reference
from export.parity import default_image_paths, load_images, run_parity
from export.provenance import load_source_model

__all__ = ["ENGINE_NAME", "EngineRunner", "TensorRTUnavailable", "build_engine", "require_tensorrt"]

logger = logging.getLogger(__name__)

ENGINE_NAME = "model.plan"
TIMING_CACHE_NAME = "timing.cache"
ENGINE_PRECISIONS = ("fp16", "bf16", "fp32")


class TensorRTUnavailable(RuntimeError):
    """TensorRT, a GPU or a needed TensorRT feature is missing here."""


def require_tensorrt() -> ModuleType:
    """The tensorrt module, after checking that a CUDA GPU is usable from torch."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable(
            "TensorRT is not installed (pip install tensorrt on a machine with an NVIDIA GPU and CUDA 12); "
            f"import failed: {exc}"
        ) from exc
    if not torch.cuda.is_available():
        raise TensorRTUnavailable(
            f"TensorRT {trt.__version__} is installed but no CUDA GPU is usable from torch {torch.__version__} "
            f"(CUDA build: {torch.version.cuda}); TensorRT engines are built and run on a GPU"
        )
    return trt


def _trt_major(trt: ModuleType) -> int:
    return int(str(trt.__version__).split(".")[0])


def _strongly_typed_flags(trt: ModuleType) -> int:
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _network_flags(trt: ModuleType, onnx_precision: str, precision: str) -> tuple[int, list[Any]]:
    """(create_network flags, builder flags to set) for building a `precision` engine from an ONNX graph."""
    has_weak = hasattr(trt.BuilderFlag, "FP16")
    if onnx_precision == precision == "fp16":
        return _strongly_typed_flags(trt), []
    if onnx_precision != "fp32":
        raise ValueError(f"cannot build a {precision} engine from a {onnx_precision} ONNX graph; use the fp32 one")
    if precision == "fp32":
        return _strongly_typed_flags(trt), []
    if not has_weak:
        hint = "pass the fp16 ONNX (python -m export onnx --fp16 ...)" if precision == "fp16" else "use fp16"
        raise TensorRTUnavailable(
            f"TensorRT {trt.__version__} builds strongly typed networks only, so a {precision} engine cannot come "
            f"from an fp32 graph: {hint}"
        )
    if precision == "bf16":
        if not hasattr(trt.BuilderFlag, "BF16"):
            raise TensorRTUnavailable(f"TensorRT {trt.__version__} has no bf16 support")
        if torch.cuda.get_device_capability() < (8, 0):
            raise TensorRTUnavailable(f"bf16 needs compute capability >= 8.0; {torch.cuda.get_device_name()} lacks it")
        return 0, [trt.BuilderFlag.BF16]
    return 0, [trt.BuilderFlag.FP16]


def _torch_dtype(trt: ModuleType, dtype: Any) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype=trt.nptype(dtype))).dtype


class EngineRunner:
    """Runs a serialised engine on CUDA: pixels float32 (B, C, S, S) numpy -> {output: float32 numpy}."""

    def __init__(self, plan: bytes, outputs: Sequence[str]) -> None:
        self.trt = require_tensorrt()
        self._logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self._logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RuntimeError("TensorRT could not deserialise the engine (other GPU model or TensorRT version?)")
        self.context = self.engine.create_execution_context()
        self.outputs = list(outputs)
        self.max_batch = int(self.engine.get_tensor_profile_shape(INPUT_NAME, 0)[2][0])

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        chunks = [self._run(pixels[i : i + self.max_batch]) for i in range(0, len(pixels), self.max_batch)]
        return {name: np.concatenate([c[name] for c in chunks]) for name in self.outputs}

    def _run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).cuda()
        self.context.set_input_shape(INPUT_NAME, tuple(x.shape))
        self.context.set_tensor_address(INPUT_NAME, x.data_ptr())
        results: dict[str, torch.Tensor] = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
            results[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, results[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return {name: t.float().cpu().numpy() for name, t in results.items()}


def validate_engine_file(
    path: str | os.PathLike[str],
    model: AimModel,
    outputs: Sequence[str],
    precision: str,
    *,
    max_batch: int,
    images: np.ndarray,
    raise_on_failure: bool = True,
) -> dict[str, Any]:
    runner = EngineRunner(Path(path).read_bytes(), outputs)
    return run_parity(
        runner,
        model,
        outputs,
        precision,
        max_batch=max_batch,
        images=images,
        raise_on_failure=raise_on_failure,
    )


def build_engine(
    onnx_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    precision: str = "fp16",
    min_batch: int = 1,
    opt_batch: int | None = None,
    max_batch: int | None = None,
    timing_cache: str | os.PathLike[str] | None = None,
    workspace_gib: float | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    images: str | os.PathLike[str] | None = None,
    check_parity: bool = True,
) -> ExportManifest:
    """Build `<out_dir>/model.plan` from an exported ONNX file (its manifest must sit beside it).

    Batch profile defaults: max = the ONNX manifest's max batch, opt = max // 2. timing_cache: a file reused and
    updated across builds (default `<out_dir>/timing.cache`). checkpoint: where the PyTorch source is now, if it
    moved. Raises TensorRTUnavailable, ParityError, or RuntimeError when the parser or builder fails.
    """
    if precision not in ENGINE_PRECISIONS:
        raise ValueError(f"TensorRT precision must be one of {ENGINE_PRECISIONS}, got {precision!r}")
    onnx_file = Path(onnx_path)
    source = read_manifest(onnx_file.parent)
    if source.kind != "onnx":
        raise ValueError(f"{onnx_file.parent} holds a {source.kind} artefact, not ONNX")
    trt = require_tensorrt()
    cfg = source.model_config
    hi = max_batch or int(source.runtime.get("batch_profile", {}).get("max", 32))
    opt = opt_batch or max(min_batch, hi // 2)
    if not 1 <= min_batch <= opt <= hi:
        raise ValueError(f"batch profile must satisfy 1 <= min <= opt <= max, got {min_batch}/{opt}/{hi}")
    network_flags, builder_flags = _network_flags(trt, source.precision, precision)

    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_file)):  # by path, so external data beside it is found
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_file}: {errors}")
    config = builder.create_builder_config()
    for flag in builder_flags:
        config.set_flag(flag)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 rounds matmul inputs to 10 bits: no 1e-4 parity
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    shape = (cfg.num_channels, cfg.img_size, cfg.img_size)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (min_batch, *shape), (opt, *shape), (hi, *shape))
    config.add_optimization_profile(profile)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clear_manifest(out)
    cache_path = Path(timing_cache) if timing_cache else out / TIMING_CACHE_NAME
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_file} (see the log above)")
    build_s = time.perf_counter() - start
    engine_path = atomic_write_bytes(out / ENGINE_NAME, bytes(plan))
    atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    logger.info("built %s (%s) in %.1f s", engine_path, precision, build_s)

    model = load_source_model(source.source, source.config, checkpoint)
    outputs = list(source.outputs)
    pixels = load_images(default_image_paths(images), source.preprocess_config)
    if check_parity:
        parity = validate_engine_file(engine_path, model, outputs, precision, max_batch=hi, images=pixels)
    else:
        parity = {"skipped": "check_parity=False"}
    major, minor = torch.cuda.get_device_capability()
    manifest = ExportManifest(
        artifact=ENGINE_NAME,
        kind="tensorrt",
        precision=precision,
        artifact_sha256=sha256_file(engine_path),
        config=source.config,
        preprocess=source.preprocess,
        source=source.source,
        outputs=source.outputs,
        parity=parity,
        runtime={
            "tensorrt": str(trt.__version__),
            "gpu": torch.cuda.get_device_name(),
            "compute_capability": f"{major}.{minor}",
            "batch_profile": {"min": min_batch, "opt": opt, "max": hi},
            "strongly_typed": bool(network_flags),
            "build_seconds": round(build_s, 2),
            "timing_cache": str(cache_path),
            "onnx": {"file": str(onnx_file.resolve()), "sha256": source.artifact_sha256, "precision": source.precision},
            "parity_provider": "TensorRT",
        },
        labels=source.labels,
        reference=write_reference(out, model, outputs, precision, pixels, seed=int(time.time())),
    )
    write_manifest(manifest, out)
    make_readable(out)
    return manifest
