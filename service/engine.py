"""The served model's life: load (in the background), self-check, serve through the batcher, drain, stop.

Status, as /readyz reports it: "loading" -> "ready" (warmed up at the largest batch and golden-checked) ->
"draining" (SIGTERM: still answering, readiness 503) -> "stopped"; or "failed" with a reason (load error, self-check
failure, dead batcher). Only "ready" admits inference requests... and "draining", which still serves what the load
balancer sends during the grace period.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.admission import Admission
from service.backends import LoadedBackend, create_backend
from service.backends.base import InferenceBackend
from service.batching import BatchResult, DynamicBatcher
from service.decoding import DecodeLimits, ImageDecoder
from service.errors import ImageError, NotReadyError
from service.golden import (
    GoldenReport,
    GoldenSet,
    backend_reference,
    golden_images,
    load_golden,
    make_golden,
    run_golden_check,
)
from service.metrics import ServiceMetrics
from service.native import self_check_preprocess, serving_preprocess
from service.settings import Settings

__all__ = ["Engine", "InferenceResult"]

logger = logging.getLogger(__name__)


def _expected_startup_errors() -> tuple[type[BaseException], ...]:
    from aimcore.checkpoint import CheckpointError
    from aimcore.layouts import LayoutError
    from service.errors import ServiceError
    from service.index.errors import VectorIndexError

    # RuntimeError: the self-check's failure and the backends' "not available here" errors.
    return (CheckpointError, LayoutError, ServiceError, VectorIndexError, RuntimeError, OSError)


@dataclass
class InferenceResult:
    rows: list[dict[str, np.ndarray]]  # per image: output name -> row
    decode_s: float
    batch: BatchResult


class Engine:
    def __init__(self, settings: Settings, metrics: ServiceMetrics, *, backend: InferenceBackend | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self._injected = backend
        self.status = "loading"
        self.reason = "loading the model"
        self.loaded: LoadedBackend | None = None
        self.batcher: DynamicBatcher | None = None
        self.decoder: ImageDecoder | None = None
        self.admission = Admission(self)  # the middleware's pre-body admission (expected wait, body bytes)
        self.golden: GoldenReport | None = None
        self.load_s = 0.0
        self._licence_found: dict[str, Any] | None = None
        self.on_fatal: Callable[[str], None] | None = None  # the CLI exits the process on a failed start
        # Run after the batcher starts and before "ready" (the index opens here: it needs the loaded model's
        # recipe, and readiness must wait for it). A hook that raises fails the start like a load error.
        self.before_ready: list[Callable[[], Awaitable[None]]] = []
        self._load_task: asyncio.Task[None] | None = None
        self._recipes: dict[tuple[str, bool], dict[str, Any]] = {}
        self.describers: dict[str, Callable[[], dict[str, Any]]] = {}  # extra /info sections

    # ----- lifecycle -----
    async def start(self) -> None:
        self._load_task = asyncio.create_task(self._load(), name="aim-load")

    async def wait_loaded(self) -> None:
        if self._load_task is not None:
            await asyncio.shield(self._load_task)

    async def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            loaded = await asyncio.to_thread(self._load_backend)
            self.loaded = loaded
            info = loaded.backend.info
            # Native-resolution checkpoints: the aspect-ratio grids and patch cap the service serves at.
            info.preprocess = serving_preprocess(
                info.preprocess, max_patches=self.settings.max_patches, buckets=self.settings.native_buckets
            )
            self.metrics.model_info.info(
                {
                    "model_id": info.model_id,
                    # One meaning everywhere (the /embed recipe, /info's weights_sha256): the weights' digest, the
                    # same for a checkpoint and its ONNX/TensorRT export. The served file's own digest is named.
                    "model_sha256": str(info.extra.get("weights_sha256") or info.model_sha256),
                    "artifact_sha256": info.model_sha256,
                    "flavor": info.config.name,
                    "backend": info.name,
                    "device": info.device,
                    "precision": info.precision,
                }
            )
            if loaded.selection:
                self._record_selection(loaded.selection)
            self.reason = "warming up and self-checking"
            self.golden = await asyncio.to_thread(self._self_check, loaded)
            self.metrics.golden_ok.set(1 if self.golden.ok else 0)
            if self.golden.min_cosine:
                self.metrics.golden_min_cosine.set(min(self.golden.min_cosine.values()))
            if not self.golden.ok:
                raise RuntimeError(f"self-check failed against {self.golden.reference}: {self.golden.message}")
            s = self.settings
            # The self-check above ran the exact recipe (its references are exact). From here on, the served recipe
            # carries the mode, so /embed's recipe and the index's fingerprint tell fast vectors from exact ones.
            info.preprocess = dataclasses.replace(info.preprocess, fidelity=s.preprocess_mode)
            self.decoder = ImageDecoder(
                info.preprocess,
                DecodeLimits(
                    max_image_pixels=s.max_image_pixels,
                    max_resized_pixels=s.max_resized_pixels,
                    allowed_formats=tuple(s.allowed_formats),
                    jpeg_draft_min_pixels=s.jpeg_draft_min_pixels,
                ),
                workers=s.decode_workers,
                nice=s.worker_nice,
            )
            self.batcher = DynamicBatcher(
                loaded.backend,
                max_batch_size=info.max_batch_size,
                max_wait_s=s.max_wait_ms / 1000,
                max_queue=s.max_queue,
                metrics=self.metrics,
                nice=s.worker_nice,
                stack=self.decoder.stack,
            )
            await self.batcher.start()
            for hook in self.before_ready:
                await hook()
        except Exception as exc:
            self.status, self.reason = "failed", f"{type(exc).__name__}: {exc}"
            # An operator's error (no such model, a backend not installed, an index for another model, a failed
            # self-check) is said in full by its message: a traceback is for bugs. The server's on_fatal logs that
            # one line as it exits, so it is not said twice.
            expected = isinstance(exc, _expected_startup_errors())
            if not (expected and self.on_fatal is not None):
                logger.error("the service cannot become ready: %s", self.reason, exc_info=not expected)
            if self.on_fatal is not None:
                self.on_fatal(self.reason)
            return
        self.load_s = time.perf_counter() - t0
        if self.status == "loading":
            self.status, self.reason = "ready", "ready"
            self.metrics.ready.set(1)
        logger.info(
            "ready in %.1fs: %s on %s (%s), self-check %s (%s)",
            self.load_s,
            info.model_id,
            info.name,
            info.device,
            self.golden.status,
            self.golden.reference,
        )

    def _record_selection(self, selection: dict[str, Any]) -> None:
        for c in selection["candidates"]:
            labels = (c["name"], str(c["eligible"]).lower(), "1" if c["name"] == selection["chosen"] else "0")
            gauge = self.metrics.backend_candidate_rate
            gauge.labels(labels[0], str(selection["max_batch"]), *labels[1:]).set(c["images_per_s"])
            gauge.labels(labels[0], "1", *labels[1:]).set(c["images_per_s_b1"])

    def _load_backend(self) -> LoadedBackend:
        if self._injected is not None:
            return LoadedBackend(self._injected, "backend given to create_app")
        return create_backend(self.settings)

    def _self_check(self, loaded: LoadedBackend) -> GoldenReport:
        """Warm up at the largest batch and compare with reference outputs (see service.golden)."""
        backend = loaded.backend
        info = backend.info
        if not self.settings.golden_check:
            t0 = time.perf_counter()
            s = info.preprocess.img_size
            backend.infer(np.zeros((info.max_batch_size, 3, s, s), np.float32), ["embedding"])
            return GoldenReport(
                "skipped", "golden_check is off", batch_size=info.max_batch_size, warmup_s=time.perf_counter() - t0
            )
        expected = str(info.extra.get("weights_sha256") or info.model_sha256)
        path = loaded.golden_path
        min_cosine = self.settings.golden_min_cosine
        if path is not None and path.is_file():
            golden = load_golden(path, loaded.manifest)
            # An fp16 / int8 artefact states its own (looser) cosine floor in its manifest.
            min_cosine = min(min_cosine, float(golden.meta.get("tolerance", {}).get("min_cosine") or 1.0))
            if golden.meta.get("weights_sha256") != expected:
                return GoldenReport(
                    "failed",
                    f"stored: {path}",
                    message=f"{path} was computed for weights {str(golden.meta.get('weights_sha256'))[:12]}..., "
                    f"the served weights are {expected[:12]}...: regenerate it (python -m service golden SOURCE)",
                )
            reference = f"stored: {path}"
        elif loaded.reference is not None:
            golden = make_golden(
                loaded.reference, weights_sha256=expected, preprocess_config=self_check_preprocess(info.preprocess)
            )
            reference = "torch fp32 at batch 1, computed at load (no stored golden file)"
        else:
            golden = GoldenSet(golden_images(), {})
            golden.outputs = backend_reference(backend, golden.pixels(self_check_preprocess(info.preprocess)))
            reference = "the served backend at batch 1 (batch consistency only: no stored reference, no torch source)"
            logger.warning("self-check: %s", reference)
        return run_golden_check(
            backend,
            golden,
            reference=reference,
            max_batch=info.max_batch_size,
            min_cosine=self.settings.golden_min_cosine,
        )

    def begin_drain(self) -> None:
        """SIGTERM, step 1: readiness turns 503 so load balancers stop sending; requests are still served."""
        if self.status in ("ready", "loading"):
            logger.info("draining: /readyz now answers 503; in-flight and arriving requests are still served")
            self.status, self.reason = "draining", "shutting down"
            self.metrics.ready.set(0)

    async def stop(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        self.status, self.reason = "stopped", "stopped"
        self.metrics.ready.set(0)
        if self.batcher is not None:
            await self.batcher.stop(self.settings.drain_timeout_s)
        if self.decoder is not None:
            self.decoder.close()
        if self.loaded is not None:
            self.loaded.backend.close()

    # ----- state -----
    @property
    def backend(self) -> InferenceBackend:
        if self.loaded is None:
            raise NotReadyError(f"the model is not loaded ({self.reason})", code="not_ready")
        return self.loaded.backend

    @property
    def ready(self) -> bool:
        return self.status == "ready" and self.batcher is not None and self.batcher.alive

    @property
    def alive(self) -> bool:
        """Liveness: false only when the batcher died after start (a restart is the fix)."""
        return self.batcher is None or self.batcher.alive or self.status in ("stopped", "failed")

    def check_serving(self) -> DynamicBatcher:
        if self.status not in ("ready", "draining") or self.batcher is None or self.decoder is None:
            code = {"loading": "not_ready", "failed": "startup_failed"}.get(self.status, "draining")
            raise NotReadyError(
                f"the service is not ready: {self.status} ({self.reason})",
                code=code,
                retry_after_s=5 if self.status == "loading" else 1,
            )
        return self.batcher

    # ----- inference -----
    def admission_precheck(self) -> None:
        """Before the body is read: not ready -> 503, queue already full -> 429 (microseconds, no parsing)."""
        self.check_serving().check_room()

    async def run(
        self, blobs: Sequence[bytes | str] | np.ndarray, outputs: Collection[str], deadline: float
    ) -> InferenceResult:
        """Admit, decode (thread pool), batch and compute n images. Raises ServiceErrors. `blobs` are encoded images,
        or pixels already preprocessed (float32 (n, C, S, S): KServe's FP32 input), which skip decoding."""
        batcher = self.check_serving()
        assert self.decoder is not None
        n, cap = len(blobs), self.settings.max_images_per_request
        if n == 0:
            raise ImageError("no images in the request", code="no_images")
        if n > cap:
            raise ImageError(f"{n} images in one request; the limit is {cap}", code="too_many_images", http_status=413)
        with batcher.admit(n) as reservation:  # 429 here, before any decoding
            if isinstance(blobs, np.ndarray):
                pixels, decode_s = list(blobs), 0.0
            else:
                pixels, decode_s = await self.decoder.decode_all(blobs, deadline)
                self.metrics.decode_seconds.observe(decode_s)
            batch = await batcher.submit(pixels, outputs, deadline, reservation)
        return InferenceResult(batch.rows, decode_s, batch)

    # ----- descriptions -----
    def recipe(self, pooling: str, normalize: bool) -> dict[str, Any]:
        """How vectors of this pooling are made; `fingerprint` matches the index's EmbeddingRecipe."""
        key = (pooling, normalize)
        if key in self._recipes:
            return self._recipes[key]
        info = self.backend.info
        cfg = info.config
        output = "embedding" if pooling == "mean" else "pooled"
        fingerprint = None
        if normalize:
            try:
                from service.index.recipe import EmbeddingRecipe

                fingerprint = EmbeddingRecipe.from_backend(info, output).fingerprint
            except ImportError:  # pragma: no cover - index package absent
                fingerprint = None
        recipe = {
            "model_id": info.model_id,
            "model_sha256": str(info.extra.get("weights_sha256") or info.model_sha256),
            "pooling": pooling,
            "normalize": normalize,
            "layers": [cfg.depth - 1] if pooling == "mean" else list(cfg.probe_layers),
            "norm": "post_trunk_norm, then mean over tokens"
            if pooling == "mean"
            else "mean of the raw probe-layer outputs, then the head's attention pooling",
            "dim": cfg.embed_dim,
            "preprocess": info.preprocess.to_dict(),
            "attention": "bidirectional",
            "backend": info.name,
            "precision": info.precision,
            "fingerprint": fingerprint,
        }
        if output in info.extra.get("poolings", {}):  # a LiT image tower: its projected vector, not a trunk mean
            recipe |= {"pooling": info.extra["poolings"][output], "dim": info.extra["output_dims"][output]}
            recipe["norm"] = info.extra["recipe_norms"][output]
        self._recipes[key] = recipe
        return recipe

    def _licence(self) -> dict[str, Any]:
        """The served weights' licence (aimcore.licence), looked up once."""
        if self._licence_found is None:
            from aimcore.licence import licence_of

            cfg = self.loaded.backend.info.config
            self._licence_found = licence_of(self.settings.model, cfg.name, family=getattr(cfg, "family", "aim"))
        return self._licence_found

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "reason": self.reason, "settings": self.settings.public_dict()}
        if self.loaded is None:
            return out
        info = self.loaded.backend.info
        cfg = info.config
        out |= {
            "model": {
                "id": info.model_id,
                "sha256": info.model_sha256,
                "weights_sha256": info.extra.get("weights_sha256") or info.model_sha256,
                "flavor": cfg.name,
                "config": cfg.to_dict(),
                "has_head": info.has_head,
                "num_classes": cfg.num_classes,
                "labels": len(info.labels) if info.labels else None,
                "preprocess": info.preprocess.to_dict(),
                "preprocess_mode": info.preprocess.fidelity,
                "licence": self._licence(),
                "warnings": self.loaded.warnings,
            },
            "backend": {
                "name": info.name,
                "device": info.device,
                "precision": info.precision,
                "max_batch_size": info.max_batch_size,
                "why": self.loaded.reason,
                "selection": self.loaded.selection,
                "extra": {k: v for k, v in info.extra.items() if k != "weights_sha256"},
            },
            "self_check": self.golden.to_dict() if self.golden else None,
            "load_seconds": round(self.load_s, 3),
            "recipes": {p: self.recipe(p, True) for p in (("mean", "probe") if info.has_head else ("mean",))},
        }
        out |= {name: describe() for name, describe in self.describers.items()}  # e.g. "text" (LiT)
        if self.batcher is not None:
            out["batching"] = {
                "queue_depth": self.batcher.queue_depth,
                "admitted": self.batcher.admitted,
                "batches_run": self.batcher.batches_run,
            }
        return out
