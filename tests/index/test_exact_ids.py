"""Ids are exact. A route's `$` anchor also matches before a trailing newline, so `DELETE /index/items/victim%0A`
used to delete "victim"; and an id with a newline, which inserts accepted, could never be named again. Ids with
control characters (C0, DEL, C1) are refused wherever items come in (the index, POST /index/items as JSON or
multipart, the folder builder), and GET/DELETE name exactly the id in the URL."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from aimcore import build_model, get_flavor
from service.backends.fake_backend import FakeBackend
from service.backends.torch_backend import TorchBackend
from service.index import InvalidIdError, VectorIndex
from service.index.builder import build_index
from service.index.embedder import ImageEmbedder
from service.settings import Settings
from tests.conftest import encode, make_photo
from tests.index.conftest import clustered
from tests.service.conftest import serve

CONTROL_IDS = ["victim\n", "a\nb", "tab\there", "nul\x00", "bell\x07", "del\x7f", "c1\x85", "csi\x9b", "\r"]
ASSETS = Path(__file__).resolve().parents[1] / "assets" / "images"


@pytest.mark.parametrize("bad", CONTROL_IDS)
def test_the_index_refuses_control_characters_in_ids(make_index, recipe, bad: str) -> None:
    index = make_index("flat")
    with pytest.raises(InvalidIdError) as err:
        index.upsert(["fine", bad], clustered(2), recipe=recipe)
    assert err.value.code == "invalid_id" and err.value.http_status == 422
    assert repr(bad) in str(err.value), "the message names the id"
    assert len(index) == 0  # nothing of the request was written
    index.upsert(["fine", "ünïcödé / ok.jpg"], clustered(2), recipe=recipe)  # printable text stays fine
    assert len(index) == 2


def test_the_builder_skips_file_names_with_control_characters(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    shutil.copy(ASSETS / "landscape_640x427.jpg", root / "good.jpg")
    (root / "bad\nname.png").write_bytes(encode(make_photo(64, 48), "PNG"))
    embedder = ImageEmbedder(TorchBackend(build_model(get_flavor("aim-debug")).eval(), model_id="m", max_batch_size=2))
    try:
        report = build_index(root, tmp_path / "index", embedder, progress=False)
    finally:
        embedder.close()
    assert report.added == 1 and [s["id"] for s in report.skipped] == ["bad\nname.png"]
    assert "control character" in report.skipped[0]["reason"]
    with VectorIndex.open(tmp_path / "index", read_only=True) as index:
        assert "good.jpg" in index and len(index) == 1


def test_http_inserts_refuse_control_characters_by_name(tmp_path: Path) -> None:
    settings = Settings(golden_check=False, max_wait_ms=1, index_path=str(tmp_path / "index"))
    with serve(settings, FakeBackend()) as server, server.client() as client:
        info = client.get("/index").json()
        recipe, dim = info["recipe"]["fingerprint"], info["dim"]
        vectors = np.eye(3, dim, dtype=np.float32).tolist()
        ok = client.post("/index/items", json={"ids": ["victim", "a/b", "x"], "vectors": vectors, "recipe": recipe})
        assert ok.status_code == 200, ok.text

        # Inserts: JSON and multipart refuse the id by name, and write nothing.
        for bad in ("victim\n", "v\x01", "v\x7f", "v\x9f"):
            r = client.post("/index/items", json={"ids": [bad], "vectors": vectors[:1], "recipe": recipe})
            assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_id"), r.text
            assert repr(bad) in r.json()["error"]["message"]
        photo = encode(make_photo(64, 48), "PNG")
        r = client.post("/index/items", files=[("files", ("p.png", photo))], data={"ids": json.dumps(["p\n"])})
        assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_id"), r.text
        assert client.get("/index").json()["size"] == 3


def test_http_get_and_delete_name_exactly_the_url_id(tmp_path: Path) -> None:
    settings = Settings(golden_check=False, max_wait_ms=1, index_path=str(tmp_path / "index"))
    with serve(settings, FakeBackend()) as server, server.client() as client:
        info = client.get("/index").json()
        recipe, dim = info["recipe"]["fingerprint"], info["dim"]
        vectors = np.eye(3, dim, dtype=np.float32).tolist()
        ok = client.post("/index/items", json={"ids": ["victim", "a/b", "x"], "vectors": vectors, "recipe": recipe})
        assert ok.status_code == 200, ok.text
        # Reads and deletes name exactly the id in the URL: a trailing newline is another id (absent: 404).
        for path in ("/index/items/victim%0A", "/index/items/victim%0D%0A", "/index/items/a/b%0A"):
            assert client.get(path).status_code == 404, path
            r = client.delete(path)
            assert (r.status_code, r.json()["error"]["code"]) == (404, "item_not_found"), path
        assert client.delete("/index/items/vic%0Atim").status_code == 404
        assert client.get("/index/items/victim").json()["id"] == "victim"
        assert client.get("/index/items/a/b").json()["id"] == "a/b"
        assert client.get("/index").json()["size"] == 3, "no other item was touched"
        r = client.delete("/index/items/victim")
        assert r.status_code == 200 and r.json() == {"deleted": "victim", "size": 2}
