"""AIM's training augmentation with PIL and numpy (no torchvision), AIM_FACTS §7:

    RandomResizedCrop(S, scale=(0.4, 1.0), ratio=(3/4, 4/3), bicubic) -> RandomHorizontalFlip(0.5)
    -> RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p=0.8) -> ToTensor -> Normalize(ImageNet mean, std)

Each step follows torchvision's PIL code path (crop-box sampling with 10 tries then a ratio-clamped centre crop,
PIL bicubic resize, ImageEnhance for brightness/contrast/saturation, a uint8 shift of the HSV hue channel, the four
jitter ops in a random order). Randomness comes only from the numpy Generator passed in, so an image's
augmentation is a pure function of the generator's key (see data.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance

from aimcore.preprocess import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["AugmentConfig", "augment", "color_jitter", "random_resized_crop_box", "to_normalized_array"]

_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32)


@dataclass(frozen=True)
class AugmentConfig:
    img_size: int = 224
    crop_scale: tuple[float, float] = (0.4, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip_p: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    color_jitter_p: float = 0.8


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(left, top, crop_w, crop_h) as torchvision's RandomResizedCrop.get_params draws it."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    # Fallback: the largest centre crop whose aspect ratio is inside `ratio`.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _adjust_hue(image: Image.Image, hue: float) -> Image.Image:
    """Rotate the hue by `hue` turns (in [-0.5, 0.5]) through an 8-bit HSV round trip, like torchvision's PIL path."""
    h, s, v = image.convert("HSV").split()
    shift = np.uint8(int(hue * 255) % 256)  # torchvision casts hue*255 to uint8: truncate, then wrap
    np_h = np.asarray(h, dtype=np.uint8) + shift  # uint8 arithmetic wraps around, i.e. the hue is circular
    return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")


def color_jitter(
    image: Image.Image, strengths: tuple[float, float, float, float], rng: np.random.Generator
) -> Image.Image:
    """ColorJitter(brightness, contrast, saturation, hue): factors drawn uniformly, ops applied in random order."""
    b, c, s, h = strengths
    order = rng.permutation(4)
    brightness = rng.uniform(max(0.0, 1 - b), 1 + b) if b > 0 else None
    contrast = rng.uniform(max(0.0, 1 - c), 1 + c) if c > 0 else None
    saturation = rng.uniform(max(0.0, 1 - s), 1 + s) if s > 0 else None
    hue = rng.uniform(-h, h) if h > 0 else None
    for op in order:
        if op == 0 and brightness is not None:
            image = ImageEnhance.Brightness(image).enhance(brightness)
        elif op == 1 and contrast is not None:
            image = ImageEnhance.Contrast(image).enhance(contrast)
        elif op == 2 and saturation is not None:
            image = ImageEnhance.Color(image).enhance(saturation)
        elif op == 3 and hue is not None:
            image = _adjust_hue(image, hue)
    return image


def to_normalized_array(image: Image.Image) -> np.ndarray:
    """RGB PIL image -> float32 (3, H, W): /255 then ImageNet mean/std, as ToTensor + Normalize."""
    pixels = np.asarray(image, dtype=np.uint8).astype(np.float32) / np.float32(255.0)  # (H, W, 3)
    return np.ascontiguousarray(((pixels - _MEAN) / _STD).transpose(2, 0, 1))


def augment(image: Image.Image, config: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """RGB PIL image -> float32 (3, S, S) augmented, normalised training input."""
    left, top, w, h = random_resized_crop_box(image.width, image.height, config.crop_scale, config.crop_ratio, rng)
    size = config.img_size
    image = image.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)
    if rng.random() < config.hflip_p:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < config.color_jitter_p:
        image = color_jitter(image, config.color_jitter, rng)
    return to_normalized_array(image)
