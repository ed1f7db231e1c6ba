"""AIMv2 through the real service (uvicorn on loopback, torch backend): a folder in Apple's layout with its
`preprocessor_config.json`, a native-resolution encoder with aspect-ratio buckets, and /classify with a head trained
here by the attentive probe on the frozen v2 trunk."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import aimcore
from aimcore import AimModel, build_model, get_flavor, preprocess
from aimcore.preprocess import aspect_buckets
from service.settings import Settings
from tests.conftest import encode, make_photo
from tests.service.conftest import serve

CLIP_PREPROCESSOR = {
    "crop_size": {"height": 28, "width": 28},
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": {"shortest_edge": 28},
}


def apple_folder(root: Path, model: AimModel, preprocessor: dict | None = None) -> Path:
    """Apple's layout: our (= Apple's) keys and the remote-code config.json."""
    root.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "model.safetensors"))
    c = model.config
    (root / "config.json").write_text(
        json.dumps(
            {
                "model_type": "aimv2",
                "hidden_size": c.embed_dim,
                "intermediate_size": c.mlp_hidden_dim,
                "num_hidden_layers": c.depth,
                "num_attention_heads": c.num_heads,
                "image_size": c.img_size,
                "patch_size": c.patch_size,
                "rms_norm_eps": c.norm_eps,
            }
        )
    )
    if preprocessor is not None:
        (root / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return root


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def offline_embed(model: AimModel, blobs: list[bytes], pooling: str = "mean") -> np.ndarray:
    rows = []
    with torch.no_grad():
        for blob in blobs:  # one at a time: native images may differ in shape
            x = torch.from_numpy(preprocess(Image.open(io.BytesIO(blob)), model.preprocess_config)[None])
            rows.append(model.embed(x, pooling=pooling)[0].numpy())
    return np.stack(rows)


def test_fixed_v2_folder_serves_embed_with_its_preprocessing_in_the_recipe(tmp_path: Path, live: list) -> None:
    torch.manual_seed(0)
    folder = apple_folder(tmp_path / "v2", build_model(get_flavor("aimv2-debug")).eval(), CLIP_PREPROCESSOR)
    offline = aimcore.load_model(folder)
    index = tmp_path / "index"
    live.append(serve(Settings(model=str(folder), max_batch_size=8, max_wait_ms=2, index_path=str(index))))
    blobs = [encode(make_photo(90 + 7 * i, 60 + 11 * i, seed=i), "PNG") for i in range(5)]
    ids = [f"img{i}" for i in range(5)]
    with live[0].client() as client:
        body = client.post("/embed", json={"images": [b64(b) for b in blobs]}).json()
        info = client.get("/info").json()
        added = client.post(
            "/index/items",
            files=[("files", (f"{i}.png", b)) for i, b in zip(ids, blobs, strict=True)],
            data={"ids": json.dumps(ids)},
        )
        assert added.status_code == 200, added.text
        found = client.post("/search", json={"images": [b64(blobs[3])], "k": 2}).json()["results"][0]
        index_recipe = client.get("/index").json()["recipe"]
    assert found["ids"][0] == "img3"
    assert index_recipe["fingerprint"] == body["recipe"]["fingerprint"]
    assert index_recipe["preprocess"]["origin"] == "preprocessor_config.json"
    got = np.asarray(body["embeddings"], dtype=np.float32)
    np.testing.assert_allclose(got, offline_embed(offline, blobs), rtol=0, atol=1e-5)
    assert body["recipe"]["pooling"] == "mean"  # the v2 default, as for v1
    assert body["recipe"]["preprocess"]["origin"] == "preprocessor_config.json"
    assert body["recipe"]["preprocess"]["mean"] == pytest.approx(CLIP_PREPROCESSOR["image_mean"])
    assert info["model"]["config"]["family"] == "aimv2" and info["model"]["flavor"] == "aimv2-debug"
    assert info["model"]["preprocess"]["resize_size"] == 28  # crop_pct 1.0
    assert info["self_check"]["status"] == "passed"


def test_native_v2_keeps_the_aspect_ratio_in_a_few_grids_and_batches_mixed_shapes(tmp_path: Path, live: list) -> None:
    torch.manual_seed(1)
    model = build_model(get_flavor("aimv2-debug").replace(name="native-debug", native=True)).eval()
    folder = apple_folder(tmp_path / "native", model)  # no pos_embed key: loads as native
    live.append(serve(Settings(model=str(folder), max_batch_size=8, max_wait_ms=50, max_patches=24)))
    sizes = [(120, 120), (200, 100), (100, 200), (160, 120), (300, 90)]
    blobs = [encode(make_photo(w, h, seed=i), "PNG") for i, (w, h) in enumerate(sizes)]
    with live[0].client() as client:
        body = client.post("/embed", json={"images": [b64(b) for b in blobs]}).json()
        info = client.get("/info").json()
    served = info["model"]["preprocess"]
    assert served["mode"] == "native" and served["max_patches"] == 24
    buckets = [tuple(g) for g in served["grid_buckets"]]
    assert buckets == list(aspect_buckets(24))
    assert body["recipe"]["preprocess"]["grid_buckets"] == served["grid_buckets"]
    # Offline with the served recipe, image by image: the batched, mixed-shape answer is the same.
    offline = aimcore.load_model(folder, preprocess=aimcore.PreprocessConfig.from_dict(served))
    np.testing.assert_allclose(np.asarray(body["embeddings"]), offline_embed(offline, blobs), rtol=0, atol=1e-5)
    shapes = {offline.preprocess(Image.open(io.BytesIO(b))).shape[-2:] for b in blobs}
    assert len(shapes) >= 3  # several grids really were served in one batch
    for h, w in shapes:
        assert (w // 14, h // 14) in buckets


def test_probe_head_on_a_frozen_v2_trunk_classifies_through_the_service(tmp_path: Path, live: list) -> None:
    from tests.probe.conftest import CLASSES, make_toy_folder, save_random_trunk, toy_image
    from training.probe_lib.data import load_probe_data
    from training.probe_lib.features import load_trunk
    from training.probe_lib.runner import run_probe
    from training.probe_lib.train import ProbeConfig

    trunk_file = save_random_trunk(tmp_path / "trunk.safetensors", flavor="aimv2-debug")
    data = load_probe_data(make_toy_folder(tmp_path / "toy", per_class=32), val_fraction=0.25)
    out = tmp_path / "probe"
    metrics = run_probe(
        load_trunk(trunk_file),
        data,
        ProbeConfig(epochs=20, batch_size=16, lr=3e-3),
        out_dir=out,
        trunk_source=str(trunk_file),
    )
    assert metrics["top1"] >= 0.8, metrics  # chance 0.5
    model = aimcore.load_model(trunk_file, head=out / "head.safetensors")
    assert model.head is not None and model.head.bn is None and model.head.linear.bias is not None
    assert not any(k.startswith("head.bn") for k in model.state_dict())
    live.append(serve(Settings(model=str(trunk_file), head=str(out / "head.safetensors"), max_batch_size=8)))
    rng = np.random.default_rng(7)
    images = [toy_image(kind, rng) for kind in CLASSES for _ in range(3)]
    blobs = [encode(img, "PNG") for img in images]
    with torch.no_grad():
        x = torch.cat([model.preprocess(Image.open(io.BytesIO(b))) for b in blobs])
        probs = model(x).softmax(-1).numpy()
    with live[0].client() as client:
        r = client.post("/classify", json={"images": [b64(b) for b in blobs], "top_k": 2})
    assert r.status_code == 200, r.text
    for row, pred in zip(probs, r.json()["predictions"], strict=True):
        assert pred["labels"][0] == CLASSES[int(row.argmax())]
        np.testing.assert_allclose(pred["probs"], np.sort(row)[::-1][:2], rtol=1e-4)
