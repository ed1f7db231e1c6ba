"""Fast preprocessing (`fidelity="fast"`): a different recipe, close to the exact transform on real photos, faster on
large JPEGs; uint8 pixels + batch `normalize` give exactly the exact path's floats. The exact path itself is pinned
bit for bit by test_preprocess.py."""

from __future__ import annotations

import dataclasses
import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aimcore import PreprocessConfig, preprocess
from aimcore.preprocess import _fast_draft, aspect_buckets, normalize, pixels_uint8
from tests.conftest import encode, make_photo

IMAGES = Path(__file__).resolve().parents[1] / "assets" / "images"
ASSETS = sorted(IMAGES.iterdir())


def fast(cfg: PreprocessConfig) -> PreprocessConfig:
    return dataclasses.replace(cfg, fidelity="fast")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def open_bytes(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_fast_is_another_recipe_and_exact_recipes_are_unchanged() -> None:
    exact = PreprocessConfig()
    assert "fidelity" not in exact.to_dict()  # exact recipes (and the fingerprints made from them) stay as they were
    assert fast(exact).to_dict()["fidelity"] == "fast"
    assert fast(exact) != exact
    assert PreprocessConfig.from_dict(fast(exact).to_dict()) == fast(exact)
    with pytest.raises(ValueError, match="fidelity"):
        PreprocessConfig(fidelity="approximate")


# Measured minima: 0.99996 at 224 (nothing drafted below 512 px: only the one-pass resample differs), 0.99945 at
# 112 (1/2 DCT draft of the 300-640 px JPEGs), 0.9990 at 32 (1/8 draft).
@pytest.mark.parametrize(("size", "bound"), [(224, 0.9999), (112, 0.999), (32, 0.998)])
def test_fast_is_close_to_exact_on_every_real_photo(size: int, bound: float) -> None:
    cfg = PreprocessConfig.for_size(size)
    for path in ASSETS:
        with Image.open(path) as a, Image.open(path) as b:
            exact, got = preprocess(a, cfg), preprocess(b, fast(cfg))
        assert got.dtype == np.float32 and got.shape == exact.shape, path.name
        assert cosine(exact, got) > bound, path.name


def test_large_jpeg_drafts_and_stays_close() -> None:
    cfg = PreprocessConfig.for_size(112)  # resize 128
    photo = encode(make_photo(2400, 1600, seed=7), "JPEG", quality=90)
    img = open_bytes(photo)
    assert _fast_draft(img, cfg) == 8.0 and img.size == (300, 200)  # shorter side 200 >= 128
    exact, got = preprocess(open_bytes(photo), cfg), preprocess(open_bytes(photo), fast(cfg))
    assert cosine(exact, got) > 0.999

    def best(config: PreprocessConfig) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            preprocess(open_bytes(photo), config)
            times.append(time.perf_counter() - t0)
        return min(times)

    assert best(fast(cfg)) < best(cfg) / 2  # measured ~10x (docs/BENCHMARKS.md)


def test_small_jpegs_and_other_formats_are_not_drafted() -> None:
    cfg = PreprocessConfig()  # resize 256: 640x427 cannot halve and keep 256
    with Image.open(IMAGES / "landscape_640x427.jpg") as img:
        assert _fast_draft(img, cfg) == 1.0 and img.size == (640, 427)
    png = open_bytes(encode(make_photo(1200, 900), "PNG"))
    assert _fast_draft(png, cfg) == 1.0 and png.size == (1200, 900)


def test_exif_rotated_large_jpeg() -> None:
    """The draft happens before the EXIF rotation; the crop geometry must follow the rotated original."""
    cfg = PreprocessConfig.for_size(112)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    photo = encode(make_photo(1800, 1000, seed=2), "JPEG", quality=92, exif=exif)
    exact, got = preprocess(open_bytes(photo), cfg), preprocess(open_bytes(photo), fast(cfg))
    assert cosine(exact, got) > 0.999


def test_native_mode_fast_keeps_the_grid() -> None:
    cfg = PreprocessConfig(
        img_size=224, resize_size=224, mode="native", patch_size=14, max_patches=256, grid_buckets=aspect_buckets(256)
    )
    photo = encode(make_photo(2000, 1300, seed=4), "JPEG", quality=90)
    exact, got = preprocess(open_bytes(photo), cfg), preprocess(open_bytes(photo), fast(cfg))
    assert got.shape == exact.shape and cosine(exact, got) > 0.999


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_batch_normalize_equals_per_image_floats(mode: str) -> None:
    cfg = dataclasses.replace(PreprocessConfig.for_size(112), fidelity=mode)
    per_image, pixels = [], []
    for path in ASSETS:
        with Image.open(path) as a, Image.open(path) as b:
            per_image.append(preprocess(a, cfg))
            pixels.append(pixels_uint8(b, cfg))
    assert all(p.dtype == np.uint8 and p.shape == (3, 112, 112) and p.flags.c_contiguous for p in pixels)
    batch = normalize(np.stack(pixels), cfg)
    assert batch.dtype == np.float32
    # The same float32 operations in the same order: the same bits, not just within float32 noise.
    np.testing.assert_array_equal(batch, np.stack(per_image))
    np.testing.assert_array_equal(normalize(pixels[0], cfg), per_image[0])


def test_normalize_refuses_what_it_cannot_normalise() -> None:
    cfg = PreprocessConfig()
    with pytest.raises(ValueError, match="uint8"):
        normalize(np.zeros((3, 8, 8), np.float32), cfg)
    with pytest.raises(ValueError, match="uint8"):
        normalize(np.zeros((8, 8, 3), np.uint8), cfg)


def test_large_png_box_reduces_and_stays_close() -> None:
    """No draft for PNG: reducing_gap box-reduces the ~11x-larger crop source by 3 before the bicubic pass."""
    cfg = PreprocessConfig.for_size(112)
    photo = encode(make_photo(2000, 1400, seed=5), "PNG")
    exact, got = preprocess(open_bytes(photo), cfg), preprocess(open_bytes(photo), fast(cfg))
    assert cosine(exact, got) > 0.999
