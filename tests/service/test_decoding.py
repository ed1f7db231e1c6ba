"""Decoding and admission of image bytes: the reference transform for every mode, limits before decoding, and
4xx errors that name the problem."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
from PIL import Image

from aimcore import PreprocessConfig, preprocess
from service.decoding import DecodeLimits, ImageDecoder, sniff_format
from service.errors import ImageError
from tests.conftest import encode, make_photo

# Pillow warns at open() above 89 MP; the service refuses such images itself, from the header.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

CFG = PreprocessConfig.for_size(32)


@pytest.fixture
def decoder():
    d = ImageDecoder(CFG, DecodeLimits(), workers=1)
    yield d
    d.close()


def test_every_asset_decodes_exactly_like_aimcore(decoder: ImageDecoder, asset_bytes: dict[str, bytes]) -> None:
    # EXIF rotation, palette, grayscale, CMYK, RGBA and odd sizes all take aimcore's reference path.
    for name, data in asset_bytes.items():
        expected = preprocess(Image.open(io.BytesIO(data)), CFG)
        np.testing.assert_array_equal(decoder.decode_one(data), expected, err_msg=name)


def test_sixteen_bit_and_alpha_pngs(decoder: ImageDecoder) -> None:
    ramp = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 21).astype(np.uint16)
    sixteen = encode(Image.fromarray(ramp), "PNG")
    out = decoder.decode_one(sixteen)
    assert out.shape == (3, 32, 32) and np.isfinite(out).all() and out.std() > 0.1  # not clipped to white
    rgba = encode(make_photo(50, 40).convert("RGBA"), "PNG")
    np.testing.assert_array_equal(decoder.decode_one(rgba), preprocess(Image.open(io.BytesIO(rgba)), CFG))


def test_base64_and_data_uris(decoder: ImageDecoder, asset_bytes: dict[str, bytes]) -> None:
    data = asset_bytes["small_100x80.png"]
    text = base64.b64encode(data).decode()
    np.testing.assert_array_equal(decoder.decode_one(text), decoder.decode_one(f"data:image/png;base64,{text}"))
    with pytest.raises(ImageError) as info:
        decoder.decode_one("not base64 at all!", index=3)
    assert info.value.code == "invalid_base64" and "images[3]" in str(info.value)


@pytest.mark.parametrize(
    ("data", "code", "status"),
    [
        (b"", "empty_image", 422),
        (b"<html>hello</html>", "not_an_image", 422),
        (encode(make_photo(40, 30), "GIF"), "unsupported_format", 415),
        (encode(make_photo(40, 30), "BMP"), "unsupported_format", 415),
    ],
)
def test_refusals_name_the_problem(decoder: ImageDecoder, data: bytes, code: str, status: int) -> None:
    with pytest.raises(ImageError) as info:
        decoder.decode_one(data, index=1)
    assert (info.value.code, info.value.http_status) == (code, status)
    assert str(info.value).startswith("images[1]: ")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_images_are_4xx(decoder: ImageDecoder, fmt: str) -> None:
    data = encode(make_photo(300, 200), fmt)
    with pytest.raises(ImageError) as info:
        decoder.decode_one(data[: len(data) // 2])
    assert info.value.code == "corrupt_image" and info.value.http_status == 422
    assert "truncated" in str(info.value) or "damaged" in str(info.value)


def test_png_bomb_is_refused_from_the_header_in_milliseconds(decoder: ImageDecoder, png_bomb: bytes) -> None:
    assert 400_000 < len(png_bomb) < 480_000  # ~430 KiB on the wire ...
    t0 = time.perf_counter()
    with pytest.raises(ImageError) as info:
        decoder.decode_one(png_bomb)
    elapsed = time.perf_counter() - t0
    assert info.value.code == "image_too_large" and info.value.http_status == 413
    assert "12500x12000" in str(info.value)  # ... 150 MP, 450 MB of RGB once decoded
    assert elapsed < 0.05, f"took {elapsed * 1000:.1f} ms"


def test_extreme_aspect_ratio_is_refused(decoder: ImageDecoder) -> None:
    # 4000 x 2 is only 8 kP, but its shorter side resized to 37 px would make a 74,000 x 37 image.
    with pytest.raises(ImageError) as info:
        decoder.decode_one(encode(Image.new("RGB", (40000, 2)), "PNG"))
    assert info.value.code == "image_aspect_ratio"


def test_large_jpegs_use_draft_decoding_close_to_exact() -> None:
    cfg = PreprocessConfig.for_size(112)  # resize 128: draft keeps >= 256 px on the shorter side
    photo = encode(make_photo(2000, 1400, seed=3), "JPEG", quality=90)
    exact = ImageDecoder(cfg, DecodeLimits(jpeg_draft_min_pixels=0), workers=1)
    draft = ImageDecoder(cfg, DecodeLimits(jpeg_draft_min_pixels=1_000_000), workers=1)
    try:
        timings = {}
        for name, dec in (("exact", exact), ("draft", draft)):
            dec.decode_one(photo)
            t0 = time.perf_counter()
            out = [dec.decode_one(photo) for _ in range(2)]
            timings[name] = (time.perf_counter() - t0) / 2
            timings[name + "_out"] = out[0]
        a, b = timings["exact_out"].ravel(), timings["draft_out"].ravel()
        cosine = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        assert cosine > 0.99
        assert timings["draft"] < timings["exact"]
    finally:
        exact.close()
        draft.close()


def test_sniffing() -> None:
    assert sniff_format(encode(make_photo(8, 8), "WEBP")) == "WEBP"
    assert sniff_format(encode(make_photo(8, 8), "PNG")) == "PNG"
    assert sniff_format(b"hello") is None
