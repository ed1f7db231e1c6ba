"""WebDataset shards at scale: manifest, O(shards) epoch order, elastic resume without repeats, bad data."""

from __future__ import annotations

import io
import json
import tarfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from tests.conftest import encode, make_photo
from training.augment import AugmentConfig
from training.data import ShardedSource, StreamPosition, TrainBatches, open_data
from training.shards import ShardManifest, ShardOrder, ShardSource, main, split_shards

AUG = AugmentConfig(img_size=32)


def write_shards(folder: Path, shards: int, per_shard: int, *, seed: int = 0) -> list[str]:
    """img2dataset's layout, written by webdataset's own ShardWriter: KEY.jpg + KEY.json + KEY.txt per sample."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    with wds.ShardWriter(str(folder / "train-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(shards * per_shard):
            key = f"{i:09d}"
            image = encode(make_photo(40 + i % 7, 36 + i % 5, seed=seed + i), "JPEG")
            sink.write({"__key__": key, "jpg": image, "json": json.dumps({"key": key}).encode(), "txt": b"caption"})
            keys.append(f"train-{i // per_shard:06d}.tar/{key}")
    return keys


def batches(source: ShardedSource, start: int, world: int, rank: int, m: int) -> TrainBatches:
    ds = TrainBatches(
        source, augment_config=AUG, position=StreamPosition(start, world, rank, m), seed=0, num_tokens=16,
        max_retries=16, max_pixels=10**8, jpeg_draft=True,
    )  # fmt: skip
    ds.log_keys = True
    return ds


def sharded(manifest: ShardManifest, window: int = 7) -> ShardedSource:
    return ShardedSource(ShardSource(manifest, open_shards=2), ShardOrder(manifest, seed=3, shuffle_window=window))


def test_manifest_from_pattern_equals_the_index_command_and_reads_every_sample(tmp_path: Path) -> None:
    keys = write_shards(tmp_path / "shards", 3, 5)
    pattern = str(tmp_path / "shards" / "train-{000000..000002}.tar")
    manifest = ShardManifest.load(pattern)
    assert list(manifest.counts) == [5, 5, 5]
    assert main(["index", pattern, "-o", str(tmp_path / "train.json")]) == 0
    desc = json.loads((tmp_path / "train.json").read_text())
    assert desc["wids_version"] == 1 and [s["nsamples"] for s in desc["shardlist"]] == [5, 5, 5]
    again = ShardManifest.load(str(tmp_path / "train.json"))
    assert again.urls == manifest.urls and np.array_equal(again.counts, manifest.counts)
    source = ShardSource(again, open_shards=1)  # one open shard at a time: the LRU closes and reopens
    read = [source.read(i) for i in range(15)]
    assert [source.key(i) for i in range(15)] == keys
    with tarfile.open(again.urls[1]) as tar:
        assert read[5] == tar.extractfile("000000005.jpg").read()  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="remote shards"):
        ShardManifest.load("https://example.invalid/train-{000..009}.tar")


def test_epoch_order_is_a_seeded_permutation_with_shards_kept_together_in_windows() -> None:
    manifest = ShardManifest.from_counts([f"s{k}.tar" for k in range(13)], [7, 0, 3, 11, 5, 9, 2, 8, 6, 4, 10, 1, 7])
    n = manifest.num_samples
    order = ShardOrder(manifest, seed=1, shuffle_window=16)
    epochs = [[order.index(e, t) for t in range(n)] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))  # every sample exactly once per epoch
    assert epochs[0] != epochs[1] != epochs[2]
    again = ShardOrder(manifest, seed=1, shuffle_window=16)
    assert [again.index(1, t) for t in range(n)] == epochs[1]  # deterministic, whatever was asked before
    assert [ShardOrder(manifest, seed=2, shuffle_window=16).index(0, t) for t in range(n)] != epochs[0]
    src = ShardSource(manifest)
    for w in range(0, n, 16):  # a window spans few consecutive shards of the epoch's order
        assert len({src.locate(i)[0] for i in epochs[0][w : w + 16]}) <= 16 // 1
    window_of_one = ShardOrder(manifest, seed=1, shuffle_window=1)
    shards_in_order = [src.locate(window_of_one.index(0, t))[0] for t in range(n)]
    assert shards_in_order == sorted(shards_in_order, key=shards_in_order.index)  # each shard read contiguously


def test_state_and_start_up_are_o_shards_for_200k_shards() -> None:
    """200,000 shards x 5,000 samples = 1 B samples: the order answers at once and holds a few MB."""
    urls = [f"s3://bucket/train-{k:06d}.tar" for k in range(200_000)]
    tracemalloc.start()
    t0 = time.perf_counter()
    manifest = ShardManifest.from_counts(urls, np.full(200_000, 5_000))
    order = ShardOrder(manifest, seed=0, shuffle_window=10_000)
    source = ShardSource(manifest)
    picks = [order.index(e, t) for e in (0, 7) for t in (0, 1, 123_456_789, manifest.num_samples - 1)]
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert manifest.num_samples == 10**9 and all(0 <= p < 10**9 for p in picks)
    assert [source.locate(p)[0] for p in picks[:1]] and seconds < 5
    assert peak < 30 * 2**20, f"{peak / 2**20:.1f} MiB"  # beyond the URL strings themselves: 2-3 int64 per shard


def test_elastic_resume_four_ranks_to_two_repeats_and_skips_nothing_in_the_epoch(tmp_path: Path) -> None:
    """World 4 x micro-batch 2 (global batch 8) for 3 steps, saved at sample 24; world 2 x 4 (global 8) reads the
    rest of the 40-sample epoch. The union of the logged keys is the epoch, each key once."""
    keys = write_shards(tmp_path / "shards", 4, 10)
    source = sharded(ShardManifest.load(str(tmp_path / "shards")))
    seen: list[str] = []
    for j in range(3):
        for r in range(4):
            seen.extend(batches(source, 0, 4, r, 2)[j]["keys"])
    resumed_at = 3 * 8
    for j in range(2):
        for r in range(2):
            seen.extend(batches(source, resumed_at, 2, r, 4)[j]["keys"])
    assert len(seen) == 40 and sorted(seen) == sorted(keys)
    uninterrupted = [k for j in range(5) for r in range(4) for k in batches(source, 0, 4, r, 2)[j]["keys"]]
    assert seen == uninterrupted  # and in the same order as the run that never stopped


def test_bad_shards_and_members_are_counted_and_skipped(tmp_path: Path) -> None:
    write_shards(tmp_path / "shards", 2, 6)
    bad = tmp_path / "shards" / "train-000002.tar"  # a corrupt JPEG and a member with no image
    with tarfile.open(bad, "w") as tar:
        for name, data in [("c0.jpg", encode(make_photo(40, 30), "JPEG")[:200]), ("c1.json", b"{}"),
                           ("c2.jpg", encode(make_photo(40, 30), "JPEG"))]:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    whole = (tmp_path / "shards" / "train-000001.tar").read_bytes()
    truncated = tmp_path / "shards" / "train-000003.tar"
    truncated.write_bytes(whole[: len(whole) // 2 + 100])
    shards = [str(tmp_path / "shards" / f"train-{k:06d}.tar") for k in range(4)] + [str(tmp_path / "missing.tar")]
    manifest = ShardManifest.from_counts(shards, [6, 6, 3, 6, 4])
    ds = batches(sharded(manifest, window=5), 0, 1, 0, manifest.num_samples)
    batch = ds[0]  # the whole epoch in one batch: never a crash
    assert batch["images"].shape == (25, 3, 32, 32)
    failed = [key for key, _ in batch["failures"]]
    messages = " ".join(e for _, e in batch["failures"])
    assert "train-000002.tar/c0" in failed and "train-000002.tar/c1" in failed and "no image member" in messages
    assert any(k.startswith("missing.tar#") for k in failed) and "unreadable" in messages
    assert any(k.startswith("train-000003.tar") for k in failed)  # the truncated shard's lost tail
    good = set(batch["keys"])
    assert not {"train-000002.tar/c0", "train-000002.tar/c1"} & good and "train-000002.tar/c2" in good


def test_shard_validation_holds_out_whole_shards(tmp_path: Path) -> None:
    write_shards(tmp_path / "shards", 6, 3)
    train, val = open_data(str(tmp_path / "shards"), "", fmt="auto", val_fraction=0.2, seed=0, shuffle_window=4,
                           open_shards=2, cache_dir="")  # fmt: skip
    assert isinstance(train, ShardedSource) and isinstance(val, ShardedSource)
    assert len(train) + len(val) == 18 and len(val) % 3 == 0 and len(val) >= 3
    tr, va = split_shards(ShardManifest.load(str(tmp_path / "shards")), 0.2)
    assert va is not None and not set(tr.urls) & set(va.urls)
