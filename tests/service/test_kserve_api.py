"""The KServe v2 / Open Inference Protocol routes with the real `tritonclient[http]` against a live uvicorn on
loopback (aim-debug, torch backend), called the way a Triton user calls a Triton server: health, metadata, and
infer with encoded images as BYTES (binary and JSON) or preprocessed FP32 pixels, outputs binary or JSON. The
vectors equal /embed's; the logits give /classify's probabilities."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from aimcore import get_flavor, preprocess
from service.settings import Settings
from tests.service.conftest import LiveServer, serve

MODEL = "aim-debug"


@pytest.fixture(scope="module")
def server(debug_checkpoint: Path) -> Iterator[LiveServer]:
    with serve(
        Settings(model=str(debug_checkpoint), max_wait_ms=2, max_batch_size=16, max_images_per_request=8)
    ) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield c
    c.close()


@pytest.fixture(scope="module")
def blobs(asset_bytes: dict[str, bytes]) -> list[bytes]:
    return list(asset_bytes.values())[:5]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def project(server: LiveServer, route: str, blobs: list[bytes], **options: object) -> dict:
    with server.client() as http:
        r = http.post(route, json={"images": [b64(b) for b in blobs], **options})
    assert r.status_code == 200, r.text
    return r.json()


def assert_same_vectors(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6 * np.sqrt(expected.shape[1]))


def image_input(blobs: list[bytes], *, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("IMAGE", [len(blobs)], "BYTES")
    values = blobs if binary else [b64(b).encode() for b in blobs]  # JSON strings must be UTF-8: base64 text
    tensor.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
    return tensor


def test_health_and_metadata(client: triton.InferenceServerClient, server: LiveServer) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, model_version="1")
    assert not client.is_model_ready("resnet50")
    cfg = get_flavor(MODEL)
    meta = client.get_model_metadata(MODEL)
    assert meta["name"] == MODEL and meta["versions"] == ["1"]
    assert {(t["name"], t["datatype"]) for t in meta["inputs"]} == {("IMAGE", "BYTES"), ("PIXELS", "FP32")}
    outputs = {t["name"]: t["shape"] for t in meta["outputs"]}
    assert outputs == {"embedding": [-1, cfg.embed_dim], "pooled": [-1, cfg.embed_dim], "logits": [-1, cfg.num_classes]}
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    with pytest.raises(InferenceServerException) as exc:
        client.get_model_metadata("resnet50")
    assert exc.value.status() == "404" and "aim-debug" in exc.value.message()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_bytes_input_equals_embed(
    client: triton.InferenceServerClient, server: LiveServer, blobs: list[bytes], binary: bool
) -> None:
    mean = np.asarray(project(server, "/embed", blobs)["embeddings"], np.float32)
    probe = np.asarray(project(server, "/embed", blobs, pooling="probe")["embeddings"], np.float32)
    outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("embedding", "pooled", "logits")]
    result = client.infer(MODEL, [image_input(blobs, binary=binary)], outputs=outputs, request_id="r1")
    assert_same_vectors(result.as_numpy("embedding"), mean)
    assert_same_vectors(result.as_numpy("pooled"), probe)
    assert result.get_response()["id"] == "r1"
    logits = result.as_numpy("logits").astype(np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    classify = project(server, "/classify", blobs, top_k=3)["predictions"]
    for row, pred in zip(probs, classify, strict=True):
        np.testing.assert_allclose(row[pred["indices"]], pred["probs"], rtol=1e-5)


def test_default_outputs_versioned_route_and_raw_vectors(
    client: triton.InferenceServerClient, server: LiveServer, blobs: list[bytes]
) -> None:
    raw = np.asarray(project(server, "/embed", blobs[:2], normalize=False)["embeddings"], np.float32)
    result = client.infer(
        MODEL, [image_input(blobs[:2], binary=True)], model_version="1", parameters={"normalize": False}
    )
    assert {o["name"] for o in result.get_response()["outputs"]} == {"embedding", "pooled", "logits"}
    got = result.as_numpy("embedding")
    np.testing.assert_allclose(got, raw, rtol=0, atol=2e-6 * np.abs(raw).max() * np.sqrt(raw.shape[1]))


def test_fp32_pixels_equal_embed(
    client: triton.InferenceServerClient, server: LiveServer, blobs: list[bytes], debug_checkpoint: Path
) -> None:
    prep = server.engine.backend.info.preprocess
    pixels = np.stack([preprocess(Image.open(io.BytesIO(b)), prep) for b in blobs[:3]]).astype(np.float32)
    expected = np.asarray(project(server, "/embed", blobs[:3])["embeddings"], np.float32)
    for binary in (True, False):
        tensor = triton.InferInput("PIXELS", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels, binary_data=binary)
        result = client.infer(MODEL, [tensor], outputs=[triton.InferRequestedOutput("embedding", binary_data=True)])
        assert_same_vectors(result.as_numpy("embedding"), expected)


def test_refusals_are_400s_naming_the_problem(
    client: triton.InferenceServerClient, server: LiveServer, blobs: list[bytes]
) -> None:
    def refused(inputs: list[triton.InferInput], outputs: list | None = None, model: str = MODEL) -> tuple[str, str]:
        with pytest.raises(InferenceServerException) as exc:
            client.infer(model, inputs, outputs=outputs)
        return exc.value.status(), exc.value.message()

    wrong_type = triton.InferInput("IMAGE", [1], "FP32")
    wrong_type.set_data_from_numpy(np.zeros(1, np.float32))
    status, message = refused([wrong_type])
    assert status == "400" and "IMAGE (BYTES" in message
    s = server.engine.backend.info.preprocess.img_size
    small = triton.InferInput("PIXELS", [1, 3, s, s - 1], "FP32")
    small.set_data_from_numpy(np.zeros((1, 3, s, s - 1), np.float32))
    status, message = refused([small])
    assert status == "400" and f"[N, 3, {s}, {s}]" in message
    nan = triton.InferInput("PIXELS", [1, 3, s, s], "FP32")
    nan.set_data_from_numpy(np.full((1, 3, s, s), np.nan, np.float32))
    assert "NaN" in refused([nan])[1]
    not_image = triton.InferInput("IMAGE", [1], "BYTES")
    not_image.set_data_from_numpy(np.array([b"hello"], dtype=np.object_))
    status, message = refused([not_image])
    assert status == "400" and "not a readable image" in message
    status, message = refused([image_input(blobs[:1], binary=True)], [triton.InferRequestedOutput("scores")])
    assert status == "400" and "embedding" in message
    assert refused([image_input(blobs[:1], binary=True)], model="resnet50")[0] == "404"
    status, message = refused([image_input(blobs[:1] * 9, binary=True)])
    assert status == "413" and "limit is 8" in message


def test_raw_http_errors_and_binary_framing(server: LiveServer, blobs: list[bytes]) -> None:
    with server.client() as http:
        bad_json = http.post(f"/v2/models/{MODEL}/infer", content=b"{not json")
        assert bad_json.status_code == 400 and set(bad_json.json()) == {"error", "code"}
        header = b'{"inputs":[{"name":"IMAGE","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":99}}]}'
        short = http.post(
            f"/v2/models/{MODEL}/infer",
            content=header + b"\x03\x00\x00\x00abc",
            headers={"Inference-Header-Content-Length": str(len(header))},
        )
        assert short.status_code == 400 and "binary_data_size" in short.json()["error"]
        gz = http.post(f"/v2/models/{MODEL}/infer", content=b"x", headers={"Content-Encoding": "gzip"})
        assert gz.status_code == 415
        assert http.get("/v2/health/live").status_code == 200
