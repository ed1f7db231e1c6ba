"""Fixtures for export tests: aim-debug checkpoints in our format and in ml-aim's released layout, and one shared
export (fp32 + fp16 + int8) reused by the read-only tests. Small batches keep the whole suite quick on 2 cores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from aimcore import AimModel, load_model
from aimcore.manifest import ExportManifest
from export.onnx import export_onnx

ASSETS = Path(__file__).resolve().parents[1] / "assets"
REFERENCE_WEIGHTS = ASSETS / "reference" / "aim_debug_reference_layout.safetensors"
MAX_BATCH = 4


@pytest.fixture(scope="session")
def reference_model() -> AimModel:
    """aim-debug with perturbed norms and BatchNorm statistics: every parameter matters in a parity check."""
    return load_model(REFERENCE_WEIGHTS)


@pytest.fixture(scope="session")
def released_folder(tmp_path_factory: pytest.TempPathFactory, reference_model: AimModel) -> Path:
    """The model as ml-aim releases it: a backbone .pth and a head .pth of plain tensors."""
    folder = tmp_path_factory.mktemp("released")
    state = reference_model.state_dict()
    torch.save(
        {k: v for k, v in state.items() if not k.startswith("head.")}, folder / "aim_debug_attnprobe_backbone.pth"
    )
    torch.save(
        {k: v for k, v in state.items() if k.startswith("head.")}, folder / "aim_debug_attnprobe_head_best_layers.pth"
    )
    return folder


@dataclass
class Exported:
    dir: Path
    checkpoint: Path
    fp32: ExportManifest
    fp16: ExportManifest
    int8: ExportManifest


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory, debug_checkpoint: Path) -> Exported:
    """One export of the shared aim-debug checkpoint (with labels) in three precisions: DIR, DIR/fp16, DIR/int8."""
    out = tmp_path_factory.mktemp("onnx")
    model = load_model(debug_checkpoint)
    return Exported(
        dir=out,
        checkpoint=debug_checkpoint,
        fp32=export_onnx(model, out, max_batch=MAX_BATCH),
        fp16=export_onnx(model, out / "fp16", max_batch=MAX_BATCH, precision="fp16"),
        int8=export_onnx(model, out / "int8", max_batch=MAX_BATCH, precision="int8"),
    )
