"""Labelled image inputs for the probe.

Accepted `--data` forms:
- a split folder: `DIR/train/<class>/*` plus a held-out `DIR/val/<class>/*` (or `DIR/test/`), as the Fashion-MNIST
  converter writes;
- an ImageFolder tree: `DIR/<class>/*`; the held-out split is made here (stratified, seeded, `val_fraction`);
- a list file: one `path<TAB>label` per line (`#` comments and blank lines skipped; relative paths are relative to
  the list file's folder; labels are class names, or integer indices when every label is an integer). Split as for
  an ImageFolder tree.
Classes are indexed in sorted-name order (the ImageFolder convention); integer labels keep their value. A
`labels.json` (index -> name) beside the data, or `--labels`, names integer classes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aimcore import PreprocessConfig, preprocess, to_rgb

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageDataset",
    "LabelledSet",
    "ProbeData",
    "limit_per_class",
    "load_probe_data",
    "read_label_file",
    "write_label_file",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
HELD_OUT_NAMES = ("val", "validation", "test")


@dataclass
class LabelledSet:
    paths: list[Path]
    labels: np.ndarray  # (n,) int64 class indices

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx: Sequence[int] | np.ndarray) -> LabelledSet:
        return LabelledSet([self.paths[i] for i in idx], self.labels[np.asarray(idx, dtype=np.int64)])


@dataclass
class ProbeData:
    train: LabelledSet
    val: LabelledSet
    class_names: list[str]
    description: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ----------------------------------------------------------------------------------------------------------------
# Label files: {"0": "name", ...}
# ----------------------------------------------------------------------------------------------------------------
def write_label_file(path: Path, class_names: Sequence[str]) -> Path:
    path.write_text(json.dumps({str(i): n for i, n in enumerate(class_names)}, indent=1) + "\n")
    return path


def read_label_file(path: Path) -> list[str]:
    """A labels.json object (index -> name), or a text file with one name per line (line number = index)."""
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, list):
            return [str(n) for n in data]
        return [str(data[str(i)]) for i in range(len(data))]
    return [line.strip() for line in text.splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------------------
# Discovery
# ----------------------------------------------------------------------------------------------------------------
def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_folder(root: Path, class_names: list[str] | None = None) -> tuple[LabelledSet, list[str]]:
    dirs = _class_dirs(root)
    if not dirs:
        raise ValueError(f"{root} has no class sub-folders (expected {root}/<class>/<image>)")
    names = class_names or [d.name for d in dirs]
    index = {n: i for i, n in enumerate(names)}
    paths: list[Path] = []
    labels: list[int] = []
    for d in dirs:
        if d.name not in index:
            raise ValueError(f"class folder {d} is not among the training classes {names}")
        found = _images_in(d)
        paths += found
        labels += [index[d.name]] * len(found)
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return LabelledSet(paths, np.asarray(labels, dtype=np.int64)), names


def _list_file(path: Path, class_names: list[str] | None) -> tuple[LabelledSet, list[str]]:
    entries: list[tuple[Path, str]] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 2 or not parts[1].strip():
            raise ValueError(f"{path}:{lineno}: expected 'path<TAB>label', got {line!r}")
        img = Path(parts[0].strip())
        entries.append((img if img.is_absolute() else path.parent / img, parts[1].strip()))
    if not entries:
        raise ValueError(f"list file {path} has no entries")
    raw = [lab for _, lab in entries]
    if all(lab.lstrip("-").isdigit() for lab in raw):
        ints = [int(lab) for lab in raw]
        if min(ints) < 0:
            raise ValueError(f"{path}: negative class index {min(ints)}")
        count = max(ints) + 1
        names = class_names or [str(i) for i in range(count)]
        if len(names) < count:
            raise ValueError(f"{path}: class index {count - 1} but only {len(names)} label names")
        labels = ints
    else:
        names = class_names or sorted(set(raw))
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted(set(raw) - set(index))
        if unknown:
            raise ValueError(f"{path}: labels {unknown[:5]} are not in the label names {names}")
        labels = [index[lab] for lab in raw]
    missing = [str(p) for p, _ in entries if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: {len(missing)} listed images do not exist, e.g. {missing[:3]}")
    return LabelledSet([p for p, _ in entries], np.asarray(labels, dtype=np.int64)), names


def _read_any(path: Path, class_names: list[str] | None) -> tuple[LabelledSet, list[str]]:
    if path.is_file():
        return _list_file(path, class_names)
    if path.is_dir():
        return _image_folder(path, class_names)
    raise FileNotFoundError(f"probe data not found: {path} (expected a class-folder tree or a list file)")


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded shuffle; the first round(fraction * n) (at least 1 when n >= 2) are held out."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        k = max(1, round(val_fraction * len(idx))) if len(idx) >= 2 else 0
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def limit_per_class(data: LabelledSet, limit: int | None, seed: int = 0) -> LabelledSet:
    """At most `limit` images per class, a seeded random choice, kept in the original order."""
    if not limit:
        return data
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(data.labels == c))[:limit] for c in np.unique(data.labels)]
    return data.subset(np.sort(np.concatenate(keep)))


def load_probe_data(
    data: str | os.PathLike[str],
    *,
    val_data: str | os.PathLike[str] | None = None,
    labels_file: str | os.PathLike[str] | None = None,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    train_per_class: int | None = None,
    val_per_class: int | None = None,
) -> ProbeData:
    """Resolve `data` (see module doc) into a train set, a held-out set and the class names."""
    root = Path(data)
    names: list[str] | None = None
    label_path = Path(labels_file) if labels_file else None
    if label_path is None and root.is_dir() and (root / "labels.json").is_file():
        label_path = root / "labels.json"
    if label_path is not None:
        names = read_label_file(label_path)
    held_out = next((root / n for n in HELD_OUT_NAMES if root.is_dir() and (root / n).is_dir()), None)
    if val_data is not None:
        train, names = _read_any(root, names)
        val, _ = _read_any(Path(val_data), names)
        how = f"train {root}, held out {val_data}"
    elif root.is_dir() and (root / "train").is_dir() and held_out is not None:
        train, names = _read_any(root / "train", names)
        val, _ = _read_any(held_out, names)
        how = f"split folders {root}/train and {held_out}"
    else:
        full, names = _read_any(root, names)
        tr, va = stratified_split(full.labels, val_fraction, split_seed)
        train, val = full.subset(tr), full.subset(va)
        how = f"{root}, stratified held-out split {val_fraction:.0%} (seed {split_seed})"
    train = limit_per_class(train, train_per_class, split_seed)
    val = limit_per_class(val, val_per_class, split_seed + 1)
    if len(val) == 0:
        raise ValueError(f"no held-out images from {root}: add a val/ folder or more images per class")
    return ProbeData(train=train, val=val, class_names=list(names), description=how)


# ----------------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------------
class ImageDataset(torch.utils.data.Dataset):
    """(image (3, S, S) float32, label) with the reference eval transform, or a train-time augmentation.

    augment: random resized crop (scale 0.25-1, bicubic) + horizontal flip, then the same /255 and mean/std as
    aimcore.preprocess. The random state is torch's, so seeding torch (and the loader's workers) fixes it.
    """

    def __init__(self, data: LabelledSet, config: PreprocessConfig, augment: bool = False) -> None:
        self.data = data
        self.config = config
        self.augment = augment

    def __len__(self) -> int:
        return len(self.data)

    def _augmented(self, image: Image.Image) -> np.ndarray:
        w, h = image.size
        area = w * h * float(torch.empty(1).uniform_(0.25, 1.0))
        ratio = float(torch.empty(1).uniform_(np.log(3 / 4), np.log(4 / 3)).exp())
        cw, ch = min(w, round((area * ratio) ** 0.5)), min(h, round((area / ratio) ** 0.5))
        left, top = int(torch.randint(0, w - cw + 1, ())), int(torch.randint(0, h - ch + 1, ()))
        size = self.config.img_size
        image = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))
        if bool(torch.rand(()) < 0.5):
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        # Centre crop of an image already at the crop size is the identity, so preprocess only normalises.
        return preprocess(
            image, PreprocessConfig(img_size=size, resize_size=size, mean=self.config.mean, std=self.config.std)
        )

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.data.paths[i]) as img:
            image = to_rgb(img)
        pixels = self._augmented(image) if self.augment else preprocess(image, self.config)
        return torch.from_numpy(pixels), int(self.data.labels[i])
