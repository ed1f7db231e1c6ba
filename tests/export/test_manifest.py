"""The manifest beside each artefact, the golden reference file, and the fp16 / int8 figures."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from aimcore import PreprocessConfig, load_model, sha256_file
from aimcore.manifest import read_manifest
from export.runtime import create_session
from tests.export.conftest import MAX_BATCH


def test_manifest_records_source_config_outputs_runtime_and_checksums(exported) -> None:
    manifest = read_manifest(exported.dir)
    assert manifest == exported.fp32
    assert (manifest.kind, manifest.precision, manifest.artifact) == ("onnx", "fp32", "model.onnx")
    assert manifest.artifact_sha256 == sha256_file(exported.dir / "model.onnx")
    assert manifest.source["checkpoint"] == str(exported.checkpoint)
    assert manifest.source["sha256"] == sha256_file(exported.checkpoint)
    model = load_model(exported.checkpoint)
    assert manifest.model_config == model.config
    assert manifest.preprocess_config == PreprocessConfig.for_size(32)
    assert manifest.outputs == {"embedding": ["B", 64], "pooled": ["B", 64], "logits": ["B", 10]}
    assert manifest.labels == [f"class_{i}" for i in range(10)]
    runtime = manifest.runtime
    assert runtime["opset"] == 17 and runtime["onnxruntime"] == ort.__version__ and runtime["onnx"] == onnx.__version__
    assert runtime["batch_profile"] == {"min": 1, "opt": MAX_BATCH // 2, "max": MAX_BATCH}
    assert runtime["parity_provider"] == "CPUExecutionProvider" and runtime["external_data"] is None
    assert (exported.dir / "manifest.json").stat().st_mode & 0o044  # readable by a serving user


def test_reference_file_reproduces_with_onnxruntime(exported) -> None:
    """What the service does at start-up: run the golden pixels and compare with the stored PyTorch outputs."""
    for manifest, folder in ((exported.fp32, exported.dir), (exported.int8, exported.dir / "int8")):
        ref = manifest.reference
        assert ref is not None and ref["sha256"] == sha256_file(folder / ref["file"])
        data = np.load(folder / ref["file"])
        assert data["pixels"].shape == (ref["rows"], 3, 32, 32) and ref["real_images"] == 4
        session = create_session(folder / "model.onnx", providers=["CPUExecutionProvider"])
        got = dict(zip(manifest.outputs, session.run(list(manifest.outputs), {"pixels": data["pixels"]}), strict=True))
        for name in manifest.outputs:
            want = data[name]
            if "max_rel_err" in ref["tolerance"]:
                assert np.abs(got[name] - want).max() / np.abs(want).max() <= ref["tolerance"]["max_rel_err"]
            cos = (got[name] * want).sum(1) / np.linalg.norm(got[name], axis=1) / np.linalg.norm(want, axis=1)
            assert cos.min() >= ref["tolerance"].get("min_cosine", 0.9999)


def test_fp16_and_int8_record_their_accuracy_cost(exported) -> None:
    for manifest, minimum in ((exported.fp16, 0.999), (exported.int8, 0.99)):
        parity = manifest.parity
        assert parity["passed"] and parity["tolerance"] == {"min_cosine": minimum}
        real = parity["real_images"]
        assert real["count"] == 12 and real["embedding_min_cosine"] >= minimum
        assert 0.0 <= real["top1_agreement"] <= 1.0 and real["top1_changed"] == round(12 * (1 - real["top1_agreement"]))
        assert parity["worst"]["embedding"]["max_rel_err"] > 0  # measured, not assumed
    fp16 = onnx.load(str(exported.dir / "fp16" / "model.onnx"))
    assert {init.data_type for init in fp16.graph.initializer if init.dims} >= {onnx.TensorProto.FLOAT16}
    assert fp16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 interface
    assert "parity_note" in exported.fp16.runtime  # checked on the CPU provider here, and it says what that means
    int8 = onnx.load(str(exported.dir / "int8" / "model.onnx"))
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= {n.op_type for n in int8.graph.node}
    assert exported.int8.runtime["quantization"]["quantized_nodes"] == 4 * 4 + 3  # 4 per block + head k, v, linear
