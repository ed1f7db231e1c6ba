"""POST /v1/embeddings with the real `openai` SDK against a live uvicorn on loopback (aim-debug, torch backend):
the vectors equal /embed's in both encoding formats, the Infinity and Jina input shapes work, and errors come in
OpenAI's shape with the right status, through the SDK's own exception classes."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aimcore import get_flavor
from service.backends.fake_backend import FakeBackend
from service.errors import dialect_error
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
def blobs(asset_bytes: dict[str, bytes]) -> list[bytes]:
    return list(asset_bytes.values())[:6]  # real JPEG / PNG files of several modes and sizes


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def sdk(server: LiveServer, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


def embed_reference(server: LiveServer, blobs: list[bytes], pooling: str = "mean") -> np.ndarray:
    with server.client() as client:
        r = client.post("/embed", json={"images": [b64(b) for b in blobs], "pooling": pooling})
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["embeddings"], np.float32)


def assert_same_vectors(got: np.ndarray, expected: np.ndarray) -> None:
    # Unit vectors from the same weights and pixels; only float32 summation order (batch-mates) may differ.
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6 * np.sqrt(expected.shape[1]))


def test_sdk_vectors_equal_embed_in_both_encodings(server: LiveServer, blobs: list[bytes]) -> None:
    expected = embed_reference(server, blobs)
    client = sdk(server)
    images = [b64(b) for b in blobs]
    extra = {"modality": "image"}  # Infinity's switch: bare strings are base64 images
    default = client.embeddings.create(model=MODEL, input=images, extra_body=extra)  # the SDK asks for base64
    floats = client.embeddings.create(model=MODEL, input=images, encoding_format="float", extra_body=extra)
    raw = client.embeddings.create(model=MODEL, input=images, encoding_format="base64", extra_body=extra)
    for response in (default, floats):
        assert [d.index for d in response.data] == list(range(len(blobs)))
        assert_same_vectors(np.asarray([d.embedding for d in response.data], np.float32), expected)
    decoded = np.stack([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in raw.data])
    assert_same_vectors(decoded, expected)
    assert floats.model == MODEL and floats.object == "list" and floats.data[0].object == "embedding"
    cfg = get_flavor(MODEL)
    patches = (cfg.img_size // cfg.patch_size) ** 2
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == len(blobs) * patches


def test_jina_objects_data_uris_and_probe_pooling(server: LiveServer, blobs: list[bytes]) -> None:
    expected = embed_reference(server, blobs[:3], pooling="probe")
    uris = [f"data:image/png;base64,{b64(b)}" for b in blobs[:3]]
    with server.client() as client:
        jina = client.post(
            "/v1/embeddings",
            json={"model": MODEL, "input": [{"image": u} for u in uris], "pooling": "probe", "user": "u1"},
        )
        single = client.post("/v1/embeddings", json={"model": MODEL, "input": uris[0], "pooling": "probe"})
    assert jina.status_code == 200, jina.text
    assert_same_vectors(np.asarray([d["embedding"] for d in jina.json()["data"]], np.float32), expected)
    assert_same_vectors(np.asarray([single.json()["data"][0]["embedding"]], np.float32), expected[:1])


def test_models_list_and_retrieve(server: LiveServer) -> None:
    client = sdk(server)
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("text-embedding-3-small")


def test_errors_in_openai_shape_through_the_sdk(server: LiveServer, blobs: list[bytes]) -> None:
    client = sdk(server)
    image = b64(blobs[0])
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model=MODEL, input=[image], dimensions=7, extra_body={"modality": "image"})
    assert exc.value.status_code == 400 and exc.value.code == "unsupported_dimensions"
    assert exc.value.param == "dimensions" and exc.value.type == "invalid_request_error"
    dim = get_flavor(MODEL).embed_dim
    assert str(dim) in exc.value.message  # names the model's dimension
    ok = client.embeddings.create(model=MODEL, input=[image], dimensions=dim, extra_body={"modality": "image"})
    assert len(ok.data[0].embedding) == dim
    with pytest.raises(openai.NotFoundError) as exc:
        client.embeddings.create(model="text-embedding-3-small", input=[image], extra_body={"modality": "image"})
    assert exc.value.code == "model_not_found"
    cases = [
        ({"input": ["bm90IGFuIGltYWdl"], "modality": "image"}, "not_an_image", "input[0]"),
        ({"input": ["%%%"], "modality": "image"}, "invalid_base64", "input[0]"),
        ({"input": [image]}, "invalid_request", "input[0]"),  # a bare string without modality=image
        ({"input": [[1, 2, 3]]}, "invalid_request", "input[0]"),  # token arrays
        ({"input": ["a cat"], "modality": "text"}, "invalid_request", "modality"),
        ({"input": ["https://example.com/cat.jpg"]}, "url_fetch_disabled", "input[0]"),
        ({"input": [], "modality": "image"}, "invalid_request", "input"),
        ({"input": [image], "encoding_format": "int8"}, "invalid_request", "encoding_format"),
        ({"input": [image], "modality": "image", "top_k": 3}, "invalid_request", "top_k"),
    ]
    with server.client() as http:
        for body, code, param in cases:
            r = http.post("/v1/embeddings", json={"model": MODEL, **body})
            assert r.status_code == 400, (body, r.text)
            err = r.json()["error"]
            assert (err["code"], err["param"], err["type"]) == (code, param, "invalid_request_error"), (body, err)
            assert err["message"]
        too_many = http.post("/v1/embeddings", json={"model": MODEL, "input": [image] * 9, "modality": "image"})
        assert too_many.status_code == 413 and too_many.json()["error"]["code"] == "too_many_images"
        form = http.post("/v1/embeddings", content=b"x", headers={"content-type": "text/plain"})
        assert form.status_code == 415 and "application/json" in form.json()["error"]["message"]


def test_same_metrics_as_embed(server: LiveServer, blobs: list[bytes]) -> None:
    def images_counted() -> float:
        with server.client() as http:
            text = http.get("/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "aim_images_total" and sample.labels.get("endpoint") == "/v1/embeddings":
                    return sample.value
        return 0.0

    before = images_counted()
    sdk(server).embeddings.create(model=MODEL, input=[b64(b) for b in blobs[:2]], extra_body={"modality": "image"})
    assert images_counted() == before + 2


def test_same_auth_as_embed(debug_checkpoint: Path, blobs: list[bytes], live: list[LiveServer]) -> None:
    settings = Settings(model=str(debug_checkpoint), api_keys="k1", auth_scope="inference", golden_check=False)
    live.append(server := serve(settings))
    image = b64(blobs[0])
    with pytest.raises(openai.AuthenticationError) as exc:
        sdk(server, api_key="wrong").embeddings.create(model=MODEL, input=[image], extra_body={"modality": "image"})
    assert exc.value.code == "unauthorized" and exc.value.type == "authentication_error"
    with httpx.Client(base_url=server.url) as http:
        assert http.post("/embed", json={"images": [image]}).status_code == 401  # the same policy
    ok = sdk(server, api_key="k1").embeddings.create(model=MODEL, input=[image], extra_body={"modality": "image"})
    assert len(ok.data) == 1
    # The default scope (mutating): inference needs no key, on the adapters as on /embed.
    live.append(default := serve(Settings(model=str(debug_checkpoint), api_keys="k1", golden_check=False)))
    with httpx.Client(base_url=default.url) as http:
        assert http.post("/v1/embeddings", json={"model": MODEL, "input": [image], "modality": "image"}).is_success
        v2 = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [image]}]}
        assert http.post(f"/v2/models/{MODEL}/infer", json=v2).is_success
        assert http.post("/index/snapshot").status_code == 401  # a mutation still needs one


def test_same_deadlines_as_embed(server: LiveServer, blobs: list[bytes]) -> None:
    body = {"model": MODEL, "input": [b64(b) for b in blobs], "modality": "image"}
    with server.client() as http:
        r = http.post("/v1/embeddings", json=body, headers={"X-Request-Timeout": "0.000001"})
        bad = http.post("/v1/embeddings", json=body, headers={"X-Request-Timeout": "soon"})
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    assert r.json()["error"]["type"] == "server_error"
    assert bad.status_code == 400 and "X-Request-Timeout" in bad.json()["error"]["message"]


def test_error_dialects_by_route() -> None:
    assert dialect_error("/v1/embeddings", 429, "overloaded", "full")[1]["error"]["type"] == "rate_limit_error"
    assert dialect_error("/v2/models/m/infer", 422, "corrupt_image", "bad") == (
        400,
        {"error": "bad", "code": "corrupt_image"},
    )
    assert dialect_error("/embed", 422, "corrupt_image", "bad") == (
        422,
        {"error": {"code": "corrupt_image", "message": "bad"}},
    )
    assert dialect_error("/v2x", 404, "not_found", "x")[1] == {"error": {"code": "not_found", "message": "x"}}


def test_openapi_documents_the_adapters(server: LiveServer) -> None:
    with server.client() as http:
        spec = http.get("/openapi.json").json()
    paths = spec["paths"]
    for path, method in [
        ("/v1/embeddings", "post"),
        ("/v1/models", "get"),
        ("/v1/models/{model}", "get"),
        ("/v2", "get"),
        ("/v2/health/live", "get"),
        ("/v2/health/ready", "get"),
        ("/v2/models/{name}", "get"),
        ("/v2/models/{name}/ready", "get"),
        ("/v2/models/{name}/infer", "post"),
    ]:
        assert method in paths[path], path
        assert paths[path][method]["summary"]
    schemas = spec["components"]["schemas"]
    body = paths["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert body.rsplit("/", 1)[1] in schemas and "encoding_format" in schemas["EmbeddingsRequest"]["properties"]
    infer = paths["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]
    assert {"application/json", "application/octet-stream"} <= set(infer) and "InferRequest" in schemas
    assert "400" in paths["/v1/embeddings"]["post"]["responses"]


def test_same_admission_as_embed(live: list[LiveServer], blobs: list[bytes]) -> None:
    """One image computing and one queued fill max_queue=1: the next is refused at once, in each dialect."""
    settings = Settings(max_queue=1, max_images_per_request=1, max_batch_size=1, max_wait_ms=0, golden_check=False)
    backend = FakeBackend(delay_s=1.5)
    live.append(server := serve(settings, backend))
    image = b64(blobs[0])

    def wait_until(ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 20
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.01)

    with ThreadPoolExecutor(2) as pool:
        calls = len(backend.calls)  # the warm-up's
        busy = [pool.submit(httpx.post, f"{server.url}/embed", json={"images": [image]}, timeout=30)]
        wait_until(lambda: len(backend.calls) > calls)  # the first is computing (its slot is free again)
        busy.append(pool.submit(httpx.post, f"{server.url}/embed", json={"images": [image]}, timeout=30))
        wait_until(lambda: server.engine.batcher.queue_depth == 1)  # the second waits in the queue
        with pytest.raises(openai.RateLimitError) as exc:
            sdk(server).embeddings.create(model="aim-debug", input=[image], extra_body={"modality": "image"})
        with server.client() as http:
            v2 = http.post(
                "/v2/models/aim-debug/infer",
                json={"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [image]}]},
            )
        assert [f.result().status_code for f in busy] == [200, 200]
    assert exc.value.code == "overloaded" and exc.value.response.headers["retry-after"].isdigit()
    assert v2.status_code == 429 and v2.json()["code"] == "overloaded" and "retry-after" in v2.headers
