"""Training and validation batches: a deterministic, resumable, rank- and worker-independent image stream.

The run reads one global stream of samples. Sample number `s` (counted from the start of the run) is image
`order_e(s mod n)` of epoch `e = s // n`: a full permutation seeded by (seed, e) for folders and list files
(`ListSource`), a seeded shard permutation plus a windowed shuffle for WebDataset shards (`ShardedSource`,
training/shards.py, O(shards) memory). Its augmentation
and its prefix length come from generators keyed by (seed, s), so they are pure functions of `s`:
- different ranks and workers get different samples, hence different crops and prefix lengths (ml-l3m seeds
  every worker alike and repeats the same prefix sequence);
- the data position is a single number, `samples_seen`, saved in every checkpoint; a resumed run starts at that
  sample and sees exactly what the uninterrupted run would have, whatever the number of workers;
- with the same global batch, a resume with a different number of ranks reads the same samples per step.

Micro-batch `j` of rank `r` after a (re)start at sample `start` holds samples
`start + j*W*m + r*m + [0, m)` (W ranks, m images per micro-batch). An unreadable or corrupt image is replaced by
a random other image (keyed by (seed, s, attempt)), counted, and reported; it is never fatal.
"""

from __future__ import annotations

import io
import itertools
import logging
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from aimcore.preprocess import PreprocessConfig, preprocess, to_rgb
from training.augment import AugmentConfig, augment
from training.masking import sample_prefix_length
from training.shards import ShardManifest, ShardOrder, ShardSource, split_shards
from training.sources import Sample, detect_format, list_samples, read_bytes, split_validation

__all__ = [
    "ListSource",
    "ShardedSource",
    "StreamPosition",
    "TrainBatches",
    "ValBatches",
    "decode_image",
    "make_train_loader",
    "open_data",
]

logger = logging.getLogger(__name__)

PERM_STREAM = 0x5045_524D  # "PERM"
AUG_STREAM = 0x4155_4700  # "AUG"
SUB_STREAM = 0x5355_4200  # "SUB"
VAL_STREAM = 0x5641_4C00  # "VAL"


class CorruptImageError(ValueError):
    """An image that cannot be decoded or is refused (too many pixels, empty)."""


def decode_image(data: bytes, *, max_pixels: int, draft_size: int = 0) -> Image.Image:
    """Encoded bytes -> RGB PIL image (EXIF orientation applied). Anything unreadable raises CorruptImageError.

    The pixel count is checked from the header before decoding; Pillow's decompression-bomb warning is an error.
    draft_size > 0 lets libjpeg decode at 1/2, 1/4 or 1/8 scale while both sides stay >= draft_size.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            w, h = image.size
            if w < 1 or h < 1 or w * h > max_pixels:
                raise CorruptImageError(f"refused image of {w}x{h} pixels (limit {max_pixels})")
            if draft_size and image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))
            image.load()
            return to_rgb(image)
    except CorruptImageError:
        raise
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError...)
        raise CorruptImageError(f"{type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class StreamPosition:
    """Where a rank's micro-batches start: global sample `start`, W ranks, m images per micro-batch."""

    start: int
    world_size: int
    rank: int
    micro_batch: int

    def first_sample(self, j: int) -> int:
        return self.start + j * self.world_size * self.micro_batch + self.rank * self.micro_batch


class ListSource:
    """A sorted list of samples (folders, list files: small data). Its epoch order is a full permutation."""

    def __init__(self, samples: list[Sample], *, seed: int) -> None:
        self.samples = samples
        self.seed = seed
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()  # per process: the last two epochs' orders

    def __len__(self) -> int:
        return len(self.samples)

    def key(self, i: int) -> str:
        return self.samples[i].key

    def read(self, i: int) -> bytes:
        return read_bytes(self.samples[i])

    def index(self, epoch: int, t: int) -> int:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, PERM_STREAM, epoch]).permutation(len(self.samples))
            self._perms[epoch] = perm
            while len(self._perms) > 2:
                self._perms.popitem(last=False)
        return int(perm[t])


class ShardedSource:
    """WebDataset shards (training.shards): wids random access plus the windowed shard-permutation order."""

    def __init__(self, source: ShardSource, order: ShardOrder) -> None:
        self.source, self.order = source, order

    def __len__(self) -> int:
        return len(self.source)

    def key(self, i: int) -> str:
        return self.source.key(i)

    def read(self, i: int) -> bytes:
        return self.source.read(i)

    def index(self, epoch: int, t: int) -> int:
        return self.order.index(epoch, t)


Source = ListSource | ShardedSource


def open_data(
    path: str, val_path: str, *, fmt: str, val_fraction: float, seed: int, shuffle_window: int, open_shards: int,
    cache_dir: str,
) -> tuple[Source, Source | None]:  # fmt: skip
    """(train, val) sources. Shards are split into train/val by whole shards; folders and lists by sample key."""

    def shards(manifest: ShardManifest) -> ShardedSource:
        order = ShardOrder(manifest, seed=seed, shuffle_window=shuffle_window)
        return ShardedSource(ShardSource(manifest, open_shards=open_shards, cache_dir=cache_dir), order)

    def one(p: str) -> ShardManifest | list[Sample]:
        kind = detect_format(p) if fmt == "auto" else fmt
        return ShardManifest.load(p) if kind == "wds" else list_samples(p, kind)

    data = one(path)
    val: ShardManifest | list[Sample] | None
    if val_path:
        val = one(val_path)
    elif isinstance(data, ShardManifest):
        data, val = split_shards(data, val_fraction)
    else:
        data, val = split_validation(data, val_fraction)

    def wrap(d: ShardManifest | list[Sample] | None) -> Source | None:
        if d is None or (isinstance(d, list) and not d):
            return None
        return shards(d) if isinstance(d, ShardManifest) else ListSource(d, seed=seed)

    train = wrap(data)
    assert train is not None
    if isinstance(data, ShardManifest):
        logger.info("data %s: %d shards, %d samples", path, len(data.urls), data.num_samples)
    return train, wrap(val)


class TrainBatches(torch.utils.data.Dataset):
    """Map-style dataset over micro-batch numbers: item j is rank r's j-th micro-batch (a dict of tensors)."""

    def __init__(
        self,
        samples: list[Sample] | Source,
        *,
        augment_config: AugmentConfig,
        position: StreamPosition,
        seed: int,
        num_tokens: int,
        max_retries: int,
        max_pixels: int,
        jpeg_draft: bool,
    ) -> None:
        self.source: Source = ListSource(samples, seed=seed) if isinstance(samples, list) else samples
        if not len(self.source):
            raise ValueError("no training images")
        self.aug = augment_config
        self.position = position
        self.seed = seed
        self.num_tokens = num_tokens
        self.max_retries = max_retries
        self.max_pixels = max_pixels
        self.draft_size = 2 * augment_config.img_size if jpeg_draft else 0
        self.log_keys = False  # tests: also return the key of every sample read

    def dataset_index(self, sample_index: int) -> int:
        n = len(self.source)
        return self.source.index(sample_index // n, sample_index % n)

    def load(self, sample_index: int) -> tuple[np.ndarray, list[tuple[str, str]]]:
        """The augmented image of global sample `sample_index`, and the (key, error) of every image that failed."""
        failures: list[tuple[str, str]] = []
        idx = self.dataset_index(sample_index)
        for attempt in range(self.max_retries + 1):
            if attempt:  # a deterministic replacement: any image of the dataset, keyed by (seed, sample, attempt)
                sub_rng = np.random.default_rng([self.seed, SUB_STREAM, sample_index, attempt])
                idx = int(sub_rng.integers(len(self.source)))
            try:
                image = decode_image(self.source.read(idx), max_pixels=self.max_pixels, draft_size=self.draft_size)
            except (CorruptImageError, OSError) as exc:
                failures.append((self.source.key(idx), str(exc)))
                continue
            self._last_key = self.source.key(idx)
            rng = np.random.default_rng([self.seed, AUG_STREAM, sample_index, attempt])
            return augment(image, self.aug, rng), failures
        raise RuntimeError(
            f"{self.max_retries + 1} images in a row were unreadable for sample {sample_index} "
            f"(last: {failures[-1]}); check the data or raise data.max_retries"
        )

    def __getitem__(self, j: int) -> dict[str, Any]:
        first = self.position.first_sample(j)
        images, prefix, failures, keys = [], [], [], []
        for s in range(first, first + self.position.micro_batch):
            pixels, failed = self.load(s)
            images.append(pixels)
            if self.log_keys:
                keys.append(self._last_key)
            prefix.append(sample_prefix_length(self.seed, s, self.num_tokens))
            failures.extend(failed)
        return {
            "images": torch.from_numpy(np.stack(images)),  # (m, 3, S, S) float32, normalised
            "prefix_lens": torch.tensor(prefix, dtype=torch.int64),  # (m,) in [1, N-1]
            "first_sample": first,
            "failures": failures,
            "keys": keys,  # empty unless log_keys
        }


class _Count(torch.utils.data.Sampler[int]):
    """0, 1, 2, ... for ever: the loader is indexed by micro-batch number."""

    def __iter__(self) -> Iterator[int]:
        return itertools.count()


def make_train_loader(
    dataset: TrainBatches, *, num_workers: int, prefetch_factor: int, pin_memory: bool
) -> torch.utils.data.DataLoader:
    """Batches come back in order whatever the worker count; each is a pure function of its number, so worker
    seeds do not matter. A private generator keeps the loader from drawing on the global torch RNG."""
    extra: dict[str, Any] = {"prefetch_factor": prefetch_factor} if num_workers > 0 else {}
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        sampler=_Count(),
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(dataset.seed),
        **extra,
    )


class ValBatches:
    """The held-out images with the evaluation transform and fixed prefix lengths.

    Rank r evaluates images r, r + W, r + 2W, ... in chunks of `batch_size`. Every rank runs the same number of
    chunks (`num_chunks`), padding with empty ones, because FSDP's forward is a collective.
    """

    def __init__(
        self, samples: list[Sample] | Source, *, img_size: int, seed: int, num_tokens: int, max_pixels: int,
        max_samples: int,
    ) -> None:  # fmt: skip
        self.source: Source = ListSource(samples, seed=seed) if isinstance(samples, list) else samples
        self.count = min(len(self.source), max_samples) if max_samples else len(self.source)
        self.prep = PreprocessConfig.for_size(img_size)
        self.seed = seed
        self.num_tokens = num_tokens
        self.max_pixels = max_pixels
        self.failed: set[str] = set()

    def __len__(self) -> int:
        return self.count

    def num_chunks(self, batch_size: int, world_size: int) -> int:
        per_rank = -(-self.count // world_size)
        return -(-per_rank // batch_size)

    def chunk(self, c: int, batch_size: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(images (b, 3, S, S), prefix lengths (b,)) of this rank's chunk c, or None when it holds no readable
        image. Unreadable images are skipped (and logged once)."""
        mine = list(range(rank, self.count, world_size))[c * batch_size : (c + 1) * batch_size]
        images: list[np.ndarray] = []
        prefix: list[int] = []
        for i in mine:
            try:
                image = decode_image(self.source.read(i), max_pixels=self.max_pixels)
            except (CorruptImageError, OSError) as exc:
                key = self.source.key(i)
                if key not in self.failed:
                    logger.warning("skipping unreadable validation image %s: %s", key, exc)
                    self.failed.add(key)
                continue
            images.append(preprocess(image, self.prep))
            prefix.append(sample_prefix_length(self.seed ^ VAL_STREAM, i, self.num_tokens))
        if not images:
            return None
        return torch.from_numpy(np.stack(images)), torch.tensor(prefix, dtype=torch.int64)
