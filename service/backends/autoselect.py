"""Pick the serving backend by measuring the candidates on this machine, at start (issue 13).

Which path is fastest depends on the CPU: the bundled int8 ONNX export was the fastest on an AMD machine without
native bf16, while on AMX / AVX512-BF16 CPUs torch bf16 can be 1.6-2.2x faster at batch >= 8. So with
`backend=auto` (and `autoselect` on) every candidate available for the model is built and measured:
- torch fp32, and torch bf16 where the device runs bf16 natively (AVX512-BF16 / AMX CPU, or a bf16 GPU);
- ONNX Runtime on each ONNX export present for the model (the bundled int8 one for aim-demo), on its GPU providers
  when there is a GPU.
Each candidate must pass, on the golden images (service.golden):
1. accuracy: every output row within `min_cosine` (0.999) of torch fp32 at batch 1;
2. batch invariance: an image's embedding alone and inside a busy batch (largest batch, and an odd size) agree to
   `INVARIANCE_TOL` (max abs difference of the L2-normalised vectors). Retrieval, dedup and caches rely on an
   image having one vector. Dynamic int8 quantisation computes activation scales per batch, so it fails here and is
   only served when pinned (`backend=onnxruntime`);
and is timed at the largest batch and at batch 1, in interleaved rounds (best of 3) within `autoselect_seconds`.
The fastest passing candidate at the largest batch is served; the others are released (with a single passing
candidate nothing is timed). `/info` (backend.selection) and the metric `aim_backend_candidate_images_per_second`
say what was measured and why the winner won.

Several workers (`workers > 1`, service.server) make one choice: the parent names a private directory
(`AIM_WORKERS_SHARED_DIR`); the first worker to take its file lock measures and writes the choice there, the others
wait on the lock (so they never all measure at once on a small machine), then build and check only the chosen
candidate, and serve it even where their own timing might have differed. `/info` backend.selection.shared says
which worker measured.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from aimcore import AimModel, PreprocessConfig, preprocess
from aimcore.manifest import ExportManifest
from service.backends.base import InferenceBackend
from service.backends.torch_backend import TorchBackend, cpu_has_fast_bf16
from service.golden import _cosine_rows, golden_images, torch_reference
from service.settings import Settings

try:
    import fcntl
except ImportError:  # Windows: no flock; each worker measures on its own
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "INVARIANCE_TOL",
    "SHARED_DIR_ENV",
    "Candidate",
    "Measurement",
    "Selection",
    "check",
    "select_backend",
    "torch_candidates",
]

logger = logging.getLogger(__name__)

# Max abs difference between an image's L2-normalised embedding alone and inside a busy batch.
INVARIANCE_TOL = 1e-6
TIMING_ROUNDS = 3
# Set by the multi-worker parent (service.server): where the first worker leaves its choice for the others.
SHARED_DIR_ENV = "AIM_WORKERS_SHARED_DIR"
SHARED_FILE = "autoselect.json"


@dataclass
class Candidate:
    name: str  # e.g. "torch-bf16", "onnxruntime-int8"
    build: Callable[[], InferenceBackend]
    directory: Path | None = None  # the export directory of an ONNX candidate
    manifest: ExportManifest | None = None


@dataclass
class Measurement:
    name: str
    images_per_s: float = 0.0  # at the largest batch
    images_per_s_b1: float = 0.0
    min_cosine: float = 0.0  # over outputs and golden images, against torch fp32 at batch 1
    invariance: float = float("inf")  # max abs difference alone vs in busy batches (normalised embeddings)
    eligible: bool = False
    why: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for k in ("images_per_s", "images_per_s_b1", "seconds"):
            out[k] = round(out[k], 2)
        out["min_cosine"] = round(self.min_cosine, 7)
        out["invariance"] = float(f"{self.invariance:.3g}")
        return out


@dataclass
class Selection:
    chosen: str
    max_batch: int
    measurements: list[Measurement]
    seconds: float
    shared: dict[str, Any] | None = None  # several workers: who measured, and that this one reused the choice

    def to_dict(self) -> dict[str, Any]:
        out = {
            "chosen": self.chosen,
            "rule": f"fastest at batch {self.max_batch} among candidates with cosine >= min_cosine to torch fp32 "
            f"and batch invariance <= {INVARIANCE_TOL:g}",
            "max_batch": self.max_batch,
            "seconds": round(self.seconds, 2),
            "candidates": [m.to_dict() for m in self.measurements],
        }
        if self.shared is not None:
            out["shared"] = self.shared
        return out


def _normalised(v: np.ndarray) -> np.ndarray:
    v64 = v.astype(np.float64)
    return v64 / np.maximum(np.linalg.norm(v64, axis=-1, keepdims=True), 1e-12)


def _rate(backend: InferenceBackend, x: np.ndarray, seconds: float) -> float:
    """Images/s of backend.infer(x) over about `seconds` (at least two calls after one warm-up)."""
    backend.infer(x, ["embedding"])
    calls, t0 = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - t0 < seconds:
        backend.infer(x, ["embedding"])
        calls += 1
    return calls * len(x) / (time.perf_counter() - t0)


def batch_invariance(backend: InferenceBackend, pixels: np.ndarray, max_batch: int) -> float:
    """pixels: (K, 3, S, S) golden images. Max abs difference between image 0's normalised embedding alone and at
    a middle row of a full batch and of an odd-sized batch of other images and noise."""
    rng = np.random.default_rng(0)
    alone = _normalised(backend.infer(pixels[:1], ["embedding"])["embedding"][0])
    worst = 0.0
    for size in sorted({max_batch, max(1, min(max_batch, 7))}):
        if size == 1:
            continue
        busy = rng.normal(0.0, 1.0, (size, *pixels.shape[1:])).astype(np.float32)  # (size, 3, S, S)
        others = pixels[1 : 1 + size]
        busy[: len(others)] = others
        row = size // 2
        busy[row] = pixels[0]
        got = _normalised(backend.infer(busy, ["embedding"])["embedding"][row])
        worst = max(worst, float(np.abs(got - alone).max()))
    return worst


def check(
    backend: InferenceBackend,
    name: str,
    pixels: np.ndarray,
    reference: dict[str, np.ndarray],
    *,
    max_batch: int,
    min_cosine: float,
) -> Measurement:
    """Accuracy and batch invariance of one built candidate (timing comes after, interleaved with the others).
    pixels: (K, 3, S, S); reference: torch fp32 batch-1 outputs per output name, (K, ...)."""
    t0 = time.perf_counter()
    m = Measurement(name)
    outputs = list(reference)
    got = backend.infer(pixels, outputs)
    m.min_cosine = min(float(_cosine_rows(got[o], reference[o]).min()) for o in outputs)
    m.invariance = batch_invariance(backend, pixels, max_batch)
    problems = []
    if not m.min_cosine >= min_cosine:
        problems.append(f"cosine {m.min_cosine:.6f} < {min_cosine}")
    if not m.invariance <= INVARIANCE_TOL:
        problems.append(f"not batch-invariant ({m.invariance:.2g} > {INVARIANCE_TOL:g})")
    m.eligible = not problems
    m.why = "; ".join(problems) or "passes"
    m.seconds = time.perf_counter() - t0
    return m


def torch_candidates(model: AimModel, settings: Settings, device: str, model_id: str, **kw: Any) -> list[Candidate]:
    """torch fp32, plus bf16 where it runs natively; a pinned precision (not auto) leaves only that one."""
    if settings.precision != "auto":
        precisions = [settings.precision]
    elif device.startswith("cuda"):
        precisions = ["fp32", "bf16"] if torch.cuda.is_bf16_supported() else ["fp32", "fp16"]
    else:
        precisions = ["fp32", "bf16"] if cpu_has_fast_bf16() else ["fp32"]

    def make(p: str) -> Callable[[], InferenceBackend]:
        return lambda: TorchBackend(
            model, model_id=model_id, device=device, precision=p, max_batch_size=settings.max_batch_size, **kw
        )

    return [Candidate(f"torch-{p}", make(p)) for p in precisions]


def onnx_candidate(directory: Path, manifest: ExportManifest, settings: Settings) -> Candidate:
    def build() -> InferenceBackend:
        from service.backends.onnx_backend import OnnxBackend

        return OnnxBackend(
            directory, device=settings.device, max_batch_size=settings.max_batch_size, threads=settings.torch_threads
        )

    return Candidate(f"onnxruntime-{manifest.precision}", build, directory, manifest)


def select_backend(
    candidates: list[Candidate], reference_model: AimModel, settings: Settings
) -> tuple[Candidate, InferenceBackend, Selection]:
    """Build and measure every candidate; return the winner (built) and what was measured. Raises RuntimeError
    when none passes. Under a multi-worker parent the choice is made once and shared (module docstring)."""
    shared = os.environ.get(SHARED_DIR_ENV)
    if shared and fcntl is not None and Path(shared).is_dir():
        return _select_shared(Path(shared), candidates, reference_model, settings)
    return _measure_all(candidates, reference_model, settings)


def _select_shared(
    root: Path, candidates: list[Candidate], reference_model: AimModel, settings: Settings
) -> tuple[Candidate, InferenceBackend, Selection]:
    """The first worker under the lock measures and writes the choice; later ones serve it. A worker that dies
    while measuring releases the lock with its process, and the next one measures instead."""
    t0 = time.perf_counter()
    choice_file = root / SHARED_FILE
    with open(root / "autoselect.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (or the process dies)
        if not choice_file.is_file():
            cand, backend, selection = _measure_all(candidates, reference_model, settings)
            selection.shared = {"role": "measured", "measured_by_pid": os.getpid(), "pid": os.getpid()}
            tmp = choice_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"pid": os.getpid(), "selection": selection.to_dict()}))
            os.replace(tmp, choice_file)  # readers never see half a file
            return cand, backend, selection
        stored = json.loads(choice_file.read_text())
    chosen = stored["selection"]["chosen"]
    cand = next((c for c in candidates if c.name == chosen), None)
    if cand is None:
        raise RuntimeError(f"the shared backend choice {chosen!r} is not a candidate in this worker")
    pixels, reference = _golden_inputs(reference_model)
    backend = cand.build()
    m = check(
        backend, cand.name, pixels, reference, max_batch=settings.max_batch_size, min_cosine=settings.golden_min_cosine
    )
    if not m.eligible:
        backend.close()
        raise RuntimeError(f"the shared backend choice {chosen} fails in this worker: {m.why}")
    fields = set(Measurement.__dataclass_fields__)
    measured = [Measurement(**{k: v for k, v in d.items() if k in fields}) for d in stored["selection"]["candidates"]]
    logger.info("autoselect: serving %s, measured by worker %d (checked here: %s)", chosen, stored["pid"], m.why)
    selection = Selection(chosen, settings.max_batch_size, measured, time.perf_counter() - t0)
    selection.shared = {"role": "reused", "measured_by_pid": stored["pid"], "pid": os.getpid()}
    return cand, backend, selection


def _golden_inputs(reference_model: AimModel) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The golden images preprocessed for the model, (K, 3, S, S), and torch fp32 batch-1 outputs on them."""
    pre = getattr(reference_model, "preprocess_config", None) or PreprocessConfig.for_size(
        reference_model.config.img_size
    )
    if pre.mode == "native":
        # A native-resolution encoder gives each golden image its own grid, which cannot stack into one batch: time
        # and compare the candidates on the model's default square grid instead (same weights, same kernels).
        size = reference_model.config.img_size
        pre = replace(pre, mode="resize_crop", resize_size=max(pre.resize_size, size), img_size=size)
    pixels = np.stack([preprocess(Image.fromarray(img), pre) for img in golden_images()])  # (K, 3, S, S)
    return pixels, torch_reference(reference_model, pixels)


def _measure_all(
    candidates: list[Candidate], reference_model: AimModel, settings: Settings
) -> tuple[Candidate, InferenceBackend, Selection]:
    t0 = time.perf_counter()
    pixels, reference = _golden_inputs(reference_model)
    max_batch = settings.max_batch_size
    measurements: list[Measurement] = []
    built: list[tuple[Candidate, InferenceBackend, Measurement]] = []
    for cand in candidates:
        try:
            backend = cand.build()
        except Exception as exc:  # a candidate that cannot even load is skipped, with its reason
            measurements.append(Measurement(cand.name, why=f"cannot load: {type(exc).__name__}: {exc}"))
            continue
        m = check(backend, cand.name, pixels, reference, max_batch=max_batch, min_cosine=settings.golden_min_cosine)
        measurements.append(m)
        built.append((cand, backend, m))
    # Timing in interleaved rounds, best of each: on a shared machine a neighbour's burst then slows one round of
    # every candidate instead of all the rounds of one.
    full = pixels[np.arange(max_batch) % len(pixels)]  # (max_batch, 3, S, S)
    slot = settings.autoselect_seconds / max(1, TIMING_ROUNDS * len(built))
    # With fewer than two passing candidates there is nothing to choose: no timing (rates stay 0 in /info).
    rounds = TIMING_ROUNDS if sum(m.eligible for _, _, m in built) >= 2 else 0
    for _ in range(rounds):
        for _cand, backend, m in built:
            t0_c = time.perf_counter()
            m.images_per_s = max(m.images_per_s, _rate(backend, full, slot * 0.7))
            m.images_per_s_b1 = max(m.images_per_s_b1, _rate(backend, pixels[:1], slot * 0.3))
            m.seconds += time.perf_counter() - t0_c
    best: tuple[Candidate, InferenceBackend, Measurement] | None = None
    for cand, backend, m in built:
        logger.info(
            "autoselect %s: %.1f img/s at batch %d, %.1f at batch 1, cosine %.6f, invariance %.2g: %s",
            m.name, m.images_per_s, max_batch, m.images_per_s_b1, m.min_cosine, m.invariance, m.why,
        )  # fmt: skip
        if m.eligible and (best is None or m.images_per_s > best[2].images_per_s):
            best = (cand, backend, m)
    for _cand, backend, _m in built:
        if best is None or backend is not best[1]:
            backend.close()
    if best is None:
        raise RuntimeError(
            "no backend candidate passed the start-up checks: " + "; ".join(f"{m.name}: {m.why}" for m in measurements)
        )
    selection = Selection(best[0].name, max_batch, measurements, time.perf_counter() - t0)
    return best[0], best[1], selection
