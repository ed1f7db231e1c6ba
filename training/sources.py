"""Small data: a folder (recursive) or a list file becomes a sorted list of `Sample`s.

The data order, the validation split and the resume position depend only on the data, never on the file
system's listing order. WebDataset shards (`detect_format` -> "wds") are never listed per sample: they go through
training/shards.py (a manifest of shards and counts, wids random access).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["IMAGE_EXTENSIONS", "Sample", "list_samples", "read_bytes", "split_validation"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
LIST_EXTENSIONS = (".txt", ".lst", ".list", ".csv")


@dataclass(frozen=True)
class Sample:
    """One image file: a stable key and its path."""

    key: str
    path: str


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def detect_format(path: str) -> str:
    """folder | list | wds (tar shards, brace patterns, `::` lists, URLs, wids .json descriptors)."""
    if "{" in path or "::" in path or path.endswith((".tar", ".json")) or "://" in path or path.startswith("pipe:"):
        return "wds"
    p = Path(path)
    if p.is_file():
        return "list" if p.suffix.lower() in LIST_EXTENSIONS else "wds" if tarfile.is_tarfile(p) else "list"
    if p.is_dir():
        entries = list(p.iterdir())
        has_tar = any(e.suffix == ".tar" for e in entries)
        has_images = any(_is_image(e.name) or e.is_dir() for e in entries)
        return "wds" if has_tar and not has_images else "folder"
    raise FileNotFoundError(f"data path {path!r} does not exist")


def _list_folder(root: Path) -> list[Sample]:
    samples = []
    for dirpath, _dirs, files in os.walk(root, followlinks=True):
        for name in files:
            if _is_image(name):
                full = os.path.join(dirpath, name)
                samples.append(Sample(key=os.path.relpath(full, root), path=full))
    return samples


def _list_file(list_path: Path) -> list[Sample]:
    """One image path per line, relative to the list file's folder unless absolute; '#' starts a comment."""
    samples = []
    for line in list_path.read_text().splitlines():
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        full = entry if os.path.isabs(entry) else str(list_path.parent / entry)
        samples.append(Sample(key=entry, path=full))
    return samples


def list_samples(path: str, fmt: str = "auto") -> list[Sample]:
    """All images under `path`, sorted by key. `fmt`: auto | folder | list."""
    if not path:
        raise ValueError("no data path: pass --data <folder | list.txt | shards.tar>")
    kind = detect_format(path) if fmt == "auto" else fmt
    if kind == "folder":
        samples = _list_folder(Path(path))
    elif kind == "list":
        samples = _list_file(Path(path))
    else:
        raise ValueError(f"data format {kind!r} is not listed per sample; use training.shards for WebDataset")
    samples.sort(key=lambda s: s.key)
    if not samples:
        raise ValueError(f"no images found in {path!r} (format {kind}); extensions read: {IMAGE_EXTENSIONS}")
    logger.info("data %s (%s): %d images", path, kind, len(samples))
    return samples


def split_validation(samples: list[Sample], fraction: float) -> tuple[list[Sample], list[Sample]]:
    """(train, val) by a stable hash of each key: adding images never moves an old one across the split. At least
    one image goes to validation when `fraction` > 0, and at least one stays for training."""
    if fraction <= 0:
        return samples, []

    def unit(sample: Sample) -> float:
        return int.from_bytes(hashlib.sha1(sample.key.encode()).digest()[:8], "big") / 2**64

    scores = [unit(s) for s in samples]
    val = [s for s, u in zip(samples, scores, strict=True) if u < fraction]
    if not val and len(samples) > 1:
        val = [samples[min(range(len(samples)), key=scores.__getitem__)]]
    val_keys = {s.key for s in val}
    train = [s for s in samples if s.key not in val_keys]
    if not train:
        raise ValueError(f"data.val_fraction={fraction} leaves no training images; lower it")
    return train, val


def read_bytes(sample: Sample) -> bytes:
    """The encoded image bytes of a file."""
    with open(sample.path, "rb") as fh:
        return fh.read()
