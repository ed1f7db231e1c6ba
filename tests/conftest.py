"""Shared fixtures: the tiny aim-debug model, saved checkpoints and real encoded images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import aimcore
from aimcore import AimModel, build_model, get_flavor


def make_photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth gradients, a few shapes and sensor-like noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack(
        [
            127 + 100 * np.sin(xx / (7 + seed) + yy / 23),
            127 + 100 * np.cos(yy / (11 + seed)),
            (xx + yy) * 255 / (width + height),
        ],
        axis=-1,
    )
    for _ in range(4):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(5, max(6, min(width, height) // 3))
        disk = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
        img[disk] = rng.integers(0, 256, size=3)
    img += rng.normal(0, 6, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="session")
def debug_model() -> AimModel:
    torch.manual_seed(0)
    model = build_model(get_flavor("aim-debug")).eval()
    # Non-trivial BatchNorm statistics so the head's normalisation is exercised.
    with torch.no_grad():
        assert model.head is not None
        model.head.bn.running_mean.normal_(0, 0.5)
        model.head.bn.running_var.uniform_(0.5, 2.0)
        model.head.bn.num_batches_tracked.fill_(7)
    return model


@pytest.fixture(scope="session")
def debug_checkpoint(tmp_path_factory: pytest.TempPathFactory, debug_model: AimModel) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "aim-debug.safetensors"
    labels = [f"class_{i}" for i in range(debug_model.config.num_classes)]
    aimcore.save_checkpoint(debug_model, path, provenance={"test": True}, labels=labels)
    return path


@pytest.fixture
def debug_images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)
