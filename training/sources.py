"""Where training images come from: a folder (recursive), a list file, or WebDataset tar shards.

Every source becomes a sorted list of `Sample`s (a stable key plus where the bytes live), so the data order, the
validation split and the resume position depend only on the data, never on the file system's listing order.
Tar shards are indexed once with the standard library's `tarfile` (member offsets and sizes) and read later by
`os.pread`, so any worker can read any sample without sharing a file position.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["IMAGE_EXTENSIONS", "Sample", "list_samples", "read_bytes", "split_validation"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
LIST_EXTENSIONS = (".txt", ".lst", ".list", ".csv")


@dataclass(frozen=True)
class Sample:
    """One image. `offset`/`size` locate a tar member's bytes inside `path`; -1 means `path` is the image file."""

    key: str
    path: str
    offset: int = -1
    size: int = -1


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _expand_braces(pattern: str) -> list[str]:
    """WebDataset-style numeric ranges: `shard-{000..009}.tar` -> 10 names (zero padding kept)."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not match:
        return [pattern]
    lo, hi = match.group(1), match.group(2)
    width = len(lo)
    out: list[str] = []
    for i in range(int(lo), int(hi) + 1):
        out.extend(_expand_braces(pattern[: match.start()] + str(i).zfill(width) + pattern[match.end() :]))
    return out


def _shard_paths(path: str) -> list[str]:
    names: list[str] = []
    for pattern in _expand_braces(path):
        if os.path.isdir(pattern):
            names.extend(sorted(glob.glob(os.path.join(pattern, "*.tar"))))
        elif any(ch in pattern for ch in "*?["):
            names.extend(sorted(glob.glob(pattern)))
        else:
            names.append(pattern)
    return names


def _detect_format(path: str) -> str:
    if "{" in path or path.endswith(".tar") or ("*" in path and ".tar" in path):
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


def _index_tar(shard: str) -> list[Sample]:
    """Index one shard. WebDataset groups files by key (the name up to the first dot of the basename); the first
    image member of each key, in IMAGE_EXTENSIONS order, is that sample's image."""
    best: dict[str, tuple[int, tarfile.TarInfo]] = {}
    with tarfile.open(shard, "r:") as tar:  # uncompressed: members must be addressable by offset
        for member in tar:
            if not member.isfile() or not _is_image(member.name):
                continue
            directory, base = os.path.split(member.name)
            key = os.path.join(directory, base.split(".", 1)[0])
            rank = IMAGE_EXTENSIONS.index(os.path.splitext(member.name)[1].lower())
            if key not in best or rank < best[key][0]:
                best[key] = (rank, member)
    return [
        Sample(key=f"{os.path.basename(shard)}/{key}", path=shard, offset=m.offset_data, size=m.size)
        for key, (_, m) in best.items()
    ]


def list_samples(path: str, fmt: str = "auto") -> list[Sample]:
    """All images under `path`, sorted by key. `fmt`: auto | folder | list | wds."""
    if not path:
        raise ValueError("no data path: pass --data <folder | list.txt | shards.tar>")
    kind = _detect_format(path) if fmt == "auto" else fmt
    if kind == "folder":
        samples = _list_folder(Path(path))
    elif kind == "list":
        samples = _list_file(Path(path))
    elif kind == "wds":
        shards = _shard_paths(path)
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing or not shards:
            raise FileNotFoundError(f"WebDataset shards not found for {path!r}: {missing[:3] or 'no .tar files'}")
        samples = [s for shard in shards for s in _index_tar(shard)]
    else:
        raise ValueError(f"unknown data format {fmt!r}; use auto, folder, list or wds")
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


_FDS: dict[tuple[int, str], int] = {}


def read_bytes(sample: Sample) -> bytes:
    """The encoded image bytes. Tar members are read with pread on a per-process descriptor."""
    if sample.offset < 0:
        with open(sample.path, "rb") as fh:
            return fh.read()
    key = (os.getpid(), sample.path)
    fd = _FDS.get(key)
    if fd is None:
        fd = os.open(sample.path, os.O_RDONLY)
        _FDS[key] = fd
    data = os.pread(fd, sample.size, sample.offset)
    if len(data) != sample.size:
        raise OSError(f"short read of {sample.key} in {sample.path}: {len(data)} of {sample.size} bytes")
    return data
