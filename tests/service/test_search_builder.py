"""End to end: `python -m service.index build` on a folder of real images writes exactly what the service loads;
searching by an image from that folder finds its own id first."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from service.settings import Settings
from tests.service.conftest import serve
from tests.service.index_support import ASSETS
from tests.service.test_drain import ROOT

FILES = ("cmyk_330x270.jpg", "exif_rot6_427x300.jpg", "palette_320x240.png", "small_100x80.png", "square_224.jpg")


def test_builder_output_is_served(debug_checkpoint: Path, tmp_path: Path, live: list) -> None:
    folder = tmp_path / "photos"
    for i, name in enumerate(FILES):
        dest = folder / ("a" if i % 2 else "b") / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ASSETS / name, dest)
    out = tmp_path / "index"
    args = ["build", "--images", str(folder), "--out", str(out), "--checkpoint", str(debug_checkpoint)]
    build = subprocess.run(
        [sys.executable, "-m", "service.index", *args, "--batch-size", "4", "--no-progress"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stderr[-2000:]

    server = serve(Settings(model=str(debug_checkpoint), index_path=str(out)))
    live.append(server)
    assert server.engine.status == "ready", server.engine.reason
    with server.client() as client:
        info = client.get("/index").json()
        assert info["type"] == "hnsw" and info["size"] == len(FILES)
        paths = sorted(folder.rglob("*.*"))
        files = [("files", (p.name, p.read_bytes())) for p in paths]
        results = client.post("/search", files=files, data={"k": "2"}).json()["results"]
        expected = [p.relative_to(folder).as_posix() for p in paths]
        assert [r["ids"][0] for r in results] == expected
        assert all(r["scores"][0] > 0.999 for r in results)
        assert results[0]["metadata"][0]["dir"] == expected[0].split("/")[0]
