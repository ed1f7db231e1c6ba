"""Names and hashes, never server paths: /info, /readyz, /metrics, every /embed recipe, /classify, /index, /search, a
409 recipe mismatch and an inference failure are searched for the server's absolute paths (the repository root,
the home folder, the temporary folders the model, golden file and index live in). Real uvicorn on loopback."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from service.backends.fake_backend import FakeBackend
from service.index import EmbeddingRecipe
from service.redact import public_name, redact_paths
from service.settings import Settings
from tests.service.conftest import LiveServer, serve
from tests.service.index_support import b64

REPO = Path(__file__).resolve().parents[2]


def server_paths(*extra: Path) -> list[str]:
    """Absolute paths a leak would show: the repository, home, the temp folder and the test's own folders."""
    paths = {str(REPO), str(Path.home()), tempfile.gettempdir(), *(str(p) for p in extra)}
    return sorted(p for p in paths if len(p) > 1)


def assert_no_paths(where: str, text: str, paths: list[str]) -> None:
    found = [p for p in paths if p in text]
    assert not found, f"{where} shows server paths {found}: {text[:2000]}"


@pytest.fixture(scope="module")
def model_dir(debug_checkpoint: Path) -> Path:
    return debug_checkpoint.parent


@pytest.fixture(scope="module")
def server(debug_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = Settings(
        model=str(debug_checkpoint), max_wait_ms=2, index_path=str(tmp_path_factory.mktemp("leaks") / "index")
    )
    with serve(settings) as live:
        yield live


def test_public_answers_carry_names_not_paths(
    server: LiveServer, debug_checkpoint: Path, asset_bytes: dict[str, bytes]
) -> None:
    paths = server_paths(debug_checkpoint.parent, Path(server.engine.settings.index_path))
    image = asset_bytes["landscape_640x427.jpg"]
    with server.client() as client:
        info = client.get("/info")
        assert info.status_code == 200
        assert_no_paths("/info", info.text, paths)
        body = info.json()
        # What the paths said, as names and hashes: the file name and the weights' sha256.
        assert body["model"]["id"] == debug_checkpoint.name == body["settings"]["model"]
        assert len(body["model"]["weights_sha256"]) == 64
        assert body["settings"]["index_path"] == "index"
        assert_no_paths("/readyz", client.get("/readyz").text, paths)
        assert_no_paths("/metrics", client.get("/metrics").text, paths)
        for pooling in ("mean", "probe"):
            r = client.post("/embed", json={"images": [b64(image)], "pooling": pooling})
            assert r.status_code == 200, r.text
            assert_no_paths(f"/embed pooling={pooling}", r.text, paths)
            assert r.json()["recipe"]["model_id"] == debug_checkpoint.name
        r = client.post("/classify", json={"images": [b64(image)]})
        assert r.status_code == 200 and r.json()["model_id"] == debug_checkpoint.name
        assert_no_paths("/classify", r.text, paths)
        assert_no_paths("/index", client.get("/index").text, paths)
        r = client.post("/search", json={"images": [b64(image)], "k": 1})
        assert r.status_code == 200, r.text
        assert_no_paths("/search", r.text, paths)
        dim = client.get("/index").json()["dim"]
        mismatch = client.post(
            "/index/items", json={"ids": ["a"], "vectors": [[1.0] * dim], "recipe": "aimfp1-000000000000000000000000"}
        )
        assert (mismatch.status_code, mismatch.json()["error"]["code"]) == (409, "index_recipe_mismatch")
        assert debug_checkpoint.name in mismatch.json()["error"]["message"]  # it still names the model
        assert_no_paths("409 index_recipe_mismatch", mismatch.text, paths)


class _ExplodingBackend(FakeBackend):
    """Raises the way a real runtime does: its message names files on the server."""

    def __init__(self, secret: Path) -> None:
        super().__init__(delay_s=0.0, poison=lambda p: float(p.mean()) > 2.0)
        self.secret = secret

    def infer(self, pixels: np.ndarray, outputs):  # type: ignore[no-untyped-def]
        if any(float(p.mean()) > 2.0 for p in pixels):
            raise RuntimeError(f"kernel failed: could not map {self.secret / 'libkernels.so'} ({self.secret})")
        return super().infer(pixels, outputs)


def test_inference_failure_names_the_image_not_the_exception(
    live: list, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.service.test_load import PHOTO, WHITE  # a normal photo, and a white PNG the poison fires on

    server = serve(Settings(max_wait_ms=20, max_batch_size=8, golden_check=False), backend=_ExplodingBackend(tmp_path))
    live.append(server)
    with server.client() as client:
        r = client.post("/embed", files=[("files", ("a.png", PHOTO)), ("files", ("b.png", WHITE))])
    assert (r.status_code, r.json()["error"]["code"]) == (500, "inference_failed")
    message = r.json()["error"]["message"]
    assert message.startswith("images[1]: "), message
    assert "kernel failed" not in message and "RuntimeError" not in message
    assert_no_paths("inference_failed", r.text, server_paths(tmp_path))
    # The operator still gets the backend's own words, in the log.
    assert any(rec.exc_info and "libkernels.so" in str(rec.exc_info[1]) for rec in caplog.records)


def test_recipe_model_id_is_a_name_and_the_fingerprint_does_not_change() -> None:
    """An index built before this rule stored its build machine's path: read back, it shows the name, and its
    fingerprint (what adds and searches are checked against) is the same as one built with the name."""
    stored = EmbeddingRecipe(
        model_sha256="ab" * 32, pooling="mean", dim=8, model_id="/home/builder/m/trunk.safetensors"
    )
    named = EmbeddingRecipe(model_sha256="ab" * 32, pooling="mean", dim=8, model_id="trunk.safetensors")
    assert stored.model_id == "trunk.safetensors" and stored.fingerprint == named.fingerprint
    assert EmbeddingRecipe.from_dict(stored.to_dict()) == named


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ("/srv/models/run-7/trunk.safetensors", "trunk.safetensors"),
        ("/srv/export/onnx-int8/", "onnx-int8"),
        ("apple/aim-600M", "apple/aim-600M"),  # a Hugging Face id is a name
        ("aim-demo", "aim-demo"),
        ("~/models/x.safetensors", "x.safetensors"),
    ],
)
def test_public_name(given: str, shown: str) -> None:
    assert public_name(given) == shown


def test_redact_paths_in_free_text_keeps_urls_and_routes() -> None:
    text = "stored: /home/al/m/golden.npz; FileNotFoundError: '/tmp/x/y.onnx'; see http://host/a/b and /embed"
    assert redact_paths(text) == "stored: golden.npz; FileNotFoundError: 'y.onnx'; see http://host/a/b and /embed"
    assert redact_paths({"a": ["/opt/a/b.bin", 3]}) == {"a": ["b.bin", 3]}


def test_the_bundled_demo_shows_no_repository_path(live: list) -> None:
    """The default model lives in the repository (aimcore/assets/aim-demo) with its stored golden file."""
    server = serve(Settings(backend="torch", autoselect=False, precision="fp32", max_batch_size=4), backend=None)
    live.append(server)
    with server.client() as client:
        info = client.get("/info")
    if info.json()["model"]["flavor"] != "aim-demo":
        pytest.skip("the bundled aim-demo weights are not in this checkout")
    assert_no_paths("/info (aim-demo)", info.text, server_paths())
