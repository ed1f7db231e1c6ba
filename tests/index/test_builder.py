"""The offline builder on real images: corrupt files skipped and listed, resumable, IVF trained, near-duplicates
found first (aim-debug with random weights, through the service's backend and batcher)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import aimcore
from service.backends.torch_backend import TorchBackend
from service.index import IndexLockedError, RecipeMismatchError, VectorIndex
from service.index.__main__ import main
from service.index.builder import build_index
from service.index.embedder import ImageEmbedder
from tests.conftest import encode, make_photo
from tests.index.conftest import small_config

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "images"


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """The 12 real test images in two sub-folders, one generated photo, a corrupt and a truncated file."""
    root = tmp_path / "images"
    for i, src in enumerate(sorted(ASSETS.iterdir())):
        dest = root / ("trips" if i % 2 else "home") / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
    (root / "home" / "photo.png").write_bytes(encode(make_photo(300, 220, seed=5), "PNG"))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a JPEG")
    whole = (ASSETS / "landscape_640x427.jpg").read_bytes()
    (root / "trips" / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (root / ".hidden.jpg").write_bytes(whole)  # hidden files are not indexed
    return root


def near_duplicate(path: Path) -> Image.Image:
    """Resized to 70 % and re-encoded as JPEG quality 75: what a re-upload of the same photo looks like."""
    with Image.open(path) as image:
        rgb = ImageOps.exif_transpose(image).convert("RGB")
    small = rgb.resize((int(rgb.width * 0.7), int(rgb.height * 0.7)), Image.Resampling.LANCZOS)
    return Image.open(io.BytesIO(encode(small, "JPEG", quality=75)))


@pytest.fixture
def embedder(debug_checkpoint: Path):
    model = aimcore.load_model(debug_checkpoint)
    emb = ImageEmbedder(TorchBackend(model, model_id=str(debug_checkpoint), max_batch_size=4))
    yield emb
    emb.close()


def test_cli_builds_an_index_where_near_duplicates_rank_first(
    image_dir: Path, tmp_path: Path, debug_checkpoint: Path, embedder: ImageEmbedder
) -> None:
    out = tmp_path / "index"
    args = [
        "build",
        "--images",
        str(image_dir),
        "--out",
        str(out),
        "--checkpoint",
        str(debug_checkpoint),
        "--batch-size",
        "4",
        "--no-progress",
        "--hnsw-m",
        "16",
    ]
    assert main(args) == 0
    report = json.loads((out / "build-report.json").read_text())
    assert report["added"] == 13 and report["images_found"] == 15
    assert sorted(s["id"] for s in report["skipped"]) == ["broken.jpg", "trips/truncated.jpg"]

    originals = sorted(ASSETS.iterdir())
    queries = np.stack(
        embedder.embed([aimcore.preprocess(near_duplicate(p), embedder.preprocess_config) for p in originals])
    )
    with VectorIndex.open(out, read_only=True) as index:
        assert index.config.kind == "hnsw" and len(index) == 13
        # The CLI's create_backend and this TorchBackend make the same vectors (precision is informational).
        assert index.recipe.fingerprint == embedder.recipe.fingerprint
        hits = index.search(queries, k=3, recipe=embedder.recipe)
        first = [h[0].id.split("/")[-1] for h in hits]
        assert first == [p.name for p in originals], "each near-duplicate must find its original first"
        assert all(h[0].score > h[1].score for h in hits)
        home = index.search(queries, k=3, recipe=embedder.recipe, where={"dir": "home"})
        assert all(h.metadata["dir"] == "home" for row in home for h in row)

    # Resumable: a second run embeds nothing; a new image is the only work.
    assert main(args) == 0
    assert json.loads((out / "build-report.json").read_text())["already_indexed"] == 13
    (image_dir / "trips" / "new.png").write_bytes(encode(make_photo(240, 260, seed=9), "PNG"))
    assert main(args) == 0
    report = json.loads((out / "build-report.json").read_text())
    assert report["added"] == 1 and report["index_size"] == 14


def test_interrupted_build_resumes_and_trains_ivf(image_dir: Path, tmp_path: Path, embedder: ImageEmbedder) -> None:
    out = tmp_path / "index"

    def crash_after_first_chunk(added: int) -> None:
        raise KeyboardInterrupt  # Ctrl-C between chunks

    with pytest.raises(KeyboardInterrupt):
        build_index(
            image_dir,
            out,
            embedder,
            small_config("ivf"),
            chunk_size=5,
            progress=False,
            on_chunk=crash_after_first_chunk,
        )
    with VectorIndex.open(out, read_only=True) as index:
        # The first chunk (broken.jpg and 4 good files) is durable; IVF is still in its exact stage.
        assert len(index) == 4 and not index.trained
    report = build_index(image_dir, out, embedder, small_config("ivf"), chunk_size=5, progress=False)
    assert report.already_indexed == 4 and report.added == 9 and report.index_size == 13
    with VectorIndex.open(out, read_only=True) as index:
        assert index.trained and index.stats().faiss_class == "IndexIVFFlat"
        for item_id in ("home/cmyk_330x270.jpg", "home/exif_rot6_427x300.jpg", "trips/exact_short_300x256.png"):
            assert index.search_by_id(item_id, k=1, include_self=True)[0].id == item_id
    with pytest.raises(ValueError, match="hnsw"):
        build_index(image_dir, out, embedder, small_config("hnsw"), progress=False)


def test_resume_with_another_model_is_refused(image_dir: Path, tmp_path: Path, embedder: ImageEmbedder) -> None:
    out = tmp_path / "index"
    build_index(image_dir, out, embedder, small_config("flat"), progress=False)
    torch.manual_seed(123)
    other = aimcore.build_model(aimcore.get_flavor("aim-debug")).eval()
    other_embedder = ImageEmbedder(TorchBackend(other, model_id="other", max_batch_size=4))
    try:
        with pytest.raises(RecipeMismatchError, match="model_sha256"):
            build_index(image_dir, out, other_embedder, progress=False)
    finally:
        other_embedder.close()


def test_rebuild_stale_replaces_an_index_of_another_model(
    image_dir: Path, tmp_path: Path, embedder: ImageEmbedder
) -> None:
    """Issue 12: a pipeline re-run after the model changed rebuilds the index instead of failing."""
    out = tmp_path / "index"
    build_index(image_dir, out, embedder, small_config("flat"), progress=False)
    torch.manual_seed(123)
    other = aimcore.build_model(aimcore.get_flavor("aim-debug")).eval()
    other_embedder = ImageEmbedder(TorchBackend(other, model_id="other", max_batch_size=4))
    try:
        report = build_index(image_dir, out, other_embedder, small_config("flat"), progress=False, rebuild_stale=True)
        assert report.already_indexed == 0 and report.added == report.index_size > 0
        with VectorIndex.open(out, read_only=True) as index:
            index.check_recipe(other_embedder.recipe, "search")  # the new model's index, whole
            assert len(index) == report.index_size
        assert not [p for p in tmp_path.iterdir() if ".stale-" in p.name]
    finally:
        other_embedder.close()


def test_build_of_an_index_open_in_a_service_is_a_no_op_when_current(
    image_dir: Path, tmp_path: Path, embedder: ImageEmbedder
) -> None:
    """The pipeline's build-index re-runs while its service holds the index's write lock: nothing to add, so no
    error; with an image missing, the lock error says what to do."""
    out = tmp_path / "index"
    build_index(image_dir, out, embedder, small_config("flat"), progress=False)
    with VectorIndex.open(out):  # the running service
        report = build_index(image_dir, out, embedder, small_config("flat"), progress=False)
        assert report.added == 0 and report.already_indexed == report.images_found
        (image_dir / "home" / "new.png").write_bytes(encode(make_photo(200, 160, seed=9), "PNG"))
        with pytest.raises(IndexLockedError, match="stop that process"):
            build_index(image_dir, out, embedder, small_config("flat"), progress=False)
