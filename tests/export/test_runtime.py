"""The ONNX Runtime session factory the service imports: dependency-free, providers in preference order."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import onnxruntime as ort

from export import runtime


def test_runtime_imports_only_onnxruntime_and_the_standard_library() -> None:
    tree = ast.parse(Path(runtime.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names - set(sys.stdlib_module_names) - {"__future__"} == {"onnxruntime"}


def test_provider_chain_prefers_tensorrt_then_cuda_then_cpu(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(
        ort,
        "get_available_providers",
        lambda: ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"],
    )
    chain = runtime.provider_chain(
        trt_fp16=True, trt_cache_dir=tmp_path, trt_profile=(1, 8, 32), input_shape=(3, 224, 224)
    )
    assert [p if isinstance(p, str) else p[0] for p in chain] == list(runtime.PROVIDER_PREFERENCE)
    trt_opts = chain[0][1]
    assert trt_opts["trt_fp16_enable"] and trt_opts["trt_engine_cache_path"] == str(tmp_path)
    assert trt_opts["trt_profile_max_shapes"] == "pixels:32x3x224x224"
    assert chain[1][1]["use_tf32"] == 0  # fp32 stays fp32 unless asked


def test_provider_chain_drops_what_is_not_installed() -> None:
    chain = runtime.provider_chain()
    assert chain[-1] == "CPUExecutionProvider"
    assert all((p if isinstance(p, str) else p[0]) in ort.get_available_providers() for p in chain)


def test_session_settings(exported) -> None:
    session = runtime.create_session(exported.dir / "model.onnx", intra_op_threads=1, allow_spinning=False)
    options = session.get_session_options()
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert session.get_providers()[-1] == "CPUExecutionProvider"
    assert runtime.available_cpus() >= 1
