"""The LiT model through the live service (real uvicorn on loopback, real FAISS, real PNG bytes): text embeddings,
text search returning the captioned image, zero-shot classify equal to a direct computation, limits, recipes."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aimcore import preprocess
from aimcore.lit_sources import load_lit_model
from aimcore.tokenizer import TextTokenizer
from service.backends.lit_backend import lit_preprocess_config
from service.settings import Settings
from service.text import DEFAULT_TEMPLATES
from tests.lit.conftest import caption, fashion_pairs
from tests.service.conftest import LiveServer, serve


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def thumbnail(path: Path, size: int = 32) -> str:
    """A small JPEG data: URI, as the search page shows it (stored in the item's metadata)."""
    img = Image.open(path).convert("RGB")
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + b64(buf.getvalue())


@pytest.fixture(scope="module")
def server(lit_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    index = tmp_path_factory.mktemp("lit-index") / "index"
    s = Settings(
        model=str(lit_folder), index_path=str(index), max_batch_size=8, max_texts_per_request=16, max_text_chars=200
    )
    live = serve(s)
    assert live.engine.status == "ready", live.engine.reason
    pairs = fashion_pairs()
    with live.client() as c:
        r = c.post(
            "/index/items",
            json={
                "ids": [cls for cls, _ in pairs],
                "images": [b64(p.read_bytes()) for _, p in pairs],
                "metadata": [{"caption": caption(cls), "thumbnail": thumbnail(p)} for cls, p in pairs],
            },
        )
        assert r.status_code == 200, r.text
    yield live
    live.stop()


@pytest.fixture(scope="module")
def direct(lit_folder: Path):
    model = load_lit_model(lit_folder)
    return model, TextTokenizer.from_dir(lit_folder, context_length=model.config.text.context_length)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_info_describes_both_towers(server: LiveServer) -> None:
    with server.client() as c:
        info = c.get("/info").json()
    text = info["text"]
    assert text["enabled"] and text["self_check"]["ok"] and text["self_check"]["min_cosine"] > 0.9999
    assert info["recipes"]["mean"]["pooling"] == "lit_image" and text["recipe"]["pooling"] == "lit_text"
    assert info["recipes"]["mean"]["fingerprint"] != text["recipe"]["fingerprint"]
    assert info["model"]["has_head"] is False


def test_text_search_returns_the_captioned_image(server: LiveServer) -> None:
    pairs = fashion_pairs()
    with server.client() as c:
        r = c.post("/search", json={"text": caption("bag"), "k": 3})
        assert r.status_code == 200, r.text
        best = r.json()["results"][0]
        assert best["ids"][0] == "bag" and best["metadata"][0]["caption"] == caption("bag")
        r = c.post("/search", json={"texts": [caption(cls) for cls, _ in pairs], "k": 1})
        assert [res["ids"][0] for res in r.json()["results"]] == [cls for cls, _ in pairs]


def test_text_embeddings_match_the_model(server: LiveServer, direct) -> None:
    model, tok = direct
    texts = ["a photo of a coat", "A PHOTO OF A COAT", "sneaker"]
    with server.client() as c:
        r = c.post("/embed", json={"texts": texts})
        assert r.status_code == 200, r.text
        body = r.json()
    with torch.no_grad():
        ref = _unit(model.encode_text(torch.from_numpy(tok(texts))).numpy())
    got = np.asarray(body["embeddings"])
    assert got.shape == (3, model.config.projection_dim)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_array_equal(got[0], got[1])  # lower-cased before tokenising
    assert body["recipe"]["pooling"] == "lit_text" and body["recipe"]["attention"] == "causal"


def test_images_and_texts_in_one_request(server: LiveServer) -> None:
    _, path = fashion_pairs()[1]
    with server.client() as c:
        body = c.post("/embed", json={"texts": ["a photo of a bag"], "images": [b64(path.read_bytes())]}).json()
    assert len(body["embeddings"]) == 1 and len(body["text_embeddings"]) == 1
    assert body["recipe"]["pooling"] == "lit_image" and body["text_recipe"]["pooling"] == "lit_text"


def test_index_refuses_text_vectors_as_items(server: LiveServer) -> None:
    with server.client() as c:
        emb = c.post("/embed", json={"texts": ["a photo of a bag"]}).json()
        r = c.post(
            "/index/items",
            json={"ids": ["t"], "vectors": emb["embeddings"], "recipe": emb["recipe"]["fingerprint"]},
        )
    assert r.status_code == 409 and r.json()["error"]["code"] == "index_recipe_mismatch"


def test_zero_shot_probabilities_equal_a_direct_computation(server: LiveServer, direct) -> None:
    model, tok = direct
    pairs = fashion_pairs()
    labels = [cls.replace("_", " ") for cls, _ in pairs]
    images = [p for _, p in pairs[:4]]
    with server.client() as c:
        r = c.post(
            "/classify", json={"images": [b64(p.read_bytes()) for p in images], "labels": labels, "top_k": len(labels)}
        )
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        again = c.post("/classify", json={"images": [b64(images[0].read_bytes())], "labels": labels}).json()
    # Direct: every template per label, unit, mean, unit; unit image vectors; softmax(scale * cosine).
    with torch.no_grad():
        prompts = [t.format(lab) for lab in labels for t in DEFAULT_TEMPLATES]
        txt = model.encode_text(torch.from_numpy(tok(prompts))).double()
        txt = torch.nn.functional.normalize(txt, dim=-1).reshape(len(labels), len(DEFAULT_TEMPLATES), -1).mean(1)
        txt = torch.nn.functional.normalize(txt, dim=-1)
        prep = lit_preprocess_config(model)
        pix = torch.from_numpy(np.stack([preprocess(Image.open(p), prep) for p in images]))
        img = torch.nn.functional.normalize(model.encode_image(pix).double(), dim=-1)
        probs = torch.softmax(float(model.logit_scale) * img @ txt.t(), dim=-1).numpy()
    for row, pred in zip(probs, preds, strict=True):
        served = np.zeros(len(labels))
        served[pred["indices"]] = pred["probs"]
        np.testing.assert_allclose(served, row, atol=1e-5)
    assert again["predictions"][0]["probs"][0] == pytest.approx(preds[0]["probs"][0], abs=1e-6)  # cached labels
    assert server.app.state.text.describe()["cached_label_sets"] == 1
    # With the captions' own template the fine-tuned model names each image's class.
    with server.client() as c:
        body = {"images": [b64(p.read_bytes()) for p in images], "labels": labels, "templates": ["a photo of a {}"]}
        preds = c.post("/classify", json=body).json()["predictions"]
    assert [p["labels"][0] for p in preds] == labels[:4]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"texts": ["a"] * 17}, "too_many_texts"),
        ({"texts": ["x" * 201]}, "text_too_long"),
        ({"texts": ["ok", ""]}, "empty_text"),
        ({"texts": ["   "]}, "empty_text"),
        ({"texts": [3]}, "invalid_request"),
    ],
)
def test_text_limits_answer_422(server: LiveServer, body: dict, code: str) -> None:
    with server.client() as c:
        r = c.post("/embed", json=body)
    assert r.status_code == 422 and r.json()["error"]["code"] == code, r.text


def test_bad_zero_shot_requests(server: LiveServer) -> None:
    _, path = fashion_pairs()[0]
    img = b64(path.read_bytes())
    with server.client() as c:
        r = c.post("/classify", json={"images": [img], "labels": ["cat"], "templates": ["no placeholder"]})
        assert r.status_code == 422 and r.json()["error"]["code"] == "bad_template"
        r = c.post("/classify", json={"images": [img], "labels": []})
        assert r.status_code == 422
        r = c.post("/search", json={"text": "a", "texts": ["b"]})
        assert r.status_code == 422


def test_model_without_text_tower_answers_409(debug_checkpoint: Path) -> None:
    """An image-only model: text inputs are refused with a stable code; image requests are unaffected."""
    live = serve(Settings(model=str(debug_checkpoint)))
    try:
        with live.client() as c:
            r = c.post("/embed", json={"texts": ["a cat"]})
            assert r.status_code == 409 and r.json()["error"]["code"] == "no_text_tower"
            _, path = fashion_pairs()[0]
            r = c.post("/classify", json={"images": [b64(path.read_bytes())], "labels": ["cat", "dog"]})
            assert r.status_code == 409 and r.json()["error"]["code"] == "no_text_tower"
            assert c.get("/info").json()["text"]["enabled"] is False
    finally:
        live.stop()


def test_offline_built_index_answers_text_queries(lit_folder: Path, tmp_path: Path) -> None:
    """`python -m service.index build` with the LiT checkpoint stores its image vectors (recipe lit_image); the
    service opens that index and a caption finds its image among all 30 test images."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "index"
    cmd = [sys.executable, "-m", "service.index", "build", "--images", "tests/assets/fashion_mnist", "--out", str(out)]
    cmd += ["--checkpoint", str(lit_folder), "--type", "flat", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    live = serve(Settings(model=str(lit_folder), index_path=str(out)))
    try:
        with live.client() as c:
            best = c.post("/search", json={"text": caption("bag"), "k": 3}).json()["results"][0]
            assert c.get("/index").json()["recipe"]["pooling"] == "lit_image"
    finally:
        live.stop()
    assert best["ids"][0] == "bag__test_00018.png"  # the constructed pair (tests/lit/conftest.py)


def test_openai_sdk_embeds_texts_with_the_text_tower(server: LiveServer) -> None:
    """The real `openai` SDK (`input="..."`, base64 encoding by default) gets the LiT text vectors /embed gives,
    and a mixed request keeps each input's place and tower."""
    import openai

    _, path = fashion_pairs()[1]
    texts = ["a photo of a bag", "sneaker"]
    with server.client() as c:
        name = c.get("/v1/models").json()["data"][0]["id"]
        ref = np.asarray(c.post("/embed", json={"texts": texts}).json()["embeddings"])
        image_ref = np.asarray(c.post("/embed", json={"images": [b64(path.read_bytes())]}).json()["embeddings"][0])
        mixed = c.post(
            "/v1/embeddings", json={"model": name, "input": [texts[0], {"image": b64(path.read_bytes())}, texts[1]]}
        )
        assert mixed.status_code == 200, mixed.text
        text_only = c.post("/v1/embeddings", json={"model": name, "input": texts, "modality": "text"})
        assert text_only.status_code == 200, text_only.text
        tokens = c.post("/v1/embeddings", json={"model": name, "input": [[1, 2, 3]]})
        assert tokens.status_code == 400 and "send texts as strings" in tokens.json()["error"]["message"]
    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    got = sdk.embeddings.create(model=name, input=texts)
    vectors = np.asarray([d.embedding for d in got.data])
    np.testing.assert_allclose(vectors, ref, rtol=0, atol=1e-6)
    assert got.usage.prompt_tokens > 0
    data = mixed.json()["data"]
    assert [d["index"] for d in data] == [0, 1, 2]
    np.testing.assert_allclose(np.asarray(data[0]["embedding"]), ref[0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(data[1]["embedding"]), image_ref, atol=1e-6)
    np.testing.assert_allclose(np.asarray(data[2]["embedding"]), ref[1], atol=1e-6)
    np.testing.assert_allclose(np.asarray([d["embedding"] for d in text_only.json()["data"]]), ref, atol=1e-6)
