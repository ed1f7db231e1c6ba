"""The HTTP API against a real uvicorn on loopback, serving the aim-debug checkpoint with the torch backend:
answers equal aimcore's offline output, errors are 4xx with stable codes, and the ops endpoints tell the truth."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import aimcore
from aimcore import AimModel, preprocess
from service.settings import Settings
from tests.conftest import encode, make_photo
from tests.service.conftest import LiveServer, serve

# Pillow warns at open() above 89 MP; the service refuses such images itself, from the header.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


@pytest.fixture(scope="module")
def server(debug_checkpoint: Path) -> Iterator[LiveServer]:
    with serve(Settings(model=str(debug_checkpoint), max_wait_ms=2, max_batch_size=16)) as live:
        yield live


@pytest.fixture(scope="module")
def offline(debug_checkpoint: Path) -> AimModel:
    return aimcore.load_model(debug_checkpoint)


def offline_pixels(model: AimModel, blobs: list[bytes]) -> torch.Tensor:
    cfg = model.preprocess_config  # type: ignore[attr-defined]
    return torch.from_numpy(np.stack([preprocess(Image.open(io.BytesIO(b)), cfg) for b in blobs]))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("pooling", ["mean", "probe"])
def test_embeddings_equal_offline_output(
    server: LiveServer, offline: AimModel, asset_bytes: dict[str, bytes], pooling: str
) -> None:
    blobs = list(asset_bytes.values())  # 12 real JPEG/PNG files: EXIF, palette, gray, CMYK, RGBA, odd sizes
    with torch.no_grad():
        expected = offline.embed(offline_pixels(offline, blobs), pooling=pooling).numpy()
    with server.client() as client:
        as_json = client.post("/embed", json={"images": [b64(b) for b in blobs], "pooling": pooling})
        as_files = client.post(
            "/embed", files=[("files", (n, b)) for n, b in asset_bytes.items()], data={"pooling": pooling}
        )
    for response in (as_json, as_files):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["count"] == 12 and body["dim"] == offline.config.embed_dim
        np.testing.assert_allclose(np.array(body["embeddings"]), expected, rtol=1e-5, atol=1e-6)
        recipe = body["recipe"]
        assert recipe["pooling"] == pooling and recipe["model_sha256"] == aimcore.sha256_file(
            offline.checkpoint_files[0]
        )
        assert recipe["fingerprint"].startswith("aimfp1-")
        assert recipe["layers"] == ([3] if pooling == "mean" else [1, 2])


def test_unnormalised_embeddings(server: LiveServer, offline: AimModel, asset_bytes: dict[str, bytes]) -> None:
    blob = asset_bytes["square_224.jpg"]
    with torch.no_grad():
        expected = offline.embed(offline_pixels(offline, [blob]), normalize=False).numpy()
    with server.client() as client:
        body = client.post("/embed", json={"images": [b64(blob)], "normalize": False}).json()
    np.testing.assert_allclose(np.array(body["embeddings"]), expected, rtol=1e-5, atol=1e-6)
    assert body["recipe"]["fingerprint"] is None  # only unit vectors are index-compatible


def test_classify_equals_offline_softmax(server: LiveServer, offline: AimModel, asset_bytes: dict[str, bytes]) -> None:
    blobs = [asset_bytes["landscape_640x427.jpg"], asset_bytes["palette_320x240.png"]]
    with torch.no_grad():
        probs = offline(offline_pixels(offline, blobs)).softmax(-1).double().numpy()
    with server.client() as client:
        body = client.post(
            "/classify", files=[("files", ("a.jpg", blobs[0])), ("files", ("b.png", blobs[1]))], data={"top_k": "3"}
        ).json()
    for row, pred in zip(probs, body["predictions"], strict=True):
        top = np.argsort(-row)[:3]
        assert pred["indices"] == top.tolist()
        assert pred["labels"] == [f"class_{i}" for i in top]
        np.testing.assert_allclose(pred["probs"], row[top], rtol=1e-5)


def test_timing_headers(server: LiveServer, asset_bytes: dict[str, bytes]) -> None:
    with server.client() as client:
        r = client.post("/embed", files=[("files", ("x.jpg", asset_bytes["portrait_427x640.jpg"]))])
    assert r.status_code == 200
    stages = {k: float(r.headers[f"x-{k}-ms"]) for k in ("decode", "queue", "compute", "total")}
    assert stages["total"] >= stages["decode"] + stages["queue"] + stages["compute"]
    assert int(r.headers["x-batch-size"]) >= 1
    timing = dict(part.strip().split(";dur=") for part in r.headers["server-timing"].split(","))
    assert set(timing) == {"decode", "queue", "compute", "total"}


def test_bad_inputs_are_4xx_with_stable_codes(server: LiveServer, asset_bytes: dict[str, bytes]) -> None:
    good = b64(asset_bytes["small_100x80.png"])
    jpeg = encode(make_photo(200, 150), "JPEG")
    cases = [
        ({"json": {"images": [good, b64(jpeg[: len(jpeg) // 3])]}}, 422, "corrupt_image", "images[1]"),
        ({"json": {"images": [b64(b"just some text")]}}, 422, "not_an_image", "images[0]"),
        ({"json": {"images": ["%%%"]}}, 422, "invalid_base64", "images[0]"),
        ({"json": {"images": [b64(encode(make_photo(30, 30), "GIF"))]}}, 415, "unsupported_format", "GIF"),
        ({"json": {"images": []}}, 422, "invalid_request", "images"),
        ({"json": {"images": [good] * 33}}, 413, "too_many_images", "33"),
        ({"json": {"images": [good], "pooling": "max"}}, 422, "invalid_request", "pooling"),
        ({"json": {"images": [good], "extra": 1}}, 422, "invalid_request", "extra"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "invalid_request", ""),
        ({"content": b"raw", "headers": {"content-type": "image/png"}}, 415, "unsupported_media_type", "image/png"),
        ({"files": [("other", ("a.png", b"x"))]}, 422, "invalid_request", "files"),
        ({"files": [("files", ("a.png", b"x"))] * 33}, 413, "too_many_images", "32"),
        ({"files": [("files", ("a.png", b"x"))], "data": {"normalize": "maybe"}}, 422, "invalid_request", "normalize"),
        ({"json": {"images": [good]}, "headers": {"x-request-timeout": "soon"}}, 422, "invalid_request", "Timeout"),
    ]
    with server.client() as client:
        for kwargs, status, code, needle in cases:
            r = client.post("/embed", **kwargs)
            assert r.status_code == status, (kwargs.keys(), r.text)
            err = r.json()["error"]
            assert err["code"] == code and needle in err["message"], err
        r = client.get("/nope")
        assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")
        r = client.get("/embed")
        assert (r.status_code, r.json()["error"]["code"]) == (405, "method_not_allowed")


def test_decompression_bomb_is_refused_in_milliseconds(server: LiveServer, png_bomb: bytes) -> None:
    with server.client() as client:
        t0 = time.perf_counter()
        r = client.post("/embed", files=[("files", ("bomb.png", png_bomb))])
        elapsed = time.perf_counter() - t0
    assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large"
    assert float(r.headers["x-total-ms"]) < 50 and elapsed < 1.0


def test_ops_endpoints(server: LiveServer) -> None:
    with server.client() as client:
        assert client.get("/healthz").json()["status"] == "alive"
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["self_check"] == "passed"
        info = client.get("/info").json()
        assert info["backend"]["name"] == "torch" and info["model"]["has_head"]
        assert info["self_check"]["status"] == "passed" and info["self_check"]["batch_size"] == 16
        assert info["self_check"]["min_cosine"]["embedding"] > 0.9999
        assert set(info["recipes"]) == {"mean", "probe"}
        # A debug checkpoint folder with no card: the licence is said to be unknown, not left out.
        assert info["model"]["licence"]["id"] is None and "check the licence" in info["model"]["licence"]["from"]
        client.post("/embed", json={"images": ["%%%"]})
        text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "aim_request_seconds",
        "aim_decode_seconds",
        "aim_queue_seconds",
        "aim_compute_seconds",
        "aim_batch_size",
        "aim_queue_depth",
        "aim_in_flight_requests",
        "aim_requests",
        "aim_failures",
        "aim_model_info",
        "aim_golden_check_ok",
        "aim_ready",
    ):
        assert name in families, name
    failures = {(s.labels["endpoint"], s.labels["reason"]) for s in families["aim_failures"].samples}
    assert ("/embed", "invalid_base64") in failures
    assert families["aim_ready"].samples[0].value == 1.0


def test_probe_and_classify_without_a_head_are_409(tmp_path: Path, offline: AimModel, live: list) -> None:
    path = tmp_path / "trunk.safetensors"
    aimcore.save_checkpoint(offline, path, include_head=False)
    live.append(serve(Settings(model=str(path), max_batch_size=4)))
    with live[0].client() as client:
        image = b64(encode(make_photo(64, 64), "PNG"))
        assert client.post("/embed", json={"images": [image]}).status_code == 200
        for url, body in (("/embed", {"images": [image], "pooling": "probe"}), ("/classify", {"images": [image]})):
            r = client.post(url, json=body)
            assert r.status_code == 409 and r.json()["error"]["code"] == "no_head", r.text
