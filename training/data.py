"""Training and validation batches: a deterministic, resumable, rank- and worker-independent image stream.

The run reads one global stream of samples. Sample number `s` (counted from the start of the run) is image
`perm_e[s mod n]` of epoch `e = s // n`, where `perm_e` is a permutation seeded by (seed, e). Its augmentation
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
from training.sources import Sample, read_bytes

__all__ = ["StreamPosition", "TrainBatches", "ValBatches", "decode_image", "make_train_loader"]

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


class TrainBatches(torch.utils.data.Dataset):
    """Map-style dataset over micro-batch numbers: item j is rank r's j-th micro-batch (a dict of tensors)."""

    def __init__(
        self,
        samples: list[Sample],
        *,
        augment_config: AugmentConfig,
        position: StreamPosition,
        seed: int,
        num_tokens: int,
        max_retries: int,
        max_pixels: int,
        jpeg_draft: bool,
    ) -> None:
        if not samples:
            raise ValueError("no training images")
        self.samples = samples
        self.aug = augment_config
        self.position = position
        self.seed = seed
        self.num_tokens = num_tokens
        self.max_retries = max_retries
        self.max_pixels = max_pixels
        self.draft_size = 2 * augment_config.img_size if jpeg_draft else 0
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()  # per process: the last two epochs' orders

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, PERM_STREAM, epoch]).permutation(len(self.samples))
            self._perms[epoch] = perm
            while len(self._perms) > 2:
                self._perms.popitem(last=False)
        return perm

    def dataset_index(self, sample_index: int) -> int:
        n = len(self.samples)
        return int(self._permutation(sample_index // n)[sample_index % n])

    def load(self, sample_index: int) -> tuple[np.ndarray, list[tuple[str, str]]]:
        """The augmented image of global sample `sample_index`, and the (key, error) of every image that failed."""
        failures: list[tuple[str, str]] = []
        idx = self.dataset_index(sample_index)
        for attempt in range(self.max_retries + 1):
            if attempt:  # a deterministic replacement: any image of the dataset, keyed by (seed, sample, attempt)
                sub_rng = np.random.default_rng([self.seed, SUB_STREAM, sample_index, attempt])
                idx = int(sub_rng.integers(len(self.samples)))
            sample = self.samples[idx]
            try:
                image = decode_image(read_bytes(sample), max_pixels=self.max_pixels, draft_size=self.draft_size)
            except (CorruptImageError, OSError) as exc:
                failures.append((sample.key, str(exc)))
                continue
            rng = np.random.default_rng([self.seed, AUG_STREAM, sample_index, attempt])
            return augment(image, self.aug, rng), failures
        raise RuntimeError(
            f"{self.max_retries + 1} images in a row were unreadable for sample {sample_index} "
            f"(last: {failures[-1]}); check the data or raise data.max_retries"
        )

    def __getitem__(self, j: int) -> dict[str, Any]:
        first = self.position.first_sample(j)
        images, prefix, failures = [], [], []
        for s in range(first, first + self.position.micro_batch):
            pixels, failed = self.load(s)
            images.append(pixels)
            prefix.append(sample_prefix_length(self.seed, s, self.num_tokens))
            failures.extend(failed)
        return {
            "images": torch.from_numpy(np.stack(images)),  # (m, 3, S, S) float32, normalised
            "prefix_lens": torch.tensor(prefix, dtype=torch.int64),  # (m,) in [1, N-1]
            "first_sample": first,
            "failures": failures,
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
        self, samples: list[Sample], *, img_size: int, seed: int, num_tokens: int, max_pixels: int, max_samples: int
    ) -> None:
        self.samples = samples[:max_samples] if max_samples else samples
        self.prep = PreprocessConfig.for_size(img_size)
        self.seed = seed
        self.num_tokens = num_tokens
        self.max_pixels = max_pixels
        self.failed: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def num_chunks(self, batch_size: int, world_size: int) -> int:
        per_rank = -(-len(self.samples) // world_size)
        return -(-per_rank // batch_size)

    def chunk(self, c: int, batch_size: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(images (b, 3, S, S), prefix lengths (b,)) of this rank's chunk c, or None when it holds no readable
        image. Unreadable images are skipped (and logged once)."""
        mine = list(range(rank, len(self.samples), world_size))[c * batch_size : (c + 1) * batch_size]
        images: list[np.ndarray] = []
        prefix: list[int] = []
        for i in mine:
            sample = self.samples[i]
            try:
                image = decode_image(read_bytes(sample), max_pixels=self.max_pixels)
            except (CorruptImageError, OSError) as exc:
                if sample.key not in self.failed:
                    logger.warning("skipping unreadable validation image %s: %s", sample.key, exc)
                    self.failed.add(sample.key)
                continue
            images.append(preprocess(image, self.prep))
            prefix.append(sample_prefix_length(self.seed ^ VAL_STREAM, i, self.num_tokens))
        if not images:
            return None
        return torch.from_numpy(np.stack(images)), torch.tensor(prefix, dtype=torch.int64)
