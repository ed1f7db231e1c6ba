"""The CPU default: precision auto serves bf16 autocast where the CPU runs bf16 natively, passes the boot
self-check against fp32 references, and stays within cosine 0.999 of aimcore's fp32 embeddings."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from PIL import Image

import aimcore
from service.backends.torch_backend import cpu_has_fast_bf16, resolve_precision
from service.settings import Settings

from .conftest import ASSETS, serve


def test_auto_resolution() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_fast_bf16() else "fp32")
    assert Settings().precision == "fp32"  # this test module's fixture; the field's own default is auto
    assert Settings.model_fields["precision"].default == "auto"


def test_bf16_server_matches_fp32_within_cosine(live, debug_checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIM_PRECISION", "auto")
    live.append(serve(Settings(model=str(debug_checkpoint), max_batch_size=8)))
    server = live[0]
    names = sorted(ASSETS.glob("*.jpg"))[:4]
    body = {"images": [base64.b64encode(p.read_bytes()).decode() for p in names], "normalize": True}
    with server.client() as client:
        reply = client.post("/embed", json=body)
        info = client.get("/info").json()
    assert reply.status_code == 200, reply.text
    expected = "bf16" if cpu_has_fast_bf16() else "fp32"
    assert expected in str(info)
    model = aimcore.load_model(debug_checkpoint)
    x = torch.from_numpy(np.stack([aimcore.preprocess(Image.open(p), model.preprocess_config) for p in names]))
    with torch.no_grad():
        offline = model.embed(x).numpy()
    served = np.asarray([row for row in reply.json()["embeddings"]], dtype=np.float32)
    cosine = (served * offline).sum(1) / np.linalg.norm(served, axis=1) / np.linalg.norm(offline, axis=1)
    assert cosine.min() >= 0.999, cosine
