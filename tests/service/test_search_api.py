"""The index routes against a real uvicorn on loopback serving the aim-debug checkpoint (torch backend), with real
PNG/JPEG files: add -> search, near-duplicates first, delete, filters, raw vectors, recipes, validation, auth,
GET /index, snapshots and the index metrics."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.backends.fake_backend import FakeBackend
from service.settings import Settings
from tests.service.conftest import LiveServer, serve
from tests.service.index_support import AUTH, KEY, b64, metric_samples, near_duplicate, wait_until

MAX_ITEMS = 50


@pytest.fixture(scope="module")
def server(debug_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = Settings(
        model=str(debug_checkpoint),
        max_wait_ms=2,
        max_batch_size=16,
        index_path=str(tmp_path_factory.mktemp("search") / "index"),
        api_keys=KEY,
        index_recall_check_interval_s=0.3,
        index_max_items_per_request=MAX_ITEMS,
    )
    with serve(settings) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def photos(client: httpx.Client, asset_bytes: dict[str, bytes]) -> dict[str, bytes]:
    """The 12 real test images, added once as multipart files with metadata (ids = file names)."""
    names = sorted(asset_bytes)
    metadata = [{"format": n.rsplit(".", 1)[1], "shard": i % 2} for i, n in enumerate(names)]
    r = client.post(
        "/index/items",
        files=[("files", (n, asset_bytes[n])) for n in names],
        data={"ids": json.dumps(names), "metadata": json.dumps(metadata)},
        headers=AUTH,
    )
    assert r.status_code == 200, r.text
    assert r.json()["added"] == 12
    return asset_bytes


def recipe_of(client: httpx.Client) -> str:
    return client.get("/index").json()["recipe"]["fingerprint"]


def test_near_duplicates_rank_first(client: httpx.Client, photos: dict[str, bytes]) -> None:
    names = sorted(photos)
    queries = [b64(near_duplicate(photos[n])) for n in names]
    r = client.post("/search", json={"images": queries, "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [res["ids"][0] for res in body["results"]] == names, "each resized/re-encoded copy finds its original"
    assert all(res["scores"][0] > res["scores"][1] for res in body["results"])
    assert body["recipe"]["fingerprint"] == recipe_of(client) and body["recipe"]["pooling"] == "mean"
    first = body["results"][0]
    assert first["metadata"][0] == {"format": names[0].rsplit(".", 1)[1], "shard": 0}
    # Multipart queries, exactly like /embed's; the exact file scores ~1.
    r = client.post("/search", files=[("files", (names[3], photos[names[3]]))], data={"k": "1"})
    assert r.json()["results"][0]["ids"] == [names[3]] and r.json()["results"][0]["scores"][0] > 0.999


def test_metadata_filter_threshold_and_search_by_id(client: httpx.Client, photos: dict[str, bytes]) -> None:
    name = "landscape_640x427.jpg"
    query = {"images": [b64(photos[name])], "k": 12}
    pngs = client.post("/search", json={**query, "where": {"format": "png"}}).json()["results"][0]
    assert pngs["ids"] and all(m["format"] == "png" for m in pngs["metadata"]) and name not in pngs["ids"]
    both = client.post("/search", json={**query, "where": {"format": "jpg", "shard": 0}}).json()["results"][0]
    assert all(m == {"format": "jpg", "shard": 0} for m in both["metadata"])
    form = client.post(
        "/search", files=[("files", (name, photos[name]))], data={"where": '{"format": "png"}', "k": "12"}
    )
    assert form.json()["results"][0]["ids"] == pngs["ids"]
    assert client.post("/search", json={**query, "where": {"format": "gif"}}).json()["results"][0]["ids"] == []
    exact = client.post("/search", json={**query, "score_threshold": 0.999}).json()["results"][0]
    assert exact["ids"] == [name]
    by_id = client.post("/search", json={"id": name, "k": 3}).json()["results"][0]
    assert len(by_id["ids"]) == 3 and name not in by_id["ids"]
    with_self = client.post("/search", json={"id": name, "k": 1, "include_self": True}).json()["results"][0]
    assert with_self["ids"] == [name]
    missing = client.post("/search", json={"id": "nope.jpg"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "item_not_found"


def test_raw_vectors_recipes_and_validation(client: httpx.Client, photos: dict[str, bytes]) -> None:
    emb = client.post("/embed", json={"images": [b64(photos["square_224.jpg"]), b64(photos["gray_280x350.jpg"])]})
    vectors, recipe = emb.json()["embeddings"], emb.json()["recipe"]
    assert recipe["fingerprint"] == recipe_of(client)
    add = {"ids": ["vec/a", "vec/b"], "vectors": vectors, "recipe": recipe, "metadata": [{"src": "api"}, None]}
    r = client.post("/index/items", json=add, headers=AUTH)
    assert r.status_code == 200 and r.json()["added"] == 2 and r.json()["replaced"] == 0, r.text
    again = client.post("/index/items", json={**add, "recipe": recipe["fingerprint"]}, headers=AUTH)
    assert again.json()["replaced"] == 2  # upsert
    hits = client.post("/search", json={"vectors": vectors[:1], "recipe": recipe["fingerprint"], "k": 2}).json()
    assert set(hits["results"][0]["ids"]) == {"vec/a", "square_224.jpg"}
    item = client.get("/index/items/vec/a").json()
    assert item == {"id": "vec/a", "metadata": {"src": "api"}}

    def refused(path: str, body: dict, status: int, code: str) -> None:
        r = client.post(path, json=body, headers=AUTH)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text

    other = "aimfp1-" + "0" * 24  # vectors "made by another model"
    refused("/search", {"vectors": vectors, "recipe": other}, 409, "index_recipe_mismatch")
    refused("/index/items", {**add, "recipe": other}, 409, "index_recipe_mismatch")
    refused("/search", {"vectors": vectors}, 422, "invalid_request")  # no recipe: cannot be checked
    refused("/search", {"vectors": [vectors[0][:-1]], "recipe": recipe}, 422, "invalid_vector")
    refused("/index/items", {**add, "vectors": [vectors[0], vectors[1][:5]]}, 422, "invalid_vector")
    refused("/search", {"vectors": [[0.0] * len(vectors[0])], "recipe": recipe}, 422, "invalid_vector")
    nan = client.post(
        "/search",
        content='{"vectors": [[NaN'
        + ", 1.0" * (len(vectors[0]) - 1)
        + ']], "recipe": "'
        + recipe["fingerprint"]
        + '"}',
        headers={"content-type": "application/json"},
    )
    assert (nan.status_code, nan.json()["error"]["code"]) == (422, "invalid_vector")
    refused("/index/items", {**add, "ids": ["dup", "dup"]}, 422, "invalid_request")
    refused("/index/items", {**add, "ids": ["only-one"]}, 422, "invalid_request")
    refused("/index/items", {**add, "metadata": ["not an object", None]}, 422, "invalid_request")
    refused("/index/items", {**add, "metadata": [{"x": 1}]}, 422, "invalid_request")
    many = [f"m{i}" for i in range(MAX_ITEMS + 1)]
    refused("/index/items", {"ids": many, "vectors": [vectors[0]] * len(many), "recipe": recipe}, 422, "too_many_items")
    refused("/search", {"vectors": [vectors[0]] * (MAX_ITEMS + 1), "recipe": recipe}, 422, "too_many_items")
    refused("/search", {"images": [b64(photos["square_224.jpg"])], "id": "vec/a"}, 422, "invalid_request")
    refused("/search", {"id": "vec/a", "k": 0}, 422, "invalid_request")
    refused("/search", {"id": "vec/a", "where": ["not", "a", "mapping"]}, 422, "invalid_request")
    refused("/index/items", {"ids": ["x"], "images": ["%%%"]}, 422, "invalid_base64")
    form = client.post(
        "/index/items", files=[("files", ("a.png", photos["small_100x80.png"]))], data={"ids": "a.png"}, headers=AUTH
    )
    assert (form.status_code, form.json()["error"]["code"]) == (422, "invalid_request")  # ids must be a JSON list


def test_delete_then_gone(client: httpx.Client, photos: dict[str, bytes]) -> None:
    name = "odd_301x255.png"
    r = client.post("/index/items", json={"ids": ["gone/" + name], "images": [b64(photos[name])]}, headers=AUTH)
    assert r.status_code == 200
    query = {"images": [b64(near_duplicate(photos[name]))], "k": 20}
    assert "gone/" + name in client.post("/search", json=query).json()["results"][0]["ids"]
    r = client.delete("/index/items/gone/" + name, headers=AUTH)
    assert r.status_code == 200 and r.json()["deleted"] == "gone/" + name
    ids = client.post("/search", json=query).json()["results"][0]["ids"]
    assert "gone/" + name not in ids and ids[0] == name
    again = client.delete("/index/items/gone/" + name, headers=AUTH)
    assert again.status_code == 404 and again.json()["error"]["code"] == "item_not_found"
    assert client.get("/index/items/gone/" + name).status_code == 404


def test_auth_on_every_mutating_route(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    mutating = [(m.upper(), p) for p, ops in spec["paths"].items() for m in ops if m in ("post", "put", "delete")]
    index_routes = {(m, p) for m, p in mutating if p.startswith("/index")}
    assert index_routes == {
        ("POST", "/index/items"),
        ("DELETE", "/index/items/{item_id}"),
        ("POST", "/index/snapshot"),
    }
    for method, path in sorted(index_routes):
        url = path.replace("{item_id}", "some/id")
        for headers in ({}, {"x-api-key": "wrong"}, {"authorization": "Basic " + KEY}):
            r = client.request(method, url, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", (method, path, headers)
        assert client.request(method, url, headers={"x-api-key": KEY}).status_code != 401
    # Reads and queries are not mutating (auth_scope=mutating): no key needed.
    assert client.get("/index").status_code == 200
    assert client.post("/search", json={"id": "square_224.jpg"}).status_code in (200, 404)


def test_get_index_snapshot_and_metrics(client: httpx.Client, photos: dict[str, bytes]) -> None:
    info = client.get("/index").json()
    assert info["type"] == "hnsw" and info["faiss_class"] == "IndexHNSWFlat" and info["dim"] == 64
    assert info["size"] >= 12 and info["params"]["ef_search"] == 64 and not info["read_only"]
    assert info["recipe"]["model_sha256"] and info["recipe"]["pooling"] == "mean"
    snap = client.post("/index/snapshot", headers=AUTH)
    assert snap.status_code == 200 and snap.json()["size"] == info["size"]
    after = client.get("/index").json()
    assert after["last_snapshot"]["lsn"] == snap.json()["lsn"] == after["lsn"] and after["wal_ops_pending"] == 0
    client.post("/search", json={"images": [b64(photos["square_224.jpg"])]})

    def recall_measured() -> bool:
        return 'aim_index_recall{k="10"}' in metric_samples(client.get("/metrics").text)

    wait_until(recall_measured, what="the recall self-check")  # every 0.3 s in this module
    samples = metric_samples(client.get("/metrics").text)
    assert samples["aim_index_size"] == after["size"]
    assert samples["aim_index_adds_total"] >= 12 and samples["aim_index_search_seconds_count"] >= 1
    assert samples["aim_index_add_seconds_count"] >= 1 and samples["aim_index_snapshot_seconds_count"] >= 1
    assert samples['aim_index_recall{k="10"}'] == pytest.approx(1.0, abs=0.2)
    assert "aim_index_deletes_total" in samples and "aim_index_tombstones" in samples
    assert samples["aim_index_last_snapshot_timestamp_seconds"] > 0


def test_without_an_index_routes_answer_no_index(live: list) -> None:
    server = serve(Settings(golden_check=False), FakeBackend())
    live.append(server)
    with server.client() as client:
        for method, path in (
            ("POST", "/search"),
            ("GET", "/index"),
            ("POST", "/index/items"),
            ("POST", "/index/snapshot"),
        ):
            r = client.request(method, path, json={"id": "x"})
            assert (r.status_code, r.json()["error"]["code"]) == (409, "no_index"), path
        assert "index" in client.delete("/index/items/x").json()["error"]["message"]
