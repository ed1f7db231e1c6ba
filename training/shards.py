"""WebDataset shards at web scale: a shard manifest, the epoch order, and random access through `wids`.

The run's data state stays one number (`samples_seen`, see data.py), and what this module holds per process is
O(number of shards), never O(samples):
- `ShardManifest`: shard URLs and their sample counts (a wids dataset descriptor, `{"wids_version": 1,
  "shardlist": [{"url": ..., "nsamples": ...}, ...]}`, or a brace-expanded tar pattern counted once at start);
  one int64 per shard plus the URL strings (about 100 bytes a shard: 20 MB for 200,000 shards).
- `ShardOrder`: the order of epoch e. The shards are permuted by a generator seeded by (seed, e); the samples of
  the shards, concatenated in that order, are cut into windows of `shuffle_window` samples and each window is
  permuted by (seed, e, window). Position t of the epoch maps to (shard, member) by one `searchsorted` over the
  permuted cumulative counts. Nothing is materialised per sample.
- `ShardSource`: reads sample i (global index in manifest order) with wids' `IndexedTarSamples` (an mmap index of
  one shard's members, built when the shard is first opened) kept in a small LRU cache per process. Local paths
  are read in place; other URLs (`pipe:`, http(s), s3, gs) are downloaded once into `cache_dir` by wids.

Why a windowed shuffle over a global sample index rather than a per-rank shard stream with a shuffle buffer: a
sample's place in the run is then a pure function of (seed, epoch, position), so a kill -9 resume and a resume at
another world size or worker count continue exactly, with no repeat or skip inside the epoch, from one saved
integer (docs/TRAINING.md, "Data at scale").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from braceexpand import braceexpand

__all__ = ["ShardManifest", "ShardOrder", "ShardSource", "expand_shard_pattern", "write_manifest"]

logger = logging.getLogger(__name__)

SHARD_PERM_STREAM = 0x5348_5244  # "SHRD"
WINDOW_STREAM = 0x5749_4E44  # "WIND"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


def _is_local(url: str) -> bool:
    return not url.startswith("pipe:") and urlparse(url).scheme in ("", "file")


def _local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file:") else url


def expand_shard_pattern(pattern: str) -> list[str]:
    """`a/train-{000000..000009}.tar::b/x.tar` -> the shard URLs (webdataset's brace and `::` conventions); a local
    folder means the .tar files in it, sorted."""
    urls: list[str] = []
    for part in pattern.split("::"):
        if _is_local(part) and os.path.isdir(_local_path(part)):
            urls.extend(sorted(str(p) for p in Path(_local_path(part)).glob("*.tar")))
        else:
            urls.extend(braceexpand(part))
    return urls


def count_samples(url: str) -> int:
    """Samples (key groups) in one local shard, counted by wids' tar index."""
    from wids.wids import IndexedTarSamples

    ds = IndexedTarSamples(path=_local_path(url))
    try:
        return len(ds)
    finally:
        ds.close()


@dataclass(frozen=True)
class ShardManifest:
    """Shard URLs and sample counts (manifest order). `counts[k]` samples in `urls[k]`."""

    urls: tuple[str, ...]
    counts: np.ndarray  # (S,) int64

    def __post_init__(self) -> None:
        if len(self.urls) != len(self.counts) or not self.urls:
            raise ValueError("a shard manifest needs one count per shard and at least one shard")
        if (self.counts < 0).any():
            raise ValueError("negative sample count in the shard manifest")

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())

    @classmethod
    def from_counts(cls, urls: Sequence[str], counts: Sequence[int]) -> ShardManifest:
        return cls(tuple(urls), np.asarray(counts, dtype=np.int64))

    @classmethod
    def load(cls, path: str) -> ShardManifest:
        """A wids descriptor (.json) or a tar pattern. Relative shard URLs in a descriptor are relative to it."""
        if path.endswith(".json"):
            desc = json.loads(Path(path).read_text())
            shardlist = desc.get("shardlist")
            if desc.get("wids_version") != 1 or not isinstance(shardlist, list):
                raise ValueError(f"{path} is not a wids dataset descriptor (wids_version 1 with a shardlist)")
            base = Path(path).resolve().parent
            urls = [s["url"] if not _is_local(s["url"]) or os.path.isabs(s["url"]) else str(base / s["url"])
                    for s in shardlist]  # fmt: skip
            return cls.from_counts(urls, [int(s["nsamples"]) for s in shardlist])
        urls = expand_shard_pattern(path)
        if not urls:
            raise FileNotFoundError(f"no shards match {path!r}")
        if not all(_is_local(u) for u in urls):
            raise ValueError(
                f"{path!r} names remote shards: give a wids descriptor (.json with nsamples per shard), made once "
                "with `python -m training.shards index PATTERN -o train.json` where the shards are local"
            )
        missing = [u for u in urls if not os.path.isfile(_local_path(u))]
        if missing:
            raise FileNotFoundError(f"WebDataset shards not found for {path!r}: {missing[:3]}")
        if len(urls) > 64:
            logger.warning(
                "counting the samples of %d shards at start; write a manifest once with "
                "`python -m training.shards index %r -o train.json` and pass --data train.json",
                len(urls), path,
            )  # fmt: skip
        return cls.from_counts(urls, [count_samples(u) for u in urls])


def write_manifest(manifest: ShardManifest, path: str | os.PathLike[str]) -> Path:
    """Write `manifest` as a wids dataset descriptor."""
    out = Path(path)
    shardlist = [{"url": u, "nsamples": int(n)} for u, n in zip(manifest.urls, manifest.counts, strict=True)]
    out.write_text(json.dumps({"wids_version": 1, "shardlist": shardlist}, indent=1) + "\n")
    return out


def split_shards(manifest: ShardManifest, fraction: float) -> tuple[ShardManifest, ShardManifest | None]:
    """(train, val) by a stable hash of each shard URL: whole shards are held out, so nothing per sample is
    listed. At least one shard goes to validation when fraction > 0 and there are two or more shards."""
    if fraction <= 0 or len(manifest.urls) < 2:
        return manifest, None
    score = [int.from_bytes(hashlib.sha1(u.encode()).digest()[:8], "big") / 2**64 for u in manifest.urls]
    val = [k for k, s in enumerate(score) if s < fraction] or [int(np.argmin(score))]
    if len(val) == len(manifest.urls):
        val = val[:1]
    train = [k for k in range(len(manifest.urls)) if k not in set(val)]

    def sub(idx: list[int]) -> ShardManifest:
        return ShardManifest(tuple(manifest.urls[k] for k in idx), manifest.counts[idx])

    return sub(train), sub(val)


class ShardOrder:
    """Epoch e's order over a manifest: a seeded shard permutation, then a windowed sample shuffle.

    `index(e, t)` is the global sample index (manifest order) at position t in [0, n) of epoch e. The last two
    epochs' shard permutations and cumulative counts (2 x S int64) and the last few windows' permutations are
    cached per process.
    """

    def __init__(self, manifest: ShardManifest, *, seed: int, shuffle_window: int) -> None:
        self.counts = manifest.counts
        self.starts = np.concatenate([[0], np.cumsum(manifest.counts)[:-1]]).astype(np.int64)  # (S,)
        self.n = manifest.num_samples
        self.seed = seed
        self.window = max(1, shuffle_window)
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._windows: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        cached = self._epochs.get(epoch)
        if cached is None:
            perm = np.random.default_rng([self.seed, SHARD_PERM_STREAM, epoch]).permutation(len(self.counts))
            cached = perm, np.cumsum(self.counts[perm])  # shard order, end of each shard in the epoch's stream
            self._epochs[epoch] = cached
            while len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return cached

    def _window_perm(self, epoch: int, w: int) -> np.ndarray:
        perm = self._windows.get((epoch, w))
        if perm is None:
            size = min(self.window, self.n - w * self.window)
            perm = np.random.default_rng([self.seed, WINDOW_STREAM, epoch, w]).permutation(size)
            self._windows[(epoch, w)] = perm
            while len(self._windows) > 4:
                self._windows.popitem(last=False)
        return perm

    def index(self, epoch: int, t: int) -> int:
        w, offset = divmod(t, self.window)
        p = w * self.window + int(self._window_perm(epoch, w)[offset])  # position in the shard-permuted stream
        perm, ends = self._epoch(epoch)
        k = int(np.searchsorted(ends, p, side="right"))  # k-th shard of this epoch's order
        inner = p - (int(ends[k - 1]) if k else 0)
        return int(self.starts[perm[k]]) + inner


class BadSampleError(OSError):
    """A sample that cannot be read: missing or truncated shard, member out of range, no image member."""


class ShardSource:
    """Random access to the samples of a manifest (global index in manifest order) through wids.

    `read(i)` returns the encoded bytes of sample i's image (the first member whose extension is in IMAGE_EXTS);
    `key(i)` is `<shard file name>/<sample key>`, or `<shard>#<index>` when the shard or member is unreadable.
    Open shards are kept in an LRU cache of `open_shards` per process (each an mmap, no copy); a shard that cannot
    be opened is remembered as bad, so every sample of it fails fast.
    """

    def __init__(self, manifest: ShardManifest, *, open_shards: int = 8, cache_dir: str = "") -> None:
        self.manifest = manifest
        self.ends = np.cumsum(manifest.counts)
        self.open_shards = open_shards
        self.cache_dir = cache_dir
        self._open: OrderedDict[int, Any] = OrderedDict()
        self._bad: dict[int, str] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.manifest.num_samples

    def __getstate__(self) -> dict[str, Any]:  # to loader workers: without open mmaps
        return {**self.__dict__, "_open": OrderedDict(), "_bad": {}}

    def locate(self, i: int) -> tuple[int, int]:
        k = int(np.searchsorted(self.ends, i, side="right"))
        return k, i - (int(self.ends[k - 1]) if k else 0)

    def _shard(self, k: int) -> Any:
        if os.getpid() != self._pid:  # forked: mmaps are not shared across processes
            self._open, self._bad, self._pid = OrderedDict(), {}, os.getpid()
        if k in self._bad:
            raise BadSampleError(self._bad[k])
        shard = self._open.get(k)
        if shard is not None:
            self._open.move_to_end(k)
            return shard
        from wids.wids import IndexedTarSamples

        url = self.manifest.urls[k]
        try:
            if _is_local(url):
                shard = IndexedTarSamples(path=_local_path(url))
            else:
                from wids.wids_dl import download_and_open

                if not self.cache_dir:
                    raise BadSampleError(f"remote shard {url} needs data.cache_dir")
                os.makedirs(self.cache_dir, exist_ok=True)
                local = os.path.join(self.cache_dir, hashlib.sha1(url.encode()).hexdigest()[:16] + ".tar")
                with download_and_open(url, local) as stream:
                    shard = IndexedTarSamples(path=local, stream=stream)
        except Exception as exc:  # missing file, truncated header, failed download: the shard is bad
            self._bad[k] = f"shard {url} unreadable ({type(exc).__name__}: {exc})"
            raise BadSampleError(self._bad[k]) from exc
        self._open[k] = shard
        while len(self._open) > self.open_shards:
            self._open.popitem(last=False)[1].close()
        return shard

    def key(self, i: int) -> str:
        k, inner = self.locate(i)
        name = os.path.basename(urlparse(self.manifest.urls[k]).path) or self.manifest.urls[k]
        try:
            shard = self._shard(k)
        except BadSampleError:
            shard = None
        if shard is not None and inner < len(shard.samples):
            first = shard.samples[inner][0]
            return f"{name}/{shard.reader.by_index[first][0].split('.', 1)[0]}"
        return f"{name}#{inner}"

    def read(self, i: int) -> bytes:
        k, inner = self.locate(i)
        shard = self._shard(k)
        if inner >= len(shard):
            raise BadSampleError(f"{self.key(i)}: the shard holds {len(shard)} samples, the manifest says more")
        try:
            sample = shard[inner]
        except Exception as exc:  # a member cut off by a truncated shard
            raise BadSampleError(f"{self.key(i)}: {type(exc).__name__}: {exc}") from exc
        for ext in IMAGE_EXTS:
            data = sample.get(ext)
            if data is not None:
                return data.getvalue() if hasattr(data, "getvalue") else bytes(data)
        raise BadSampleError(f"{self.key(i)}: no image member (has {sorted(k for k in sample if k[0] == '.')})")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m training.shards index PATTERN -o train.json`: count each shard's samples once."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m training.shards", description=main.__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    index = sub.add_parser("index", help="write a wids descriptor (url + nsamples per shard) for local shards")
    index.add_argument("pattern", help="brace pattern, folder or '::'-joined list of .tar shards")
    index.add_argument("-o", "--output", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    manifest = ShardManifest.load(args.pattern)
    write_manifest(manifest, args.output)
    logger.info("%s: %d shards, %d samples", args.output, len(manifest.urls), manifest.num_samples)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
