"""ONNX export of AIMv2 trunks (issue 11): fixed resolution with parity in the manifest, native with a dynamic
H x W checked on non-square grids against PyTorch, and the int8/fp16 variants' cosine bound."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from aimcore import build_model, get_flavor
from export.onnx import export_onnx

ort = pytest.importorskip("onnxruntime")


def v2_model(native: bool, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(get_flavor("aimv2-debug").replace(native=native, name="v2-native" if native else "v2")).eval()
    with torch.no_grad():  # RMSNorm weights start at 1: perturb them so a mis-exported norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def test_fixed_v2_trunk_exports_with_parity_and_quantised_variants(tmp_path: Path) -> None:
    model = v2_model(native=False, seed=0)
    fp32 = export_onnx(model, tmp_path / "fp32", max_batch=4)
    assert fp32.parity["passed"] and fp32.parity["worst"]["embedding"]["max_rel_err"] < 1e-4
    int8 = export_onnx(model, tmp_path / "int8", max_batch=4, precision="int8")
    assert int8.parity["passed"] and int8.parity["real_images"]["embedding_min_cosine"] >= 0.999
    fp16 = export_onnx(model, tmp_path / "fp16", max_batch=4, precision="fp16")
    assert fp16.parity["passed"] and fp16.parity["real_images"]["embedding_min_cosine"] >= 0.999
    session = ort.InferenceSession(str(tmp_path / "fp32" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["B", 3, 28, 28]  # fixed resolution: the grid is part of the graph


def test_native_v2_trunk_exports_with_a_dynamic_height_and_width(tmp_path: Path) -> None:
    model = v2_model(native=True, seed=1)
    manifest = export_onnx(model, tmp_path / "native", max_batch=4)
    assert manifest.parity["passed"]
    session = ort.InferenceSession(str(tmp_path / "native" / "model.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    assert session.get_inputs()[0].shape == ["B", 3, "H", "W"]
    for hw in [(28, 28), (42, 70), (98, 28), (14, 14)]:
        x = torch.randn(3, 3, *hw, generator=torch.Generator().manual_seed(hw[0] + hw[1]))
        got = session.run(["embedding"], {name: x.numpy()})[0]
        with torch.no_grad():
            ref = model.features(x, outputs=("tokens",)).tokens.mean(dim=1).numpy()
        # float32 noise relative to the embedding's scale (RMS-normed tokens: O(1)).
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * max(1.0, float(np.abs(ref).max())))
