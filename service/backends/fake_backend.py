"""A deterministic stand-in backend for tests and server-overhead benchmarks (no model, no torch).

embedding[i] = the first `dim` values of image i's flattened pixels (so distinct images give distinct vectors);
pooled = embedding[::-1]; logits = the first `num_classes` values of embedding. `delay_s` sleeps per call (a
"compute" time), `poison` makes an input fail (to test bisection), and `calls` records every batch size.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection

import numpy as np

from aimcore import AimConfig, PreprocessConfig, get_flavor
from service.backends.base import BackendInfo

__all__ = ["FakeBackend"]


class FakeBackend:
    def __init__(
        self,
        config: AimConfig | None = None,
        *,
        delay_s: float = 0.0,
        poison: Callable[[np.ndarray], bool] | None = None,
        max_batch_size: int = 32,
    ) -> None:
        config = config or get_flavor("aim-debug")
        self.info = BackendInfo(
            name="fake",
            model_id=f"fake-{config.name}",
            model_sha256="0" * 64,
            config=config,
            preprocess=PreprocessConfig.for_size(config.img_size),
            labels=[f"class_{i}" for i in range(config.num_classes)] if config.has_head else None,
            max_batch_size=max_batch_size,
        )
        self.delay_s = delay_s
        self.poison = poison
        self.calls: list[int] = []
        self._lock = threading.Lock()
        self.closed = False

    def infer(self, pixels: np.ndarray, outputs: Collection[str]) -> dict[str, np.ndarray]:
        with self._lock:
            self.calls.append(len(pixels))
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.poison is not None and any(self.poison(p) for p in pixels):
            raise RuntimeError("poisoned input in batch")
        flat = pixels.reshape(len(pixels), -1).astype(np.float32)
        dim = self.info.config.embed_dim
        emb = np.resize(flat, (len(pixels), dim)) if flat.shape[1] < dim else flat[:, :dim].copy()
        out = {"embedding": emb, "pooled": emb[:, ::-1].copy(), "logits": emb[:, : self.info.config.num_classes]}
        return {k: out[k] for k in outputs}

    def close(self) -> None:
        self.closed = True
