"""`python -m aimcore info|embed` as a user runs them: real subprocesses, real image files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aimcore import load_model, preprocess

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "tests" / "assets" / "images"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aimcore", *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_info_on_a_flavor_without_weights() -> None:
    proc = run("info", "aim-600M")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["params"]["backbone"] == 680_535_552
    assert info["state_dict_keys"] == 205
    assert info["config"]["probe_layers"] == list(range(14, 20))
    assert info["weights"].startswith("none")
    assert run("info", "aim-600M", "--probe-layers", "last").stdout.count('"probe_layers": [\n      18') == 1


def test_info_on_a_checkpoint(debug_checkpoint: Path) -> None:
    proc = run("info", str(debug_checkpoint), "--checksum")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["key_check"].startswith("ok")
    assert info["labels"] == 10
    assert len(info["sha256"][str(debug_checkpoint)]) == 64


def test_embed_prints_the_model_embedding(debug_checkpoint: Path) -> None:
    names = [IMAGES / "landscape_640x427.jpg", IMAGES / "palette_320x240.png"]
    proc = run("embed", str(debug_checkpoint), *map(str, names))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    model = load_model(debug_checkpoint)
    x = torch.from_numpy(np.stack([preprocess(Image.open(n), model.preprocess_config) for n in names]))
    with torch.no_grad():
        expected = model.embed(x)
    for row, vec in zip(rows, expected, strict=True):
        np.testing.assert_allclose(row["embedding"], vec.numpy(), atol=2e-6)
        assert np.linalg.norm(row["embedding"]) == pytest.approx(1.0, abs=1e-4)


def test_embed_logits_gives_labels(debug_checkpoint: Path) -> None:
    proc = run("embed", str(debug_checkpoint), str(IMAGES / "square_224.jpg"), "--output", "logits", "--top-k", "3")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert len(row["top"]) == 3 and row["top"][0]["label"].startswith("class_")
    probs = [t["prob"] for t in row["top"]]
    assert probs == sorted(probs, reverse=True)


def test_errors_are_one_clear_line(tmp_path: Path, debug_checkpoint: Path) -> None:
    proc = run("info", str(tmp_path / "missing.pth"))
    assert proc.returncode == 2 and "not an existing file or folder" in proc.stderr
    bad = tmp_path / "not_an_image.jpg"
    bad.write_bytes(b"definitely not a jpeg")
    proc = run("embed", str(debug_checkpoint), str(bad))
    assert proc.returncode != 0 and "cannot read image" in proc.stderr
    assert "Traceback" not in proc.stderr
