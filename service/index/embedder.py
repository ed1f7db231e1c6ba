"""Embedding images for the offline builder through the service's own path: the backend `create_backend` picks
and the `DynamicBatcher` every endpoint shares, so the builder's vectors are bit-for-bit what the service computes
(same preprocessing, batching, bisect-on-failure), and so carry the same recipe.

The batcher is asyncio-based; the builder drives it from a private event loop: one submit per image (each with its
own admission slot) so one image failing in the backend fails alone, and the batcher coalesces them into batches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from aimcore import PreprocessConfig, preprocess
from service.backends.base import InferenceBackend
from service.index.recipe import OUTPUT_POOLING, EmbeddingRecipe

__all__ = ["DecodedImage", "ImageEmbedder", "decode_image"]

logger = logging.getLogger(__name__)

DEADLINE_S = 3600.0  # offline: no client is waiting, only a stuck backend should ever hit this


class DecodedImage:
    __slots__ = ("error", "height", "pixels", "width")

    def __init__(self, pixels: np.ndarray | None, width: int = 0, height: int = 0, error: str | None = None):
        self.pixels = pixels
        self.width = width
        self.height = height
        self.error = error


def decode_image(path: Path, config: PreprocessConfig) -> DecodedImage:
    """Decode and preprocess one file; a corrupt, truncated or unsupported file becomes an error, not a raise."""
    try:
        with Image.open(path) as image:
            image.load()  # decode fully now: truncated files fail here, not later
            width, height = image.size
            pixels = preprocess(image, config)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return DecodedImage(None, error=f"{type(exc).__name__}: {exc}")
    return DecodedImage(pixels, width, height)


class ImageEmbedder:
    """`embed(pixels)` -> one vector or exception per image, through a DynamicBatcher over `backend`."""

    def __init__(
        self,
        backend: InferenceBackend,
        *,
        output: str = "embedding",
        max_batch_size: int | None = None,
        max_wait_s: float = 0.005,
        decode_workers: int = 2,
    ) -> None:
        from service.batching import DynamicBatcher  # the service's own batcher (imports prometheus_client)

        if output not in OUTPUT_POOLING:
            raise ValueError(f"output must be one of {sorted(OUTPUT_POOLING)}, got {output!r}")
        self.backend = backend
        self.output = output
        self.recipe = EmbeddingRecipe.from_backend(backend.info, output)
        self.batch_size = max_batch_size or backend.info.max_batch_size
        self._loop = asyncio.new_event_loop()
        self._decoder = ThreadPoolExecutor(max_workers=decode_workers, thread_name_prefix="index-decode")

        async def make() -> DynamicBatcher:
            batcher = DynamicBatcher(backend, max_batch_size=self.batch_size, max_wait_s=max_wait_s, max_queue=1 << 20)
            await batcher.start()
            return batcher

        self._batcher = self._loop.run_until_complete(make())

    @property
    def preprocess_config(self) -> PreprocessConfig:
        return self.backend.info.preprocess

    def decode(self, paths: Sequence[Path]) -> list[DecodedImage]:
        cfg = self.preprocess_config
        return list(self._decoder.map(lambda p: decode_image(p, cfg), paths))

    def embed(self, pixels: Sequence[np.ndarray]) -> list[np.ndarray | BaseException]:
        """Raw (not normalised) vectors (D,), or the exception for an image the backend failed on."""
        return self._loop.run_until_complete(self._embed(pixels))

    async def _embed(self, pixels: Sequence[np.ndarray]) -> list[np.ndarray | BaseException]:
        deadline = time.monotonic() + DEADLINE_S

        async def one(p: np.ndarray) -> np.ndarray:
            reservation = self._batcher.admit(1)
            result = await self._batcher.submit([p], [self.output], deadline, reservation)
            return result.rows[0][self.output]

        return list(await asyncio.gather(*(one(p) for p in pixels), return_exceptions=True))

    def close(self) -> None:
        try:
            self._loop.run_until_complete(self._batcher.stop())
        finally:
            self._loop.close()
            self._decoder.shutdown(wait=True)
