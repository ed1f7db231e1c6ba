"""Tiny labelled data and random aim-debug trunks for the probe tests (no apt package, no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import aimcore

CLASSES = ("blobs", "stripes")


def toy_image(kind: str, rng: np.random.Generator, size: int = 40) -> Image.Image:
    """Two visibly different kinds: vertical stripes of random period, or one bright disk on a dark ground."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "stripes":
        img = 127 + 120 * np.sin(xx / (1.5 + rng.random()) + rng.random() * 6)
    else:
        img = np.full((size, size), 60.0, dtype=np.float32)
        cx, cy = rng.integers(8, size - 8, 2)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < rng.integers(30, 90)] = 220
    img += rng.normal(0, 15, img.shape)
    gray = np.clip(img, 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([gray] * 3, axis=-1))


def make_toy_folder(root: Path, per_class: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            toy_image(kind, rng).save(root / kind / f"{kind}_{i:03d}.png")
    return root


def save_random_trunk(path: Path, seed: int = 0, flavor: str = "aim-debug") -> Path:
    torch.manual_seed(seed)
    model = aimcore.build_model(aimcore.get_flavor(flavor).replace(num_classes=0))
    aimcore.save_checkpoint(model, path, provenance={"seed": seed})
    return path


@pytest.fixture(scope="session")
def toy_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_toy_folder(tmp_path_factory.mktemp("toy") / "data")


@pytest.fixture(scope="session")
def trunk_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_trunk(tmp_path_factory.mktemp("trunk") / "trunk.safetensors")
