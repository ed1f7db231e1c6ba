"""Data: the three source kinds, augmentation, deterministic rank/worker-independent batches, corrupt images."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import encode, make_photo
from training.augment import AugmentConfig, augment, color_jitter, random_resized_crop_box
from training.data import StreamPosition, TrainBatches, ValBatches, decode_image, make_train_loader
from training.shards import ShardManifest, ShardSource
from training.sources import list_samples, read_bytes, split_validation

AUG = AugmentConfig(img_size=32)


def batches(samples: list, *, rank: int = 0, world: int = 1, start: int = 0, m: int = 4, seed: int = 0) -> TrainBatches:
    return TrainBatches(
        samples, augment_config=AUG, position=StreamPosition(start, world, rank, m), seed=seed, num_tokens=16,
        max_retries=8, max_pixels=10**8, jpeg_draft=True,
    )  # fmt: skip


def test_folder_list_and_tar_shards_give_the_same_images(image_folder: Path, tmp_path: Path) -> None:
    folder = list_samples(str(image_folder))
    assert len(folder) == 28 and [s.key for s in folder] == sorted(s.key for s in folder)
    list_file = tmp_path / "train.txt"
    list_file.write_text("# images\n" + "\n".join(str(Path(s.path).relative_to(tmp_path)) for s in folder) + "\n")
    listed = list_samples(str(list_file))
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(2):  # WebDataset layout: key.jpg + key.json per sample, split over two shards
        with tarfile.open(shards / f"shard-{k:03d}.tar", "w") as tar:
            for i, s in enumerate(folder[k::2]):
                tar.add(s.path, arcname=f"sample{k}_{i:03d}{Path(s.path).suffix}")
                tar.add(list_file, arcname=f"sample{k}_{i:03d}.json")
    manifest = ShardManifest.load(str(shards / "shard-{000..001}.tar"))
    assert ShardManifest.load(str(shards)).urls == manifest.urls and list(manifest.counts) == [14, 14]
    wds = ShardSource(manifest)
    assert len(listed) == len(wds) == len(folder)
    by_bytes = sorted(read_bytes(s) for s in folder)
    assert sorted(read_bytes(s) for s in listed) == by_bytes
    assert sorted(wds.read(i) for i in range(len(wds))) == by_bytes


def test_validation_split_is_stable_and_never_empty(image_folder: Path) -> None:
    samples = list_samples(str(image_folder))
    train, val = split_validation(samples, 0.2)
    assert val and len(train) + len(val) == len(samples)
    _, val2 = split_validation([*samples[::-1], samples[0].__class__(key="new.jpg", path="x")], 0.2)
    assert {s.key for s in val} <= {s.key for s in val2}  # adding an image moves nothing across the split
    assert len(split_validation(samples, 1e-6)[1]) == 1


def test_augmentation_shapes_ranges_and_determinism() -> None:
    image = make_photo(90, 60, seed=3)
    a = augment(image, AUG, np.random.default_rng(1))
    b = augment(image, AUG, np.random.default_rng(1))
    c = augment(image, AUG, np.random.default_rng(2))
    assert a.shape == (3, 32, 32) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() > -2.2 and a.max() < 2.7  # ImageNet-normalised [0, 1] pixels
    areas = []
    for seed in range(300):
        left, top, w, h = random_resized_crop_box(90, 60, (0.4, 1.0), (3 / 4, 4 / 3), np.random.default_rng(seed))
        assert left >= 0 and left + w <= 90 and top >= 0 and top + h <= 60
        areas.append(w * h / (90 * 60))
    assert min(areas) > 0.38 and max(areas) <= 1.0


def test_color_jitter_changes_colours_but_not_geometry() -> None:
    image = make_photo(40, 30, seed=1)
    out = color_jitter(image, (0.4, 0.4, 0.2, 0.1), np.random.default_rng(0))
    assert out.size == image.size and out.mode == "RGB"
    assert not np.array_equal(np.asarray(out), np.asarray(image))
    same = color_jitter(image, (0.0, 0.0, 0.0, 0.0), np.random.default_rng(0))
    assert np.array_equal(np.asarray(same), np.asarray(image))


def test_batches_are_pure_functions_of_position_and_differ_across_ranks(image_folder: Path) -> None:
    samples = list_samples(str(image_folder))
    whole = batches(samples, m=8)[1]  # samples 8..15 on one rank
    r0, r1 = batches(samples, world=2, rank=0)[1], batches(samples, world=2, rank=1)[1]  # samples 8..11, 12..15
    assert torch.equal(torch.cat([r0["images"], r1["images"]]), whole["images"])
    assert torch.equal(torch.cat([r0["prefix_lens"], r1["prefix_lens"]]), whole["prefix_lens"])
    assert not torch.equal(r0["prefix_lens"], r1["prefix_lens"])  # ranks draw different prefixes
    resumed = batches(samples, m=8, start=8)[0]  # a resume at sample 8 reads the same images
    assert torch.equal(resumed["images"], whole["images"])
    lens = torch.cat([batches(samples, m=8)[j]["prefix_lens"] for j in range(8)])
    assert lens.min() >= 1 and lens.max() <= 15 and len(set(lens.tolist())) > 8


def test_worker_count_does_not_change_the_stream(image_folder: Path) -> None:
    samples = list_samples(str(image_folder))
    ds = batches(samples)
    seen = {}
    for workers in (0, 2):
        loader = make_train_loader(ds, num_workers=workers, prefetch_factor=2, pin_memory=False)
        it = iter(loader)
        seen[workers] = [next(it) for _ in range(4)]
        del it
    for a, b in zip(seen[0], seen[2], strict=True):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["prefix_lens"], b["prefix_lens"])
        assert a["first_sample"] == b["first_sample"]


def test_corrupt_images_are_replaced_and_counted(image_folder: Path) -> None:
    (image_folder / "truncated.jpg").write_bytes(encode(make_photo(64, 48), "JPEG")[:300])
    (image_folder / "not_an_image.png").write_bytes(b"this is text")
    (image_folder / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (3000, 3000)).save(image_folder / "huge.png")
    samples = list_samples(str(image_folder))
    ds = TrainBatches(
        samples, augment_config=AUG, position=StreamPosition(0, 1, 0, len(samples)), seed=0, num_tokens=16,
        max_retries=8, max_pixels=2000 * 2000, jpeg_draft=True,
    )  # fmt: skip
    batch = ds[0]  # one epoch: every image once
    assert batch["images"].shape == (len(samples), 3, 32, 32) and torch.isfinite(batch["images"]).all()
    failed = {key for key, _ in batch["failures"]}
    assert failed == {"truncated.jpg", "not_an_image.png", "empty.jpg", "huge.png"}  # and no good image
    with pytest.raises(ValueError, match="refused image"):
        decode_image((image_folder / "huge.png").read_bytes(), max_pixels=2000 * 2000)


def test_all_corrupt_fails_with_a_clear_message(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"junk")
    ds = batches(list_samples(str(tmp_path)), m=1)
    with pytest.raises(RuntimeError, match=r"raise data\.max_retries"):
        ds[0]


def test_validation_batches_are_fixed_and_shared_across_ranks(image_folder: Path) -> None:
    samples = list_samples(str(image_folder))[:7]
    val = ValBatches(samples, img_size=32, seed=0, num_tokens=16, max_pixels=10**8, max_samples=0)
    assert val.num_chunks(2, 2) == 2  # 4 images on rank 0 -> two chunks of 2; rank 1 runs as many
    one = [val.chunk(c, 2, 0, 1) for c in range(val.num_chunks(2, 1))]
    assert sum(len(c[1]) for c in one if c is not None) == 7
    first = val.chunk(0, 2, 0, 1)
    again = val.chunk(0, 2, 0, 1)
    assert first is not None and again is not None and torch.equal(first[0], again[0])
