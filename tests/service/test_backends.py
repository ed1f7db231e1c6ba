"""Backends behind one protocol: ONNX Runtime parity with torch (on a real export of the aim-debug checkpoint),
`auto` selection, served ONNX answers equal to torch offline, and a clear error for TensorRT without a GPU."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import aimcore
from service.backends import create_backend, find_artifacts
from service.backends.base import InferenceBackend
from service.backends.torch_backend import TorchBackend, model_sha256
from service.backends.trt_backend import tensorrt_available
from service.settings import Settings
from tests.conftest import encode, make_photo
from tests.service.conftest import LiveServer, serve

export_onnx = pytest.importorskip("export.onnx", reason="export/ not available").export_onnx


@pytest.fixture(scope="module")
def onnx_dir(debug_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "aim-debug-onnx"
    export_onnx(str(debug_checkpoint), out, max_batch=8)
    return out


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 3, 32, 32)).astype(np.float32)


def test_onnxruntime_matches_torch(debug_checkpoint: Path, onnx_dir: Path) -> None:
    torch_backend = TorchBackend(aimcore.load_model(debug_checkpoint), model_id="ckpt")
    loaded = create_backend(Settings(model=str(onnx_dir), device="cpu"))
    ort_backend: InferenceBackend = loaded.backend
    assert ort_backend.info.name == "onnxruntime" and "CPUExecutionProvider" in ort_backend.info.extra["providers"]
    assert "ONNX artefact" in loaded.reason
    # The same weights give the same recipe identity, whichever backend serves them.
    assert ort_backend.info.extra["weights_sha256"] == torch_backend.info.model_sha256
    x = pixels(5)
    outputs = ("embedding", "pooled", "logits")
    a, b = torch_backend.infer(x, outputs), ort_backend.infer(x, outputs)
    for name in outputs:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-5, err_msg=name)
    ort_backend.close()


def test_auto_on_a_checkpoint_is_torch_and_says_why(debug_checkpoint: Path) -> None:
    loaded = create_backend(Settings(model=str(debug_checkpoint)))
    assert loaded.backend.info.name == "torch" and "checkpoint" in loaded.reason
    assert loaded.backend.info.model_sha256 == aimcore.sha256_file(debug_checkpoint)
    with pytest.raises(ValueError, match="export it first"):
        create_backend(Settings(model=str(debug_checkpoint), backend="onnxruntime"))


def test_random_weights_digest_matches_the_exporters_convention() -> None:
    torch.manual_seed(0)
    model = aimcore.build_model(aimcore.get_flavor("aim-debug"))
    provenance = pytest.importorskip("export.provenance")
    assert model_sha256(model) == provenance.state_dict_sha256(model)


@pytest.mark.skipif(tensorrt_available()[0], reason="TensorRT is usable here")
def test_tensorrt_without_gpu_is_a_clear_error(tmp_path: Path) -> None:
    from service.backends.trt_backend import TensorRTBackend

    with pytest.raises(RuntimeError, match="tensorrt backend cannot run here"):
        TensorRTBackend(tmp_path)


@pytest.fixture(scope="module")
def onnx_server(onnx_dir: Path) -> Iterator[LiveServer]:
    with serve(Settings(model=str(onnx_dir), max_batch_size=8, max_wait_ms=2)) as live:
        yield live


def test_served_onnx_equals_torch_offline(
    onnx_server: LiveServer, debug_checkpoint: Path, asset_bytes: dict[str, bytes]
) -> None:
    from tests.service.test_api import offline_pixels

    model = aimcore.load_model(debug_checkpoint)
    blobs = list(asset_bytes.values())[:6]
    with torch.no_grad():
        expected = model.embed(offline_pixels(model, blobs)).numpy()
    with onnx_server.client() as client:
        info = client.get("/info").json()
        body = client.post("/embed", json={"images": [base64.b64encode(b).decode() for b in blobs]}).json()
        torch_recipe_sha = aimcore.sha256_file(debug_checkpoint)
    assert info["backend"]["name"] == "onnxruntime"
    assert info["self_check"]["status"] == "passed" and info["self_check"]["reference"].startswith("stored:")
    assert body["recipe"]["backend"] == "onnxruntime" and body["recipe"]["model_sha256"] == torch_recipe_sha
    np.testing.assert_allclose(np.array(body["embeddings"]), expected, rtol=1e-4, atol=1e-5)


def test_model_info_metric_names_the_weights_hash_like_embed(onnx_server: LiveServer, onnx_dir: Path) -> None:
    """aim_model_info's model_sha256 is the recipe's (weights) hash; the exported file's digest is artifact_sha256."""
    with onnx_server.client() as client:
        recipe = client.post(
            "/embed", json={"images": [base64.b64encode(encode(make_photo(64, 64), "PNG")).decode()]}
        ).json()["recipe"]
        text = client.get("/metrics").text
        info = client.get("/info").json()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    labels = families["aim_model_info"].samples[0].labels
    assert labels["model_sha256"] == recipe["model_sha256"] == info["model"]["weights_sha256"]
    assert labels["artifact_sha256"] == info["model"]["sha256"] == aimcore.sha256_file(onnx_dir / "model.onnx")
    assert labels["artifact_sha256"] != labels["model_sha256"]


def test_find_artifacts(onnx_dir: Path, debug_checkpoint: Path) -> None:
    assert [d for d, _ in find_artifacts(str(onnx_dir))] == [onnx_dir]
    assert [d for d, _ in find_artifacts(str(onnx_dir.parent))] == [onnx_dir]
    assert find_artifacts(str(debug_checkpoint)) == []


def test_no_configuration_serves_the_bundled_demo_or_loud_random_debug(caplog: pytest.LogCaptureFixture) -> None:
    loaded = create_backend(Settings())
    info = loaded.backend.info
    if info.config.name == "aim-demo":  # aimcore/assets/aim-demo/ is shipped
        assert not loaded.warnings
        # The default is measured at start (service.backends.autoselect): the fastest batch-invariant candidate.
        assert loaded.selection is not None
        chosen = next(c for c in loaded.selection["candidates"] if c["name"] == loaded.selection["chosen"])
        assert chosen["eligible"] and chosen["invariance"] <= 1e-6 and chosen["min_cosine"] >= 0.999
        eligible = [c["images_per_s"] for c in loaded.selection["candidates"] if c["eligible"]]
        assert chosen["images_per_s"] == max(eligible)  # all 0 (untimed) when only one passes
        # Pinned: the bundled int8 export, within cosine 0.999 of fp32.
        pinned = create_backend(Settings(backend="onnxruntime"))
        int8 = pinned.backend.info
        assert (int8.name, int8.precision) == ("onnxruntime", "int8") and pinned.selection is None
        assert pinned.manifest is not None and pinned.manifest.parity["real_images"]["embedding_min_cosine"] >= 0.999
        torch_backend = create_backend(Settings(backend="torch")).backend
        # Same weights, same embedding recipe: the export records the checkpoint digest torch computes.
        assert torch_backend.info.model_sha256 == int8.extra["weights_sha256"]
        return
    assert info.config.name == "aim-debug" and info.extra["random_weights"]
    assert "RANDOM WEIGHTS" in caplog.text and loaded.warnings and "random weights" in loaded.reason
    # Seeded: the same vectors after every restart.
    again = create_backend(Settings()).backend.info
    assert again.model_sha256 == info.model_sha256
