"""The boot self-check: golden images through the served backend, compared with reference outputs, before ready.

Golden set: K small synthetic photo-like RGB images (fixed seeds, varied sizes and aspect ratios) stored as raw
uint8 pixels, so the check runs the service's own preprocessing (aimcore.preprocess) as well as the backend.

Reference outputs, best first:
1. stored with the model: `<checkpoint>.golden.npz` beside a checkpoint file, or `golden.npz` in a model folder or
   export directory (written by `python -m service golden SOURCE`). The file records the sha256 of the weights it
   was computed from and the preprocessing; a mismatch fails the check (stale reference = unknown model).
2. computed at load from a torch fp32 model at batch 1: the served checkpoint itself (torch backend), or the
   checkpoint an artefact was exported from when it is still here with the same sha256 (ONNX / TensorRT).
3. neither: the served backend at batch 1 (a batch-consistency check only; logged as such).

The check is also the warm-up: the golden images are tiled to the largest batch and run once, so the biggest
allocation happens before ready. Each output row must reach `min_cosine` against its reference, and logits must
agree on the top-1 class wherever the reference's top-2 margin is clear.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from aimcore import AimModel, PreprocessConfig, preprocess, sha256_file
from aimcore.fsio import atomic_write_bytes
from aimcore.manifest import ExportManifest
from service.backends.base import InferenceBackend
from service.native import self_check_preprocess

__all__ = [
    "GOLDEN_FORMAT",
    "GoldenReport",
    "GoldenSet",
    "golden_images",
    "load_golden",
    "make_golden",
    "run_golden_check",
    "save_golden",
]

logger = logging.getLogger(__name__)

GOLDEN_FORMAT = "aim-golden/1"
_SIZES = ((96, 72), (64, 112), (80, 80), (150, 48))  # (width, height): landscape, portrait, square, extreme
_TOP1_MARGIN = 1e-3  # logits closer than this at the top are a tie; any top-1 then is right


def golden_images() -> list[np.ndarray]:
    """K deterministic (H, W, 3) uint8 images: gradients, a few flat shapes and noise, like small photos."""
    out = []
    for seed, (w, h) in enumerate(_SIZES):
        rng = np.random.default_rng(1000 + seed)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h) + 64 * seed], axis=-1)
        for _ in range(3):
            x0, y0 = rng.integers(0, w - 8), rng.integers(0, h - 8)
            img[y0 : y0 + rng.integers(4, h // 2), x0 : x0 + rng.integers(4, w // 2)] = rng.integers(0, 256, 3)
        img += rng.normal(0, 8, img.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


@dataclass
class GoldenSet:
    images: list[np.ndarray]  # K x (H, W, 3) uint8
    outputs: dict[str, np.ndarray]  # output name -> (K, ...) float32 reference
    meta: dict[str, Any] = field(default_factory=dict)
    inputs: np.ndarray | None = None  # (K, 3, S, S) preprocessed pixels, when stored instead of images

    def pixels(self, config: PreprocessConfig) -> np.ndarray:
        """(K, 3, S, S) float32 through the reference transform (or the stored pixels)."""
        if self.inputs is not None:
            return self.inputs
        return np.stack([preprocess(Image.fromarray(img), config) for img in self.images])


@dataclass
class GoldenReport:
    status: str  # "passed", "failed" or "skipped"
    reference: str  # where the reference outputs came from
    min_cosine: dict[str, float] = field(default_factory=dict)
    top1_agreement: float | None = None
    images: int = 0
    batch_size: int = 0
    warmup_s: float = 0.0
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reference": self.reference,
            "min_cosine": {k: round(v, 7) for k, v in self.min_cosine.items()},
            "top1_agreement": self.top1_agreement,
            "images": self.images,
            "batch_size": self.batch_size,
            "warmup_s": round(self.warmup_s, 4),
            "message": self.message,
        }


def _outputs_for(has_head: bool) -> tuple[str, ...]:
    return ("embedding", "pooled", "logits") if has_head else ("embedding",)


@torch.no_grad()
def torch_reference(model: AimModel, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """fp32, one image at a time: the outputs a batch of any size must reproduce."""
    rows: dict[str, list[np.ndarray]] = {}
    device = next(model.parameters()).device
    for p in pixels:
        f = model.features(torch.from_numpy(p[None]).to(device), outputs=("tokens", "pooled", "logits"))
        assert f.tokens is not None
        got = {"embedding": f.tokens.mean(dim=1), "pooled": f.pooled, "logits": f.logits}
        for name, value in got.items():
            if value is not None:
                rows.setdefault(name, []).append(value[0].float().cpu().numpy())
    return {k: np.stack(v) for k, v in rows.items()}


def backend_reference(backend: InferenceBackend, pixels: np.ndarray) -> dict[str, np.ndarray]:
    outputs = _outputs_for(backend.info.has_head)
    rows = [backend.infer(p[None], outputs) for p in pixels]
    return {o: np.concatenate([r[o] for r in rows]) for o in outputs}


def make_golden(model: AimModel, *, weights_sha256: str, preprocess_config: PreprocessConfig) -> GoldenSet:
    images = golden_images()
    probe = GoldenSet(images, {})
    outputs = torch_reference(model, probe.pixels(preprocess_config))
    meta = {
        "format": GOLDEN_FORMAT,
        "weights_sha256": weights_sha256,
        "preprocess": preprocess_config.to_dict(),
        "producer": f"torch {torch.__version__} fp32 batch 1",
        "model": model.config.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return GoldenSet(images, outputs, meta)


def save_golden(golden: GoldenSet, path: str | Path) -> Path:
    arrays: dict[str, np.ndarray] = {f"image_{i}": img for i, img in enumerate(golden.images)}
    arrays |= {f"out_{k}": v.astype(np.float32) for k, v in golden.outputs.items()}
    arrays["meta"] = np.array(json.dumps(golden.meta))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def load_golden(path: str | Path, manifest: ExportManifest | None = None) -> GoldenSet:
    """Our golden file, or the exporter's `reference.npz` (`pixels` plus PyTorch fp32 outputs; its checksum and
    tolerance come from the artefact's manifest)."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as data:
        if "meta" in data.files:
            meta = json.loads(str(data["meta"]))
            if meta.get("format") != GOLDEN_FORMAT:
                raise ValueError(f"{path}: unknown golden format {meta.get('format')!r} (want {GOLDEN_FORMAT})")
            n = sum(1 for k in data.files if k.startswith("image_"))
            images = [data[f"image_{i}"] for i in range(n)]
            outputs = {k[4:]: data[k] for k in data.files if k.startswith("out_")}
            return GoldenSet(images, outputs, meta)
        if "pixels" not in data.files:
            raise ValueError(f"{path} is neither a golden file nor an export reference (no meta, no pixels)")
        inputs = data["pixels"].astype(np.float32)
        outputs = {k: data[k] for k in data.files if k != "pixels"}
    ref = (manifest.reference or {}) if manifest is not None else {}
    if ref.get("sha256") and sha256_file(path) != ref["sha256"]:
        raise ValueError(f"{path} does not match the checksum in its manifest: the reference was altered")
    meta = {
        "format": "export-reference",
        "weights_sha256": manifest.source.get("sha256") if manifest is not None else None,
        "tolerance": ref.get("tolerance", {}),
    }
    return GoldenSet([], outputs, meta, inputs=inputs)


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = (a64 * b64).sum(-1)
    den = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return np.where(den > 0, num / np.maximum(den, 1e-300), (np.abs(a64 - b64).max(-1) == 0).astype(np.float64))


def run_golden_check(
    backend: InferenceBackend,
    golden: GoldenSet,
    *,
    reference: str,
    max_batch: int,
    min_cosine: float,
    outputs: Collection[str] | None = None,
) -> GoldenReport:
    """Warm up at `max_batch` with the golden images tiled, then compare every row with its reference."""
    info = backend.info
    wanted = [o for o in (outputs or _outputs_for(info.has_head)) if o in golden.outputs]
    report = GoldenReport("passed", reference, batch_size=max_batch)
    stored_prep = golden.meta.get("preprocess")
    if stored_prep is not None and PreprocessConfig.from_dict(stored_prep) != self_check_preprocess(info.preprocess):
        report.status, report.message = (
            "failed",
            (f"reference preprocessing {stored_prep} differs from the served {info.preprocess.to_dict()}"),
        )
        return report
    pixels = golden.pixels(self_check_preprocess(info.preprocess))  # (K, 3, S, S); native: the square grid
    k = report.images = len(pixels)
    order = np.arange(max_batch) % k  # row r of the batch holds golden image order[r]
    t0 = time.perf_counter()
    got = backend.infer(pixels[order], wanted)
    report.warmup_s = time.perf_counter() - t0
    problems = []
    for name in wanted:
        ref = golden.outputs[name][order]
        cos = _cosine_rows(got[name], ref)
        report.min_cosine[name] = float(cos.min())
        if not np.all(np.isfinite(got[name])) or cos.min() < min_cosine:
            problems.append(f"{name}: min cosine {cos.min():.6f} < {min_cosine}")
    if "logits" in wanted:
        ref = golden.outputs["logits"][order]
        top2 = np.sort(ref, axis=-1)[:, -2:] if ref.shape[-1] > 1 else np.concatenate([ref, ref - 1], -1)
        clear = (top2[:, 1] - top2[:, 0]) > _TOP1_MARGIN
        agree = got["logits"].argmax(-1) == ref.argmax(-1)
        report.top1_agreement = float(agree[clear].mean()) if clear.any() else 1.0
        if not agree[clear].all():
            problems.append(f"logits: top-1 differs on {int((~agree[clear]).sum())} of {int(clear.sum())} rows")
    if problems:
        report.status, report.message = "failed", "; ".join(problems)
    return report
