"""Bytes -> model pixels, with limits checked before any pixel is decoded.

Per image, in a worker thread (Pillow releases the GIL while decoding and resizing, so several threads overlap each
other and the model's compute):
1. base64 (JSON inputs; `data:image/...;base64,` prefixes accepted) -> bytes;
2. sniff the format from the magic bytes; only the allow-list (default JPEG, PNG, WEBP) is ever opened;
3. `Image.open` parses the header only: width x height above `max_image_pixels` is refused here, so a 427 KiB PNG
   that claims 12,500 x 12,000 costs microseconds, not a 450 MB decode; sizes whose shorter-side resize would
   exceed `max_resized_pixels` (extreme aspect ratios such as 1 x 100,000) are refused too;
4. JPEGs above `jpeg_draft_min_pixels` decode at a reduced DCT scale (1/2, 1/4, 1/8) that keeps the shorter side
   >= 2 x the resize target: 2-4x faster on 2-12 MP photos and close to the exact transform (the resize after it
   is still the reference bicubic); smaller JPEGs and all other formats decode exactly;
5. `aimcore.preprocess`: EXIF orientation, palette / grayscale / CMYK / 16-bit / alpha -> RGB, resize, crop,
   normalise -> float32 (3, S, S).
With `preprocess_mode=fast` (the recipe's `fidelity="fast"`), steps 4-5 are aimcore's fast mode instead: any JPEG at
least 2x the resize target decodes at a reduced DCT scale, one resample takes the crop box to S, and the decoder
returns uint8 (3, S, S); `stack` normalises a whole batch at once in the compute thread, right before the backend.
Every refusal is an ImageError naming the image (images[i]), the problem and a stable code.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from aimcore import PreprocessConfig, preprocess
from aimcore.preprocess import normalize, pixels_uint8, resize_shorter_side
from service.errors import DeadlineExceededError, ImageError
from service.priority import lower_thread_priority

__all__ = ["DecodeLimits", "ImageDecoder", "sniff_format", "stack_pixels"]

logger = logging.getLogger(__name__)

# Magic bytes -> Pillow format name, to name a refused format without handing the bytes to its decoder.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG2000"),
    (b"qoif", "QOI"),
)


def sniff_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:12] in (b"ftypavif", b"ftypheic", b"ftypheix", b"ftypmif1"):
        return "AVIF/HEIF"
    return next((name for magic, name in _MAGIC if data.startswith(magic)), None)


@dataclass(frozen=True)
class DecodeLimits:
    max_image_pixels: int = 40_000_000
    max_resized_pixels: int = 16_000_000
    allowed_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP")
    jpeg_draft_min_pixels: int = 2_000_000


def _b64(text: str, index: int) -> bytes:
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or ";base64" not in head:
            raise ImageError("data URI must be base64 (data:image/...;base64,...)", code="invalid_base64", index=index)
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"not valid base64 ({exc})", code="invalid_base64", index=index) from None


class ImageDecoder:
    def __init__(
        self, preprocess_config: PreprocessConfig, limits: DecodeLimits, workers: int = 2, nice: int = 0
    ) -> None:
        self.config = preprocess_config
        self.limits = limits
        self.workers = workers
        self.per_image_s = 0.0  # EWMA of one image's decode + preprocess seconds (admission's rate estimate)
        self._pool = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="aim-decode", initializer=lower_thread_priority(nice)
        )
        if limits.max_image_pixels <= (Image.MAX_IMAGE_PIXELS or 0):
            # Our own cap refuses such images before decoding; Pillow's bomb warning would only be log noise.
            warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def fast(self) -> bool:
        return self.config.fidelity == "fast"

    def stack(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """The batcher's hook: this decoder's pixels (and any float32 ones) -> the backend's float32 batch."""
        return stack_pixels(pixels, self.config)

    # ----- one image (worker thread) -----
    def decode_one(self, data: bytes | str, index: int = 0) -> np.ndarray:
        """One encoded image (bytes, or base64 text) -> float32 (3, S, S); fast mode: uint8 (3, S, S), not yet
        normalised (`stack`)."""
        t0 = time.perf_counter()
        try:
            return self._decode_one(data, index)
        finally:
            # A plain float store: racing threads may lose an update, never corrupt it.
            took = time.perf_counter() - t0
            self.per_image_s = took if not self.per_image_s else 0.9 * self.per_image_s + 0.1 * took

    def _decode_one(self, data: bytes | str, index: int) -> np.ndarray:
        if isinstance(data, str):
            data = _b64(data, index)
        if not data:
            raise ImageError("empty image (0 bytes)", code="empty_image", index=index)
        allowed = self.limits.allowed_formats
        fmt = sniff_format(data)
        if fmt is not None and fmt not in allowed:
            raise ImageError(
                f"{fmt} images are not accepted (allowed: {', '.join(allowed)})",
                code="unsupported_format",
                http_status=415,
                index=index,
            )
        try:
            image = Image.open(io.BytesIO(data), formats=list(allowed))
        except Image.DecompressionBombError as exc:
            raise ImageError(str(exc), code="image_too_large", http_status=413, index=index) from None
        except UnidentifiedImageError:
            raise ImageError(
                f"not a readable image ({len(data)} bytes starting {data[:8].hex()}); expected {', '.join(allowed)}",
                code="not_an_image",
                index=index,
            ) from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(
                f"cannot read this {fmt or 'image'} file: {exc} (truncated or damaged data)",
                code="corrupt_image",
                index=index,
            ) from None
        with image:
            self._check_size(image, index)
            try:
                if self.fast:  # drafts by itself, to the resize target rather than 2x it
                    return pixels_uint8(image, self.config)
                self._maybe_draft(image)
                return preprocess(image, self.config)
            except (OSError, SyntaxError, ValueError, EOFError) as exc:
                # Pillow's words for truncated data ("image file is truncated", "broken data stream", ...)
                raise ImageError(
                    f"cannot decode this {image.format} image: {exc} (truncated or damaged data)",
                    code="corrupt_image",
                    index=index,
                ) from None

    def _check_size(self, image: Image.Image, index: int) -> None:
        w, h = image.size
        if w < 1 or h < 1:
            raise ImageError(f"image has no pixels ({w}x{h})", code="corrupt_image", index=index)
        cap = self.limits.max_image_pixels
        if w * h > cap:
            raise ImageError(
                f"{w}x{h} = {w * h / 1e6:.1f} MP exceeds the {cap / 1e6:g} MP limit (read from the header; nothing "
                "was decoded). Downscale it before sending",
                code="image_too_large",
                http_status=413,
                index=index,
            )
        rw, rh = resize_shorter_side(w, h, self.config.resize_size)
        if rw * rh > self.limits.max_resized_pixels:
            raise ImageError(
                f"{w}x{h} has an extreme aspect ratio: resizing its shorter side to {self.config.resize_size} gives "
                f"{rw}x{rh} ({rw * rh / 1e6:.1f} MP > {self.limits.max_resized_pixels / 1e6:g} MP)",
                code="image_aspect_ratio",
                index=index,
            )

    def _maybe_draft(self, image: Image.Image) -> None:
        threshold = self.limits.jpeg_draft_min_pixels
        if image.format != "JPEG" or not threshold or image.width * image.height <= threshold:
            return
        target = 2 * self.config.resize_size  # the DCT scale keeps both sides >= this
        if min(image.size) >= 2 * target:
            image.draft(None, (target, target))

    # ----- a request's images (event loop) -----
    async def decode_all(self, blobs: Sequence[bytes | str], deadline: float) -> tuple[list[np.ndarray], float]:
        """Decode every image in the thread pool; returns (pixels, seconds). Raises the first image's error."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        futures = [loop.run_in_executor(self._pool, self.decode_one, blob, i) for i, blob in enumerate(blobs)]
        try:
            pixels = await asyncio.wait_for(asyncio.gather(*futures), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise DeadlineExceededError("deadline passed while decoding the images", stage="decode") from None
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        return list(pixels), time.perf_counter() - t0


def stack_pixels(pixels: Sequence[np.ndarray], config: PreprocessConfig) -> np.ndarray:
    """(C, S, S) images -> float32 (B, C, S, S) for the backend. uint8 images (fast preprocessing) are normalised
    here, once for the whole stack; float32 ones (already normalised: exact mode, KServe's FP32 tensors) pass as
    they are. Both kinds may share a batch."""
    if all(p.dtype == np.uint8 for p in pixels):
        return normalize(np.stack(pixels), config)
    return np.stack([normalize(p, config) if p.dtype == np.uint8 else p for p in pixels])
