"""The boot self-check: golden outputs stored beside a checkpoint, stale references refused, and a backend whose
batched outputs drift from its reference fails before it ever reports ready."""

from __future__ import annotations

import shutil
from collections.abc import Collection
from pathlib import Path

import numpy as np
import torch

import aimcore
from service.__main__ import main as cli
from service.backends.torch_backend import TorchBackend
from service.golden import golden_images, load_golden, make_golden, run_golden_check
from service.main import create_app
from service.settings import Settings
from tests.service.conftest import LiveServer


def test_golden_cli_writes_beside_the_checkpoint_and_boot_uses_it(
    debug_checkpoint: Path, tmp_path: Path, live: list
) -> None:
    ckpt = tmp_path / "model.safetensors"
    shutil.copy(debug_checkpoint, ckpt)
    assert cli(["golden", str(ckpt)]) == 0
    golden = load_golden(tmp_path / "model.golden.npz")
    assert golden.meta["weights_sha256"] == aimcore.sha256_file(ckpt)
    assert set(golden.outputs) == {"embedding", "pooled", "logits"} and len(golden.images) == len(golden_images())
    server = LiveServer(create_app(Settings(model=str(ckpt), max_batch_size=8))).start()
    live.append(server)
    with server.client() as client:
        check = client.get("/info").json()["self_check"]
    # /info names the file, not its server path (service.redact)
    assert check["status"] == "passed" and check["reference"] == "stored: model.golden.npz"
    assert check["batch_size"] == 8 and check["top1_agreement"] == 1.0


def test_stale_golden_file_fails_readiness(debug_checkpoint: Path, tmp_path: Path, live: list) -> None:
    ckpt = tmp_path / "model.safetensors"
    shutil.copy(debug_checkpoint, ckpt)
    assert cli(["golden", str(ckpt)]) == 0
    # Replace the weights but not their golden file: the server must refuse to call itself ready.
    model = aimcore.load_model(ckpt)
    with torch.no_grad():
        model.trunk.post_trunk_norm.weight.mul_(1.5)
    aimcore.save_checkpoint(model, ckpt)
    server = LiveServer(create_app(Settings(model=str(ckpt), max_batch_size=4))).start()
    live.append(server)
    with server.client() as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "failed"
        assert "regenerate" in ready.json()["reason"]
        r = client.post("/embed", files=[("files", ("a.png", b"x"))])
        assert r.status_code == 503 and r.json()["error"]["code"] == "startup_failed"
        assert "aim_golden_check_ok 0.0" in client.get("/metrics").text


class DriftingBackend(TorchBackend):
    """Right at batch 1, wrong in larger batches: what the max-batch self-check exists to catch."""

    def infer(self, pixels: np.ndarray, outputs: Collection[str]) -> dict[str, np.ndarray]:
        out = super().infer(pixels, outputs)
        if len(pixels) > 1:
            out = {k: v + np.random.default_rng(0).normal(0, 1, v.shape).astype(np.float32) for k, v in out.items()}
        return out


def test_batch_drift_fails_the_check(debug_model: aimcore.AimModel) -> None:
    prep = aimcore.PreprocessConfig.for_size(32)
    golden = make_golden(debug_model, weights_sha256="x", preprocess_config=prep)
    good = run_golden_check(
        TorchBackend(debug_model, model_id="m", sha256="x"), golden, reference="t", max_batch=8, min_cosine=0.999
    )
    assert good.status == "passed" and min(good.min_cosine.values()) > 0.99999
    bad = run_golden_check(
        DriftingBackend(debug_model, model_id="m", sha256="x"), golden, reference="t", max_batch=8, min_cosine=0.999
    )
    assert bad.status == "failed" and "embedding: min cosine" in bad.message
