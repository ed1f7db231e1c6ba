"""TensorRT: build and check an engine where TensorRT and a GPU exist; elsewhere a clear refusal, exit status 3."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from export.__main__ import main
from export.tensorrt import TensorRTUnavailable, _network_flags, build_engine, require_tensorrt


def unavailable_reason() -> str | None:
    try:
        require_tensorrt()
    except TensorRTUnavailable as exc:
        return str(exc)
    return None


REASON = unavailable_reason()


@pytest.mark.gpu
@pytest.mark.skipif(REASON is not None, reason=f"TensorRT path unavailable: {REASON}")
@pytest.mark.parametrize("variant", ["fp16", "fp32"])
def test_engine_builds_and_matches_pytorch(exported, tmp_path, variant) -> None:
    onnx_file = exported.dir / ("fp16" if variant == "fp16" else "") / "model.onnx"
    manifest = build_engine(onnx_file, tmp_path, precision=variant, max_batch=4)
    assert manifest.kind == "tensorrt" and manifest.parity["passed"]
    assert manifest.runtime["batch_profile"] == {"min": 1, "opt": 2, "max": 4}
    assert (tmp_path / "timing.cache").stat().st_size > 0
    assert main(["validate", str(tmp_path)]) == 0


@pytest.mark.skipif(REASON is None, reason="TensorRT and a GPU are present: the refusal path cannot be shown")
def test_cli_refuses_clearly_without_tensorrt(exported, tmp_path, caplog) -> None:
    code = main(["tensorrt", "--onnx", str(exported.dir / "model.onnx"), "--out", str(tmp_path)])
    assert code == 3
    assert "TensorRT unavailable" in caplog.text and ("not installed" in caplog.text or "no CUDA GPU" in caplog.text)
    assert not any(tmp_path.iterdir())


def fake_trt(version: str, weak: bool) -> SimpleNamespace:
    flags = {"FP16": "fp16", "BF16": "bf16", "TF32": "tf32"} if weak else {"TF32": "tf32"}
    return SimpleNamespace(
        __version__=version,
        BuilderFlag=SimpleNamespace(**flags),
        NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1),
    )


def test_precision_plan_follows_the_tensorrt_version() -> None:
    trt10, trt11 = fake_trt("10.13.0", weak=True), fake_trt("11.4.0", weak=False)
    assert _network_flags(trt10, "fp32", "fp16") == (0, ["fp16"])  # weak typing: FP16 flag on the fp32 graph
    assert _network_flags(trt11, "fp16", "fp16") == (2, [])  # strongly typed from the fp16 graph
    assert _network_flags(trt11, "fp32", "fp32") == (2, [])
    with pytest.raises(TensorRTUnavailable, match="pass the fp16 ONNX"):
        _network_flags(trt11, "fp32", "fp16")
    with pytest.raises(ValueError, match="from a int8 ONNX"):
        _network_flags(trt10, "int8", "fp16")
