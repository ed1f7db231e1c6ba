"""ONNX Runtime session settings in one place, for the exporter's parity checks and for the service.

This module imports only onnxruntime and the standard library (no torch, no aimcore), so `service` may import
`export.runtime` in a serving image that has onnxruntime and nothing else from the export toolchain.

Choices (measured in benchmarks/backends.py, see docs/BENCHMARKS.md):
- graph optimisation level ALL (constant folding, Gelu/LayerNorm/attention fusions, NCHWc layouts on CPU);
- intra-op threads = the CPUs this process may use (affinity and cgroup quota), inter-op 1, sequential execution:
  one AIM forward is a chain of large matmuls, so there is no parallel branch for inter-op threads to run;
- providers in order of preference TensorRT > CUDA > CPU, keeping only those this onnxruntime build has;
- CUDA without TF32 by default, so an fp32 graph stays fp32 (TF32 alone breaks a 1e-4 parity bound).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort

__all__ = [
    "PROVIDER_PREFERENCE",
    "ProviderSpec",
    "available_cpus",
    "create_session",
    "graph_optimization_level",
    "make_session_options",
    "provider_chain",
]

logger = logging.getLogger(__name__)

PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

ProviderSpec = str | tuple[str, dict[str, Any]]


def available_cpus() -> int:
    """CPUs this process may use: the affinity mask, capped by a cgroup v2 CPU quota when one is set."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def graph_optimization_level(name: str) -> ort.GraphOptimizationLevel:
    try:
        return _OPT_LEVELS[name]
    except KeyError:
        raise ValueError(f"graph optimisation level must be one of {sorted(_OPT_LEVELS)}, got {name!r}") from None


def make_session_options(
    *,
    intra_op_threads: int | None = None,
    graph_optimization: str = "all",
    allow_spinning: bool = True,
) -> ort.SessionOptions:
    """Session options for an AIM graph. allow_spinning=False stops idle worker threads from busy-waiting, which
    a server that shares its cores with image decoding may prefer (a small latency cost per batch)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = graph_optimization_level(graph_optimization)
    options.intra_op_num_threads = intra_op_threads or available_cpus()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not allow_spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only; ORT's warnings about fp16 casts on CPU are expected
    return options


def provider_chain(
    preferred: Sequence[str] | None = None,
    *,
    device_id: int = 0,
    cuda_tf32: bool = False,
    trt_fp16: bool = False,
    trt_cache_dir: str | os.PathLike[str] | None = None,
    trt_profile: tuple[int, int, int] | None = None,
    input_shape: tuple[int, int, int] | None = None,
    input_name: str = "pixels",
) -> list[ProviderSpec]:
    """The execution providers to try, best first, with their options.

    preferred: provider names to consider (default PROVIDER_PREFERENCE); names this onnxruntime build lacks are
    dropped with a log line, and CPU is always last. trt_profile (min, opt, max) batch with input_shape (C, S, S)
    gives the TensorRT provider an explicit optimisation profile; trt_cache_dir turns on its engine and timing caches
    (an engine is tied to the GPU and the TensorRT version, so keep one cache directory per machine type).
    """
    wanted = list(preferred or PROVIDER_PREFERENCE)
    have = set(ort.get_available_providers())
    missing = [p for p in wanted if p not in have]
    if missing:
        logger.info("onnxruntime %s lacks %s; using %s", ort.__version__, missing, [p for p in wanted if p in have])
    chain: list[ProviderSpec] = []
    for name in wanted:
        if name not in have or name == "CPUExecutionProvider":
            continue
        if name == "TensorrtExecutionProvider":
            opts: dict[str, Any] = {"device_id": device_id, "trt_fp16_enable": trt_fp16}
            if trt_cache_dir is not None:
                Path(trt_cache_dir).mkdir(parents=True, exist_ok=True)
                opts |= {
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": str(trt_cache_dir),
                    "trt_timing_cache_enable": True,
                    "trt_timing_cache_path": str(trt_cache_dir),
                }
            if trt_profile is not None and input_shape is not None:
                dims = "x".join(str(d) for d in input_shape)
                lo, opt, hi = trt_profile
                opts |= {
                    "trt_profile_min_shapes": f"{input_name}:{lo}x{dims}",
                    "trt_profile_opt_shapes": f"{input_name}:{opt}x{dims}",
                    "trt_profile_max_shapes": f"{input_name}:{hi}x{dims}",
                }
            chain.append((name, opts))
        elif name == "CUDAExecutionProvider":
            chain.append((name, {"device_id": device_id, "use_tf32": int(cuda_tf32)}))
        else:
            chain.append(name)
    chain.append("CPUExecutionProvider")
    return chain


def create_session(
    model_path: str | os.PathLike[str],
    *,
    providers: Sequence[ProviderSpec] | None = None,
    intra_op_threads: int | None = None,
    graph_optimization: str = "all",
    allow_spinning: bool = True,
) -> ort.InferenceSession:
    """An InferenceSession for an exported AIM graph (external data is found beside the file).

    providers: from `provider_chain(...)` (the default: TensorRT > CUDA > CPU, whichever are installed), or a list
    such as ["CPUExecutionProvider"]. The providers the session actually got are in `session.get_providers()`.
    """
    options = make_session_options(
        intra_op_threads=intra_op_threads, graph_optimization=graph_optimization, allow_spinning=allow_spinning
    )
    chain = list(providers) if providers is not None else provider_chain()
    session = ort.InferenceSession(str(model_path), sess_options=options, providers=chain)
    logger.info(
        "onnxruntime %s session for %s: providers %s, %d intra-op threads, optimisation %s",
        ort.__version__,
        model_path,
        session.get_providers(),
        options.intra_op_num_threads,
        graph_optimization,
    )
    return session
