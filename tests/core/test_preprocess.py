"""Preprocessing: bit-exact against the reference transform, plus the resize/crop arithmetic and image modes."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aimcore import PreprocessConfig, preprocess, preprocess_batch, to_rgb
from aimcore.preprocess import center_crop_box, resize_shorter_side
from tests.conftest import encode, make_photo

CFG224 = PreprocessConfig()  # the reference 224 pipeline; preprocess() has no default config

ASSETS = Path(__file__).resolve().parents[1] / "assets"
REFERENCE = json.loads((ASSETS / "reference" / "preprocess_reference.json").read_text())
CASES = [(size, name) for size, names in REFERENCE["sha256_float32_chw"].items() for name in sorted(names)]


@pytest.mark.parametrize(("size", "name"), CASES, ids=[f"{s}-{n}" for s, n in CASES])
def test_bit_identical_to_reference_transform(size: str, name: str) -> None:
    with Image.open(ASSETS / "images" / name) as img:
        out = preprocess(img, PreprocessConfig.for_size(int(size)))
    assert out.dtype == np.float32 and out.shape == (3, int(size), int(size)) and out.flags.c_contiguous
    means = out.astype(np.float64).mean(axis=(1, 2))
    np.testing.assert_allclose(means, REFERENCE["channel_means"][size][name], rtol=0, atol=1e-9)
    assert hashlib.sha256(out.tobytes()).hexdigest() == REFERENCE["sha256_float32_chw"][size][name]


def test_defaults_are_the_reference_224_pipeline() -> None:
    cfg = PreprocessConfig()
    assert (cfg.img_size, cfg.resize_size, cfg.interpolation) == (224, 256, "bicubic")
    assert PreprocessConfig.for_size(224) == cfg
    assert PreprocessConfig.for_size(112).resize_size == 128
    assert cfg.mean == (0.485, 0.456, 0.406) and cfg.std == (0.229, 0.224, 0.225)


def test_output_range_matches_normalisation_bounds() -> None:
    black = preprocess(Image.new("RGB", (300, 300), (0, 0, 0)), CFG224)
    white = preprocess(Image.new("RGB", (300, 300), (255, 255, 255)), CFG224)
    for c, (m, s) in enumerate(zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True)):
        assert black[c].min() == black[c].max() == pytest.approx(-m / s, abs=1e-6)
        assert white[c].min() == white[c].max() == pytest.approx((1 - m) / s, abs=1e-6)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((640, 427), (383, 256)),  # landscape: long side 256*640/427 = 383.7 truncated
        ((427, 640), (256, 383)),  # portrait
        ((301, 255), (302, 256)),
        ((255, 333), (256, 334)),
        ((256, 300), (256, 300)),  # already at size: untouched
        ((100, 80), (320, 256)),  # upscale
        ((257, 257), (256, 256)),
    ],
)
def test_resize_arithmetic(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert resize_shorter_side(*size, 256) == expected
    w, h = size
    short, long = min(w, h), max(w, h)
    assert max(expected) == int(256 * long / short) and min(expected) == 256


def test_crop_offsets_round_half_to_even() -> None:
    assert center_crop_box(383, 256, 224) == (80, 16, 304, 240)  # 79.5 -> 80
    assert center_crop_box(341, 256, 224) == (58, 16, 282, 240)  # 58.5 -> 58
    assert center_crop_box(256, 295, 224) == (16, 36, 240, 260)  # 35.5 -> 36
    assert center_crop_box(256, 256, 224) == (16, 16, 240, 240)
    with pytest.raises(ValueError):
        center_crop_box(100, 300, 224)


def test_exif_orientation_is_applied() -> None:
    photo = make_photo(300, 200, seed=5)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise
    tagged = Image.open(__import__("io").BytesIO(encode(photo, "JPEG", quality=95, exif=exif.tobytes())))
    upright = to_rgb(tagged)
    assert upright.size == (200, 300)
    plain = Image.open(__import__("io").BytesIO(encode(photo, "JPEG", quality=95)))
    expected = preprocess(plain.transpose(Image.Transpose.ROTATE_270), CFG224)
    np.testing.assert_array_equal(preprocess(tagged, CFG224), expected)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "1", "I;16", "I", "F"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    base = make_photo(64, 48, seed=2)
    if mode in ("I;16", "I"):
        gray16 = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        img = Image.fromarray(gray16)
        assert img.mode == "I;16"
        if mode == "I":
            img = img.convert("I")
        rgb = to_rgb(img)
        # 16-bit data is rescaled to 8 bits, not clipped to white.
        np.testing.assert_array_equal(np.asarray(rgb)[..., 0], np.asarray(base.convert("L")))
    elif mode == "F":
        img = Image.fromarray(np.asarray(base.convert("L"), dtype=np.float32))
        assert img.mode == "F"
        rgb = to_rgb(img)
        np.testing.assert_array_equal(np.asarray(rgb)[..., 1], np.asarray(base.convert("L")))
    else:
        rgb = to_rgb(base.convert(mode))
    assert rgb.mode == "RGB"
    out = preprocess(rgb.copy(), CFG224)
    assert out.shape == (3, 224, 224) and np.isfinite(out).all()


def test_batch_and_empty_batch() -> None:
    imgs = [make_photo(300, 200, seed=s) for s in range(3)]
    batch = preprocess_batch(imgs, CFG224)
    assert batch.shape == (3, 3, 224, 224)
    np.testing.assert_array_equal(batch[1], preprocess(imgs[1], CFG224))
    assert preprocess_batch([], CFG224).shape == (0, 3, 224, 224)


def test_config_round_trip_and_validation() -> None:
    cfg = PreprocessConfig.for_size(112)
    assert PreprocessConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="bicubic"):
        PreprocessConfig(interpolation="bilinear")
    assert math.ceil(224 / 0.875) == 256


def test_16bit_grayscale_decodes_without_widening_the_whole_image() -> None:
    """A 10-megapixel 16-bit PNG used to be widened to int64 with temporaries (~32 bytes a pixel of numpy memory;
    40 MP cost ~1 GB in the service). Now it is rescaled through a lookup table in row strips: numpy memory stays
    near one 8-bit copy, and the values are the same rounding as before ((v + 128) // 257)."""
    import io
    import tracemalloc

    from aimcore.preprocess import to_8bit

    w, h = 4000, 2500
    values = (np.add.outer(np.arange(h, dtype=np.uint32) * 7, np.arange(w, dtype=np.uint32) * 13) % 65536).astype(
        np.uint16
    )
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, "PNG")
    image = Image.open(io.BytesIO(buf.getvalue()))
    image.load()
    tracemalloc.start()
    out = to_8bit(image)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert out.mode == "L" and peak < 6 * w * h, f"{peak / (w * h):.1f} bytes of numpy memory per pixel"
    np.testing.assert_array_equal(np.asarray(out), ((values.astype(np.int64) + 128) // 257).astype(np.uint8))
