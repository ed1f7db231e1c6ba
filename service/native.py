"""Native-resolution serving (AIMv2 `aimv2-large-patch14-native`, issue 11).

The checkpoint's preprocessing says `mode="native"`. The service then keeps each image's aspect ratio, caps its
patch count at `settings.max_patches` (0: the checkpoint's own cap, the default grid's 256 patches for the
released native encoder) and, with `settings.native_buckets` (default on), snaps it to one of a few grids: for
each aspect ratio 1:1, 4:3, 3:2, 16:9, 2:1 and its transpose, the largest grid within max_patches (9 grids). An
image becomes the grid nearest its aspect ratio (log ratio), so shapes stretch by at most ~9 % and requests of mixed
shapes still batch (the batcher runs one backend call per grid present in a batch). docs/BENCHMARKS.md has the
measurement. Fixed-resolution models are untouched.
"""

from __future__ import annotations

import dataclasses
import logging
import math

from aimcore import PreprocessConfig
from aimcore.config import MAX_NATIVE_PATCHES
from aimcore.preprocess import aspect_buckets

__all__ = ["self_check_preprocess", "serving_preprocess"]

logger = logging.getLogger(__name__)


def serving_preprocess(prep: PreprocessConfig, *, max_patches: int, buckets: bool) -> PreprocessConfig:
    """The recipe the service applies to a native checkpoint's images (returned unchanged for fixed ones)."""
    if prep.mode != "native":
        return prep
    cap = max_patches or prep.max_patches
    if cap > MAX_NATIVE_PATCHES:
        raise ValueError(f"max_patches {cap} is more than the native encoder's maximum {MAX_NATIVE_PATCHES}")
    grids = aspect_buckets(cap) if buckets else ()
    # resize_size is unused by native resizing; the decoder reads it as the side its JPEG draft must keep (x2) and
    # for the aspect-ratio guard, so make it the side of the square grid at this cap.
    side = max(prep.img_size, math.isqrt(cap) * prep.patch_size)
    served = dataclasses.replace(prep, max_patches=cap, grid_buckets=grids, resize_size=side)
    logger.info("native resolution: at most %d patches, grid buckets %s", cap, list(grids) or "off (own grid)")
    return served


def self_check_preprocess(prep: PreprocessConfig) -> PreprocessConfig:
    """The boot self-check stacks its reference images in one batch: for a native recipe, only the square bucket
    (the same weights and arithmetic as every other grid, one shape)."""
    if prep.mode != "native":
        return prep
    square = max(g for g in (prep.grid_buckets or aspect_buckets(prep.max_patches)) if g[0] == g[1])
    return dataclasses.replace(prep, grid_buckets=(square,))
