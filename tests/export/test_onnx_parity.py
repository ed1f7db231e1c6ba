"""ONNX Runtime against PyTorch fp32: our checkpoint, a released-layout .pth pair, early exit, no head, external
data, in-memory models, and a broken export rewrite that must fail loudly."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from aimcore import build_model, get_flavor, sha256_file
from aimcore.manifest import MANIFEST_NAME
from export.graph import ContractGraph, FrozenBatchNorm
from export.onnx import export_onnx
from export.parity import ParityError
from export.runtime import create_session
from export.validate import validate_directory
from tests.export.conftest import MAX_BATCH

FP32_TOL = 1e-4


def ops(path: Path) -> Counter[str]:
    return Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


def test_fp32_parity_within_1e4_at_batch_1_and_max(exported) -> None:
    parity = exported.fp32.parity
    assert parity["passed"] and parity["tolerance"] == {"max_rel_err": FP32_TOL}
    assert set(parity["checks"]) == {"random_b1", f"random_b{MAX_BATCH}", "images_b1", f"images_b{MAX_BATCH}"}
    for output, worst in parity["worst"].items():
        assert worst["max_rel_err"] <= FP32_TOL, output
    assert parity["real_images"]["count"] == 12  # every file in tests/assets/images, decoded and preprocessed
    assert parity["real_images"]["top1_agreement"] == 1.0


def test_graph_contract_and_dynamic_batch(exported, debug_model) -> None:
    path = exported.dir / "model.onnx"
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["pixels"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "B" and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert [o.name for o in proto.graph.output] == ["embedding", "pooled", "logits"]
    assert proto.opset_import[0].version == exported.fp32.runtime["opset"] == 17
    # A batch size the parity check never used, against an independent PyTorch run.
    x = torch.randn(3, 3, 32, 32)
    got = create_session(path, providers=["CPUExecutionProvider"]).run(None, {"pixels": x.numpy()})
    with torch.no_grad():
        want = ContractGraph(debug_model, ("embedding", "pooled", "logits"))(x)
    for g, w in zip(got, want, strict=True):
        assert g.shape == tuple(w.shape)
        np.testing.assert_allclose(g, w.numpy(), atol=FP32_TOL * float(w.abs().max()), rtol=0)
    # The contract's embedding is the raw token mean, not L2-normalised.
    assert not np.allclose(np.linalg.norm(got[0], axis=1), 1.0)


def test_released_layout_checkpoint_exports_and_matches(released_folder, tmp_path) -> None:
    manifest = export_onnx(released_folder, tmp_path, max_batch=2)
    assert manifest.parity["passed"]
    files = manifest.source["files"]
    assert [Path(f["path"]).name for f in files] == [
        "aim_debug_attnprobe_backbone.pth",
        "aim_debug_attnprobe_head_best_layers.pth",
    ]
    assert all(f["sha256"] == sha256_file(f["path"]) for f in files)
    assert manifest.config["probe_layers"] == [1, 2] and manifest.outputs["logits"] == ["B", 10]
    assert [r.passed for r in validate_directory(tmp_path)] == [True]


def test_early_exit_graph_without_embedding(reference_model, tmp_path) -> None:
    full = export_onnx(reference_model, tmp_path / "full", max_batch=2, check_parity=False)
    early = export_onnx(reference_model, tmp_path / "early", max_batch=2, outputs="pooled,logits")
    assert early.parity["passed"]
    assert list(early.outputs) == ["pooled", "logits"]
    # aim-debug: 4 blocks, probe layers (1, 2): the early graph runs blocks 0-2 only.
    assert (full.runtime["blocks_run"], early.runtime["blocks_run"]) == (4, 3)
    # 4 MatMuls per block (qkv, proj, fc1, fc2) are weights: one block fewer removes them from the graph.
    assert ops(tmp_path / "full" / "model.onnx")["MatMul"] - ops(tmp_path / "early" / "model.onnx")["MatMul"] >= 4


def test_headless_model_exports_embedding_only(tmp_path) -> None:
    torch.manual_seed(0)
    trunk = build_model(get_flavor("aim-debug").replace(num_classes=0)).eval()
    manifest = export_onnx(trunk, tmp_path, max_batch=2)
    assert manifest.outputs == {"embedding": ["B", 64]} and manifest.parity["passed"]
    assert manifest.labels is None
    with pytest.raises(ValueError, match="need a classification head"):
        export_onnx(trunk, tmp_path / "x", outputs=["pooled"])
    with pytest.raises(ValueError, match="subset"):
        export_onnx(trunk, tmp_path / "y", outputs=["tokens"])


def test_external_data_format(reference_model, tmp_path) -> None:
    manifest = export_onnx(reference_model, tmp_path, max_batch=2, external_data=True)
    data = tmp_path / "model.onnx.data"
    assert data.is_file() and data.stat().st_size > (tmp_path / "model.onnx").stat().st_size
    assert manifest.runtime["external_data"] == {"file": "model.onnx.data", "sha256": sha256_file(data)}
    assert manifest.parity["passed"]
    onnx.checker.check_model(str(tmp_path / "model.onnx"), full_check=True)


def test_in_memory_model_needs_its_checkpoint_to_revalidate(debug_model, debug_checkpoint, tmp_path) -> None:
    manifest = export_onnx(debug_model, tmp_path, max_batch=2)
    assert manifest.source["checkpoint"] is None
    assert manifest.source["sha256"] == manifest.source["state_dict_sha256"]
    [alone] = validate_directory(tmp_path)
    assert not alone.passed and "in-memory" in alone.problems[0]
    [with_ckpt] = validate_directory(tmp_path, checkpoint=debug_checkpoint)
    assert with_ckpt.passed, with_ckpt.problems


def test_broken_export_fails_loudly_and_writes_no_manifest(reference_model, tmp_path, monkeypatch) -> None:
    # A rewrite bug: the head's BatchNorm silently dropped from the graph.
    monkeypatch.setattr(FrozenBatchNorm, "forward", lambda self, x: x)
    with pytest.raises(ParityError, match=r"fp32 parity against PyTorch fp32 failed: .*pooled: max_rel_err"):
        export_onnx(reference_model, tmp_path, max_batch=2)
    assert not (tmp_path / MANIFEST_NAME).exists()
