"""The Fashion-MNIST converter on tiny synthetic IDX files; the apt package is never required."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.datasets import fashion_mnist as fm


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def fake_source(root: Path, per_class: int = 6, test_per_class: int = 2) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for stem, n in (("train", per_class), ("t10k", test_per_class)):
        labels = np.tile(np.arange(10), n)
        write_idx(root / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (len(labels), 28, 28)))
        write_idx(root / f"{stem}-labels-idx1-ubyte.gz", labels)
    return root


def test_missing_files_name_the_apt_package(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(fm.DatasetUnavailableError, match="apt-get install dataset-fashion-mnist"):
        fm.source_files(tmp_path)
    assert fm.main(["--out", str(tmp_path / "out"), "--source", str(tmp_path / "nothing")]) == 2
    assert "dataset-fashion-mnist" in caplog.text and "MIT" in caplog.text


def test_read_idx_round_trip(tmp_path: Path) -> None:
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    write_idx(tmp_path / "x.gz", images)
    assert np.array_equal(fm.read_idx(tmp_path / "x.gz"), images)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="unsigned-byte"):
        fm.read_idx(tmp_path / "bad")


def test_convert_writes_a_fixed_imagefolder_split(tmp_path: Path) -> None:
    source = fake_source(tmp_path / "src")
    out = tmp_path / "out"
    summary = fm.convert(out, source, val_per_class=2)
    assert summary["counts"] == {"train": 40, "val": 20, "test": 20}
    labels = json.loads((out / "labels.json").read_text())
    assert list(labels.values()) == sorted(fm.CLASS_DIRS)
    for split in ("train", "val", "test"):
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(fm.CLASS_DIRS)
    # Every PNG holds exactly the pixels of the IDX image its name points at.
    train_x = fm.read_idx(source / "train-images-idx3-ubyte.gz")
    png = next((out / "val" / "bag").glob("*.png"))
    index = int(png.stem.split("_")[1])
    assert np.array_equal(np.asarray(Image.open(png)), train_x[index])
    # The split is fixed: a second conversion picks the same validation images.
    again = tmp_path / "again"
    fm.convert(again, source, val_per_class=2)
    assert sorted(p.name for p in (out / "val").rglob("*.png")) == sorted(
        p.name for p in (again / "val").rglob("*.png")
    )
    with pytest.raises(FileExistsError):
        fm.convert(out, source, val_per_class=2)
    fm.convert(out, source, limit_per_class=1, force=True, val_per_class=2)
    assert len(list((out / "train").rglob("*.png"))) == 10  # the rewrite left no stale images behind


def test_real_package_when_installed(tmp_path: Path) -> None:
    if not (fm.DEFAULT_SOURCE / "train-labels-idx1-ubyte.gz").is_file():
        pytest.skip(f"{fm.APT_PACKAGE} is not installed")
    summary = fm.convert(tmp_path / "fm", limit_per_class=3)
    assert summary["counts"] == {"train": 30, "val": 30, "test": 30}
