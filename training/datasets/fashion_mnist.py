"""Fashion-MNIST (Zalando, MIT licence) from Debian's `dataset-fashion-mnist` package to an ImageFolder tree.

    apt-get install dataset-fashion-mnist          # files land in /usr/share/datasets/fashion-mnist/
    python -m training.datasets.fashion_mnist --out data/fashion-mnist [--limit-per-class N]

Layout written (28x28 8-bit grayscale PNGs; the model's preprocessing upsamples and converts to RGB):

    OUT/train/<class>/train_<i>.png   55,000: the official training file minus the validation split
    OUT/val/<class>/train_<i>.png      5,000: 500 per class held out of the official training file
    OUT/test/<class>/test_<i>.png     10,000: the official test file
    OUT/labels.json                   {"0": "ankle_boot", ...}: index -> class folder, in ImageFolder (sorted) order
    OUT/split.json                    the split rule, counts, seed, source files and licence

`<i>` is the image's index in its source IDX file, so every PNG traces back to the original. The held-out split is
fixed: within each class of the official training file, the indices are shuffled with numpy's
`default_rng(SPLIT_SEED)` and the first `VAL_PER_CLASS` go to `val`. `--limit-per-class N` keeps at most N images
per class in every split (the first N of that order; file order for test), for quick runs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import shutil
import struct
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "APT_PACKAGE",
    "CLASS_DIRS",
    "CLASS_NAMES",
    "DEFAULT_SOURCE",
    "SPLIT_SEED",
    "VAL_PER_CLASS",
    "DatasetUnavailableError",
    "convert",
    "load_split_arrays",
    "read_idx",
    "split_indices",
]

logger = logging.getLogger(__name__)

APT_PACKAGE = "dataset-fashion-mnist"
DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
LICENCE = "MIT (Expat), Copyright 2017 Zalando SE; https://github.com/zalandoresearch/fashion-mnist"
SPLIT_SEED = 0
VAL_PER_CLASS = 500
# Official label index -> name (Fashion-MNIST README) and the folder name used on disk (no '/' or spaces).
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CLASS_DIRS = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DatasetUnavailableError(FileNotFoundError):
    """The IDX files are not on this machine."""


def _find(source: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (source / name).is_file():
            return source / name
    return None


def source_files(source: Path = DEFAULT_SOURCE) -> dict[str, tuple[Path, Path]]:
    """{"train": (images, labels), "test": (...)}, or DatasetUnavailableError naming the apt package."""
    found: dict[str, tuple[Path, Path]] = {}
    missing: list[str] = []
    for split, (images, labels) in _FILES.items():
        paths = [_find(source, images), _find(source, labels)]
        missing += [stem for stem, p in zip((images, labels), paths, strict=True) if p is None]
        if all(paths):
            found[split] = (paths[0], paths[1])  # type: ignore[assignment]
    if missing:
        raise DatasetUnavailableError(
            f"Fashion-MNIST files not found in {source} (missing: {', '.join(missing)}, each as NAME or NAME.gz). "
            f"Install the Debian package: `apt-get install {APT_PACKAGE}` (MIT licence; it puts them in "
            f"{DEFAULT_SOURCE}), or pass --source DIR holding the four IDX files"
        )
    return found


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) -> uint8 array: (N,) labels or (N, 28, 28) images."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:  # 0x08 = unsigned byte, the only type Fashion-MNIST uses
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, body has {body.size} bytes")
    return body.reshape(shape)


def split_indices(labels: np.ndarray, val_per_class: int = VAL_PER_CLASS, seed: int = SPLIT_SEED) -> dict[str, list]:
    """Per class, the official-training-file indices of `train` and `val` in the fixed shuffled order."""
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {"train": [], "val": []}
    for cls in range(len(CLASS_NAMES)):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        out["val"].append(idx[:val_per_class])
        out["train"].append(idx[val_per_class:])
    return out


def load_split_arrays(
    source: Path = DEFAULT_SOURCE, limit_per_class: int | None = None, val_per_class: int = VAL_PER_CLASS
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{split: (images (n, 28, 28) uint8, labels (n,) official index, source index (n,))} for train/val/test."""
    files = source_files(source)
    train_x, train_y = read_idx(files["train"][0]), read_idx(files["train"][1])
    test_x, test_y = read_idx(files["test"][0]), read_idx(files["test"][1])
    per_class = split_indices(train_y, val_per_class)
    per_class["test"] = [np.flatnonzero(test_y == c) for c in range(len(CLASS_NAMES))]
    out = {}
    for split, groups in per_class.items():
        idx = np.concatenate([g[:limit_per_class] if limit_per_class else g for g in groups])
        x, y = (test_x, test_y) if split == "test" else (train_x, train_y)
        out[split] = (x[idx], y[idx], idx)
    return out


def convert(
    out: Path,
    source: Path = DEFAULT_SOURCE,
    limit_per_class: int | None = None,
    force: bool = False,
    val_per_class: int = VAL_PER_CLASS,
) -> dict:
    """Write the ImageFolder tree (see module doc); returns the split summary also saved as split.json.
    `val_per_class` other than the documented 500 is for tests on tiny synthetic IDX files."""
    if (out / "split.json").exists() and not force:
        raise FileExistsError(f"{out} already holds a converted dataset (split.json); pass --force to rewrite it")
    arrays = load_split_arrays(source, limit_per_class, val_per_class)
    for split in arrays:  # a rewrite must not leave images of an earlier, larger conversion behind
        shutil.rmtree(out / split, ignore_errors=True)
    counts: dict[str, int] = {}
    for split, (images, labels, src_idx) in arrays.items():
        prefix = "test" if split == "test" else "train"
        for cls_dir in CLASS_DIRS:
            (out / split / cls_dir).mkdir(parents=True, exist_ok=True)
        for img, lab, i in zip(images, labels, src_idx, strict=True):
            Image.fromarray(img).save(out / split / CLASS_DIRS[lab] / f"{prefix}_{i:05d}.png")
        counts[split] = len(labels)
        logger.info("wrote %d %s images", len(labels), split)
    sorted_dirs = sorted(CLASS_DIRS)  # ImageFolder order: sorted folder names
    (out / "labels.json").write_text(json.dumps({str(i): d for i, d in enumerate(sorted_dirs)}, indent=1) + "\n")
    summary = {
        "dataset": "Fashion-MNIST",
        "licence": LICENCE,
        "apt_package": APT_PACKAGE,
        "source": {s: [str(p) for p in files] for s, files in source_files(source).items()},
        "split_rule": (
            f"val = first {val_per_class} per class of the official training file after a per-class shuffle with "
            f"numpy.random.default_rng({SPLIT_SEED}) (classes in official order); train = the rest; test = t10k"
        ),
        "limit_per_class": limit_per_class,
        "counts": counts,
        "class_dirs_official_order": list(CLASS_DIRS),
        "class_names_official_order": list(CLASS_NAMES),
    }
    (out / "split.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (ImageFolder tree)")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder holding the IDX files")
    parser.add_argument("--limit-per-class", type=int, default=None, help="at most N images per class and split")
    parser.add_argument("--force", action="store_true", help="rewrite an existing conversion")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = convert(args.out, args.source, args.limit_per_class, args.force)
    except (DatasetUnavailableError, FileExistsError) as exc:
        logger.error("%s", exc)
        return 2
    logger.info("done: %s in %s", summary["counts"], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
