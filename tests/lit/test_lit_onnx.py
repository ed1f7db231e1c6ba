"""`python -m export onnx` on a LiT checkpoint: two graphs (image, text), parity in the manifest; the service then
runs both towers on ONNX Runtime, with the same recipes as torch, and text search still finds the captioned image."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.settings import Settings
from tests.lit.conftest import caption, fashion_pairs
from tests.service.conftest import serve

pytest.importorskip("onnxruntime")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lit_onnx(lit_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lit-onnx") / "export"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "export",
        "onnx",
        "--checkpoint",
        str(lit_folder),
        "--out",
        str(out),
        "--max-batch",
        "4",
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["kind"] == "lit-onnx"
    return out


def test_manifest_records_parity_for_both_towers(lit_onnx: Path) -> None:
    m = json.loads((lit_onnx / "lit_manifest.json").read_text())
    assert {p.name for p in lit_onnx.iterdir()} >= {"image.onnx", "text.onnx", "reference.npz", "tokenizer.json"}
    for tower in ("image", "text"):
        for figures in (m["parity"][tower]["batch_4"], m["parity"][tower]["batch_1"]):
            assert figures["max_rel"] <= 1e-4 and figures["min_cosine"] >= 0.99999
    assert m["text"]["input"] == "input_ids" and m["text"]["context_length"] == 16


def test_service_runs_both_towers_on_onnxruntime(lit_onnx: Path, lit_folder: Path, tmp_path: Path) -> None:
    pairs = fashion_pairs()
    onnx_live = serve(Settings(model=str(lit_onnx), index_path=str(tmp_path / "index")))
    torch_live = serve(Settings(model=str(lit_folder)))
    try:
        with onnx_live.client() as c, torch_live.client() as t:
            info = c.get("/info").json()
            assert info["backend"]["name"] == "onnxruntime" and info["text"]["enabled"]
            assert info["text"]["self_check"]["reference"].startswith("stored torch fp32")
            torch_info = t.get("/info").json()
            # One recipe per tower whichever runtime computes it: the export carries its source's digest.
            assert info["recipes"]["mean"]["fingerprint"] == torch_info["recipes"]["mean"]["fingerprint"]
            assert info["text"]["recipe"]["fingerprint"] == torch_info["text"]["recipe"]["fingerprint"]
            texts = [caption(cls) for cls, _ in pairs]
            a = np.asarray(c.post("/embed", json={"texts": texts}).json()["embeddings"])
            b = np.asarray(t.post("/embed", json={"texts": texts}).json()["embeddings"])
            assert np.sum(a * b, axis=1).min() > 0.99999
            body = {
                "ids": [cls for cls, _ in pairs],
                "images": [base64.b64encode(p.read_bytes()).decode() for _, p in pairs],
            }
            assert c.post("/index/items", json=body).status_code == 200
            r = c.post("/search", json={"texts": texts, "k": 1}).json()
            assert [res["ids"][0] for res in r["results"]] == [cls for cls, _ in pairs]
    finally:
        onnx_live.stop()
        torch_live.stop()
