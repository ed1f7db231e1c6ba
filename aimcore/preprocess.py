"""The evaluation transform, exactly ml-aim v1's `val_transforms` with no torchvision (AIM_FACTS §4).

EXIF transpose -> RGB -> bicubic resize of the shorter side to ceil(S/0.875) (256 for 224) -> centre crop S ->
/255 -> ImageNet mean/std, as float32 CHW. Each step uses the same arithmetic as torchvision's PIL path (PIL's own
bicubic resize, truncated long side, Python-`round` crop offsets, float32 division), so the output is bit-identical.
One implementation serves training evaluation, export calibration and the service.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PreprocessConfig",
    "center_crop_box",
    "preprocess",
    "preprocess_batch",
    "resize_shorter_side",
    "to_rgb",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessConfig:
    img_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.interpolation != "bicubic":
            raise ValueError(f"only bicubic interpolation is supported (the reference), got {self.interpolation!r}")
        if self.resize_size < self.img_size:
            raise ValueError(f"resize_size {self.resize_size} must be >= img_size {self.img_size}")

    @classmethod
    def for_size(cls, img_size: int) -> PreprocessConfig:
        """The reference ratio: shorter side to ceil(img_size / 0.875) before the crop."""
        return cls(img_size=img_size, resize_size=math.ceil(img_size / 0.875))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean"] = list(self.mean)
        out["std"] = list(self.std)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessConfig:
        return cls(**dict(data))


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation, then convert to 8-bit RGB.

    Most modes go through PIL's `convert("RGB")`, as the reference serving path does (alpha is dropped, palette and
    CMYK are expanded). 16-bit and 32-bit integer grayscale are rescaled to 8 bits first, because PIL's direct
    conversion clips them at 255 and would turn most real 16-bit images white.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.int64)
        scaled = (np.clip(values, 0, 65535) + 128) // 257  # 0..65535 -> 0..255, rounded
        image = Image.fromarray(scaled.astype(np.uint8))
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def resize_shorter_side(width: int, height: int, size: int) -> tuple[int, int]:
    """Output (width, height) when the shorter side goes to `size` and the longer keeps the aspect ratio,
    truncated to an int exactly as torchvision computes it."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centre crop; offsets use Python's round (half to even), as torchvision."""
    if width < size or height < size:
        raise ValueError(f"cannot centre-crop {size}x{size} from {width}x{height}")
    top = round((height - size) / 2.0)
    left = round((width - size) / 2.0)
    return left, top, left + size, top + size


def _resize_crop(image: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    w, h = resize_shorter_side(image.width, image.height, cfg.resize_size)
    if (w, h) != image.size:
        image = image.resize((w, h), Image.Resampling.BICUBIC)
    return image.crop(center_crop_box(w, h, cfg.img_size))


def preprocess(image: Image.Image, config: PreprocessConfig | None = None) -> np.ndarray:
    """PIL image -> float32 (3, S, S), normalised. S = config.img_size (224 by default)."""
    cfg = config or PreprocessConfig()
    rgb = _resize_crop(to_rgb(image), cfg)
    pixels = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)  # (3, S, S) in [0, 255]
    pixels /= np.float32(255.0)
    mean = np.asarray(cfg.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(cfg.std, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((pixels - mean) / std)


def preprocess_batch(images: Sequence[Image.Image], config: PreprocessConfig | None = None) -> np.ndarray:
    """Several PIL images -> float32 (B, 3, S, S)."""
    if not images:
        cfg = config or PreprocessConfig()
        return np.zeros((0, 3, cfg.img_size, cfg.img_size), dtype=np.float32)
    return np.stack([preprocess(img, config) for img in images])
