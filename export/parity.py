"""Parity of an exported artefact against PyTorch fp32 eager: the inputs, the metrics and the tolerances.

Metrics, per output and per check (batch of inputs):
- max_rel_err = max |got - ref| / max |ref|: the largest error relative to the output's scale (an element-wise
  ratio explodes on values near zero and says nothing about the embedding);
- min_cosine / mean_cosine: row-wise cosine similarity of got vs ref;
- on real images with logits, top1_agreement: share of images whose arg-max class is unchanged.
Tolerances: fp32 max_rel_err <= 1e-4 on every output and every check; reduced precisions min_cosine on every output
(fp16 0.999, bf16 0.995, int8 0.99), their max_rel_err and top-1 agreement recorded for the user to judge.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from aimcore import AimModel, PreprocessConfig, preprocess
from aimcore.manifest import OUTPUT_LOGITS
from export.graph import ContractGraph

__all__ = [
    "TOLERANCES",
    "ParityError",
    "Tolerance",
    "compare_outputs",
    "default_image_paths",
    "load_images",
    "parity_inputs",
    "run_parity",
    "torch_reference",
]

logger = logging.getLogger(__name__)

Runner = Callable[[np.ndarray], Mapping[str, np.ndarray]]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# The repository's real encoded test images (JPEG/PNG, odd sizes, EXIF, palette, CMYK...), when present.
_REPO_IMAGES = Path(__file__).resolve().parents[1] / "tests" / "assets" / "images"


class ParityError(RuntimeError):
    """An artefact disagrees with PyTorch beyond its stated tolerance."""


@dataclass(frozen=True)
class Tolerance:
    max_rel_err: float | None = None
    min_cosine: float | None = None

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_rel_err=1e-4),
    "fp16": Tolerance(min_cosine=0.999),
    "bf16": Tolerance(min_cosine=0.995),
    "int8": Tolerance(min_cosine=0.99),
}


def default_image_paths(directory: str | os.PathLike[str] | None = None) -> list[Path]:
    """Real images for parity: `directory`, else $AIM_PARITY_IMAGES, else the repository's tests/assets/images."""
    chosen = directory or os.environ.get("AIM_PARITY_IMAGES") or _REPO_IMAGES
    folder = Path(chosen)
    if not folder.is_dir():
        if directory is not None:
            raise FileNotFoundError(f"parity image folder not found: {folder}")
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def load_images(paths: Sequence[Path], config: PreprocessConfig) -> np.ndarray:
    """Decode and preprocess exactly as the service does: float32 (n, 3, S, S)."""
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            arrays.append(preprocess(image, config))
    if not arrays:
        return np.zeros((0, 3, config.img_size, config.img_size), dtype=np.float32)
    return np.stack(arrays)


def parity_inputs(
    config_channels: int, img_size: int, max_batch: int, images: np.ndarray, seed: int
) -> dict[str, np.ndarray]:
    """Named input batches: fresh N(0, 1) pixels and real images, each at batch 1 and at max_batch (the real images
    repeated in turn to fill it)."""
    rng = np.random.default_rng(seed)
    shape = (config_channels, img_size, img_size)
    batches = {
        "random_b1": rng.standard_normal((1, *shape), dtype=np.float32),
        f"random_b{max_batch}": rng.standard_normal((max_batch, *shape), dtype=np.float32),
    }
    if len(images):
        batches["images_b1"] = images[:1]
        batches[f"images_b{max_batch}"] = images[np.arange(max_batch) % len(images)]
    return batches


@torch.inference_mode()
def torch_reference(model: AimModel, outputs: Sequence[str], pixels: np.ndarray) -> dict[str, np.ndarray]:
    """PyTorch fp32 eager outputs of the unmodified model (the real BatchNorm, not the export rewrite)."""
    graph = ContractGraph(model.eval(), outputs)
    result = graph(torch.from_numpy(pixels))
    return {name: t.numpy() for name, t in zip(outputs, result, strict=True)}


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    denom = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return (a64 * b64).sum(axis=1) / np.maximum(denom, 1e-30)


def compare_outputs(got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per-output figures; raises ParityError on a missing output, a shape change or a non-finite value."""
    figures: dict[str, dict[str, float]] = {}
    for name, r in ref.items():
        if name not in got:
            raise ParityError(f"artefact did not return output {name!r}")
        g = np.asarray(got[name], dtype=np.float32)
        if g.shape != r.shape:
            raise ParityError(f"output {name!r} has shape {g.shape}, PyTorch gives {r.shape}")
        if not np.isfinite(g).all():
            raise ParityError(f"output {name!r} holds NaN or Inf")
        err = np.abs(g.astype(np.float64) - r.astype(np.float64))
        cos = _cosine(g, r)
        figures[name] = {
            "max_abs_err": float(err.max()),
            "max_rel_err": float(err.max() / max(np.abs(r).max(), 1e-30)),
            "min_cosine": float(cos.min()),
            "mean_cosine": float(cos.mean()),
        }
    return figures


def _violations(check: str, figures: Mapping[str, Mapping[str, float]], tol: Tolerance) -> list[str]:
    bad = []
    for name, f in figures.items():
        if tol.max_rel_err is not None and not f["max_rel_err"] <= tol.max_rel_err:
            bad.append(f"{check}/{name}: max_rel_err {f['max_rel_err']:.3g} > {tol.max_rel_err:g}")
        if tol.min_cosine is not None and not f["min_cosine"] >= tol.min_cosine:
            bad.append(f"{check}/{name}: min_cosine {f['min_cosine']:.6f} < {tol.min_cosine:g}")
    return bad


def run_parity(
    run: Runner,
    model: AimModel,
    outputs: Sequence[str],
    precision: str,
    *,
    max_batch: int,
    images: np.ndarray,
    seed: int | None = None,
    raise_on_failure: bool = True,
) -> dict[str, Any]:
    """Run `run` (artefact) and PyTorch on the parity inputs; return the manifest's parity section.

    images: preprocessed real images (n, 3, S, S), n may be 0 (then only random inputs are checked, and the
    section says so). Raises ParityError listing every violation unless raise_on_failure is False.
    """
    tol = TOLERANCES[precision]
    seed = secrets.randbits(31) if seed is None else seed  # fresh inputs each run; the seed is recorded
    cfg = model.config
    batches = parity_inputs(cfg.num_channels, cfg.img_size, max_batch, images, seed)
    checks: dict[str, Any] = {}
    failures: list[str] = []
    worst: dict[str, dict[str, float]] = {}
    for check, pixels in batches.items():
        ref = torch_reference(model, outputs, pixels)
        figures = compare_outputs(run(pixels), ref)
        checks[check] = {"batch": int(pixels.shape[0]), **figures}
        failures += _violations(check, figures, tol)
        for name, f in figures.items():
            w = worst.setdefault(name, {"max_rel_err": 0.0, "min_cosine": 1.0})
            w["max_rel_err"] = max(w["max_rel_err"], f["max_rel_err"])
            w["min_cosine"] = min(w["min_cosine"], f["min_cosine"])
    section: dict[str, Any] = {
        "tolerance": tol.to_dict(),
        "seed": seed,
        "checks": checks,
        "worst": worst,
        "real_images": _real_image_figures(run, model, outputs, images),
        "passed": not failures,
    }
    if failures:
        section["failures"] = failures
        message = f"{precision} parity against PyTorch fp32 failed: " + "; ".join(failures)
        if raise_on_failure:
            raise ParityError(message)
        logger.error("%s", message)
    return section


def _real_image_figures(run: Runner, model: AimModel, outputs: Sequence[str], images: np.ndarray) -> dict[str, Any]:
    """Accuracy cost on the real images, once each: cosine per output and, with logits, top-1 agreement."""
    if not len(images):
        return {"count": 0, "note": "no real images available; random inputs only"}
    ref = torch_reference(model, outputs, images)
    got = run(images)
    out: dict[str, Any] = {"count": len(images)}
    for name, r in ref.items():
        cos = _cosine(np.asarray(got[name], dtype=np.float32), r)
        out[f"{name}_min_cosine"] = float(cos.min())
        out[f"{name}_mean_cosine"] = float(cos.mean())
    if OUTPUT_LOGITS in ref:
        same = np.asarray(got[OUTPUT_LOGITS]).argmax(axis=1) == ref[OUTPUT_LOGITS].argmax(axis=1)
        out["top1_agreement"] = float(same.mean())
        out["top1_changed"] = int((~same).sum())
    return out
