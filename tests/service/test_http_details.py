"""HTTP details a load balancer, a generated client or a careless caller hits: OPTIONS and 405 list every method
of a path, HEAD on the health routes, the multipart `files` bounds in OpenAPI, and query parameters on the
inference routes (`/classify?top_k=2` applies; an unknown one is refused, never ignored). Real uvicorn on loopback
with the fake backend and an index."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from service.backends.fake_backend import FakeBackend
from service.main import create_app
from service.settings import Settings
from tests.service.conftest import LiveServer, serve
from tests.service.index_support import b64
from tests.service.test_load import PHOTO

MAX_IMAGES = 7


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = Settings(
        golden_check=False,
        max_wait_ms=1,
        max_images_per_request=MAX_IMAGES,
        index_path=str(tmp_path_factory.mktemp("details") / "index"),
    )
    with serve(settings, FakeBackend()) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def allow(response: httpx.Response) -> set[str]:
    return {m.strip() for m in response.headers.get("allow", "").split(",") if m.strip()}


@pytest.mark.parametrize(
    ("path", "methods"),
    [
        ("/index/items/some-id", {"GET", "DELETE", "OPTIONS"}),
        ("/index/items/a/b.jpg", {"GET", "DELETE", "OPTIONS"}),
        ("/embed", {"POST", "OPTIONS"}),
        ("/healthz", {"GET", "HEAD", "OPTIONS"}),
        ("/index", {"GET", "OPTIONS"}),
    ],
)
def test_options_lists_every_method_of_the_path(client: httpx.Client, path: str, methods: set[str]) -> None:
    r = client.options(path)
    assert r.status_code == 204, r.text
    assert allow(r) == methods
    assert r.content == b""


def test_405_names_every_method_and_unknown_paths_stay_404(client: httpx.Client) -> None:
    r = client.put("/index/items/some-id", json={})
    assert (r.status_code, r.json()["error"]["code"]) == (405, "method_not_allowed")
    assert allow(r) == {"GET", "DELETE", "OPTIONS"}
    for method in ("GET", "OPTIONS", "POST"):
        r = client.request(method, "/no/such/route")
        assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found"), method


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"])
def test_head_answers_like_get_without_a_body(client: httpx.Client, path: str) -> None:
    get, head = client.get(path), client.head(path)
    assert head.status_code == get.status_code == 200
    assert head.content == b""
    assert head.headers.get("content-type") == get.headers.get("content-type")


def test_head_says_not_ready_like_get(live: list) -> None:
    """While loading, HEAD /readyz is 503 like GET: a load balancer probing with HEAD keeps traffic away."""
    import threading

    gate = threading.Event()

    class SlowToLoad(FakeBackend):
        def infer(self, pixels, outputs):  # type: ignore[no-untyped-def]
            gate.wait(10)  # the warm-up blocks: the engine stays "loading"
            return super().infer(pixels, outputs)

    server = LiveServer(create_app(Settings(golden_check=False), backend=SlowToLoad())).start(ready=False)
    live.append(server)
    try:
        with server.client() as c:
            assert c.get("/readyz").status_code == 503
            head = c.head("/readyz")
            assert head.status_code == 503 and head.content == b"" and head.headers["retry-after"] == "1"
            assert c.head("/v2/health/ready").status_code == 503
    finally:
        gate.set()


def test_openapi_bounds_the_multipart_files(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    bounded = []
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            form = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data")
            if form is None:
                continue
            files = form["schema"]["properties"]["files"]
            assert (files["minItems"], files["maxItems"]) == (1, MAX_IMAGES), path
            bounded.append(path)
    assert {"/embed", "/classify", "/search", "/index/items", "/analyze"} <= set(bounded)
    # Another app with another limit has its own spec (the routes' declarations are shared module objects).
    other = create_app(Settings(golden_check=False, max_images_per_request=3), backend=FakeBackend()).openapi()
    form = other["paths"]["/embed"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert form["schema"]["properties"]["files"]["maxItems"] == 3
    again = client.get("/openapi.json").json()
    assert json.dumps(again["paths"]["/embed"]) == json.dumps(spec["paths"]["/embed"])


def test_classify_takes_top_k_as_a_query_parameter(client: httpx.Client) -> None:
    image = b64(PHOTO)
    r = client.post("/classify", params={"top_k": "2"}, json={"images": [image]})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"][0]["labels"]) == 2
    r = client.post("/classify?top_k=3", files=[("files", ("a.png", PHOTO))])  # multipart alike
    assert r.status_code == 200 and len(r.json()["predictions"][0]["indices"]) == 3
    same = client.post("/classify?top_k=2", json={"images": [image], "top_k": 2})
    assert same.status_code == 200 and len(same.json()["predictions"][0]["labels"]) == 2
    for query, body, needle in (
        ("top_k=0", {}, "between 1 and 1000"),
        ("top_k=two", {}, "integer"),
        ("top_k=2&top_k=3", {}, "2 times"),
        ("top_k=2", {"top_k": 4}, "give it once"),
    ):
        r = client.post(f"/classify?{query}", json={"images": [image], **body})
        assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_request"), query
        assert needle in r.json()["error"]["message"], r.text


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/embed", {"images": [b64(PHOTO)]}, "pooling"),
        ("/classify", {"images": [b64(PHOTO)]}, "k"),
        ("/analyze", {"images": [b64(PHOTO)]}, "top_k"),
        ("/search", {"images": [b64(PHOTO)]}, "k"),
        ("/index/items", {"ids": ["x"], "images": [b64(PHOTO)]}, "replace"),
    ],
)
def test_unknown_query_parameters_are_refused_by_name(client: httpx.Client, path: str, body: dict, param: str) -> None:
    r = client.post(path, params={param: "1"}, json=body)
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_request"), r.text
    assert repr(param) in r.json()["error"]["message"] and path in r.json()["error"]["message"]
    assert client.post(path, json=body).status_code == 200  # the same body without it is fine
