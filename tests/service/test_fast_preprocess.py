"""`preprocess_mode=fast` in the service: uint8 pixels from the decoder, normalised per batch right before the backend;
/embed over HTTP (real uvicorn on loopback) close to exact mode; a different recipe, so an index built in exact mode
refuses fast vectors (409)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aimcore import PreprocessConfig, preprocess
from aimcore.preprocess import normalize
from service.decoding import DecodeLimits, ImageDecoder, stack_pixels
from service.errors import ImageError
from service.settings import Settings
from tests.conftest import encode, make_photo
from tests.service.conftest import LiveServer, serve
from tests.service.index_support import AUTH, KEY, b64

FAST = PreprocessConfig(img_size=32, resize_size=37, fidelity="fast")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


# ----- decoder and batch hook (no server) -----
def test_fast_decoder_returns_uint8_and_stack_normalises_mixed_batches(asset_bytes: dict[str, bytes]) -> None:
    decoder = ImageDecoder(FAST, DecodeLimits(), workers=1)
    try:
        pixels = [decoder.decode_one(data) for data in asset_bytes.values()]
    finally:
        decoder.close()
    assert all(p.dtype == np.uint8 and p.shape == (3, 32, 32) for p in pixels)
    expected = np.stack([preprocess(Image.open(io.BytesIO(d)), FAST) for d in asset_bytes.values()])
    np.testing.assert_array_equal(stack_pixels(pixels, FAST), expected)
    # A batch may mix fast uint8 images with float32 ones (KServe's FP32 tensors skip decoding).
    mixed = [pixels[0], normalize(pixels[1], FAST), pixels[2]]
    np.testing.assert_array_equal(stack_pixels(mixed, FAST), expected[:3])
    exact_floats = [normalize(p, FAST) for p in pixels[:2]]
    np.testing.assert_array_equal(stack_pixels(exact_floats, FAST), expected[:2])


def test_fast_decoder_still_refuses_damaged_images_with_4xx() -> None:
    decoder = ImageDecoder(FAST, DecodeLimits(), workers=1)
    data = encode(make_photo(800, 600, seed=1), "JPEG", quality=90)
    try:
        with pytest.raises(ImageError) as info:
            decoder.decode_one(data[: len(data) // 3], index=2)
    finally:
        decoder.close()
    assert info.value.code == "corrupt_image" and info.value.http_status == 422 and info.value.index == 2


# ----- over HTTP -----
@pytest.fixture(scope="module")
def servers(debug_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LiveServer]]:
    common = {"model": str(debug_checkpoint), "max_wait_ms": 2, "max_batch_size": 8}
    index = str(tmp_path_factory.mktemp("fastprep") / "index")
    exact = serve(Settings(**common, index_path=index, api_keys=KEY))
    try:
        fast = serve(Settings(**common, preprocess_mode="fast"))
    except BaseException:
        exact.stop()
        raise
    yield {"exact": exact, "fast": fast}
    fast.stop()
    exact.stop()


def embed(server: LiveServer, images: list[bytes]) -> dict:
    with server.client() as client:
        r = client.post("/embed", json={"images": [b64(i) for i in images]})
    assert r.status_code == 200, r.text
    return r.json()


def test_info_shows_the_mode(servers: dict[str, LiveServer]) -> None:
    for mode, server in servers.items():
        with server.client() as client:
            info = client.get("/info").json()
        assert info["settings"]["preprocess_mode"] == mode
        assert info["model"]["preprocess_mode"] == mode
        assert info["model"]["preprocess"].get("fidelity", "exact") == mode
        assert server.engine.decoder.fast is (mode == "fast")


def test_fast_embed_over_http_is_close_to_exact(servers: dict[str, LiveServer], asset_bytes: dict[str, bytes]) -> None:
    images = list(asset_bytes.values())
    exact, fast = embed(servers["exact"], images), embed(servers["fast"], images)
    cos = cosines(np.array(exact["embeddings"]), np.array(fast["embeddings"]))
    assert cos.min() > 0.999, cos  # aim-debug at 32 px: 1/8 DCT drafts of the 300-640 px photos
    assert exact["recipe"]["fingerprint"] != fast["recipe"]["fingerprint"]
    assert fast["recipe"]["preprocess"]["fidelity"] == "fast" and "fidelity" not in exact["recipe"]["preprocess"]
    # Multipart, one image per request: the same vector as in the JSON batch (normalisation is per row).
    name = "landscape_640x427.jpg"
    with servers["fast"].client() as client:
        r = client.post("/embed", files=[("files", (name, asset_bytes[name]))])
    assert r.status_code == 200, r.text
    row = list(asset_bytes).index(name)
    np.testing.assert_allclose(r.json()["embeddings"][0], fast["embeddings"][row], atol=1e-5)


def test_exact_index_refuses_fast_vectors(servers: dict[str, LiveServer], asset_bytes: dict[str, bytes]) -> None:
    images = [asset_bytes["square_224.jpg"], asset_bytes["portrait_427x640.jpg"]]
    fast = embed(servers["fast"], images)
    exact = embed(servers["exact"], images)
    add = {"ids": ["a", "b"], "vectors": fast["embeddings"]}
    with servers["exact"].client() as client:
        for recipe in (fast["recipe"], fast["recipe"]["fingerprint"]):
            r = client.post("/index/items", json={**add, "recipe": recipe}, headers=AUTH)
            assert (r.status_code, r.json()["error"]["code"]) == (409, "index_recipe_mismatch"), r.text
        r = client.post("/search", json={"vectors": fast["embeddings"], "recipe": fast["recipe"]})
        assert (r.status_code, r.json()["error"]["code"]) == (409, "index_recipe_mismatch"), r.text
        ok = client.post(
            "/index/items", json={**add, "vectors": exact["embeddings"], "recipe": exact["recipe"]}, headers=AUTH
        )
        assert ok.status_code == 200 and ok.json()["added"] == 2, ok.text
