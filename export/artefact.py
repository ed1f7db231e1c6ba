"""What every artefact directory holds besides the graph: golden reference outputs and the manifest.

<dir>/model.onnx | model.plan      the artefact
<dir>/model.onnx.data              external weights (ONNX over 2 GB only)
<dir>/reference.npz                golden inputs and PyTorch fp32 outputs, for a backend self-check at start-up
<dir>/manifest.json                written last: its presence marks a complete, checked artefact
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aimcore import AimModel, sha256_file
from aimcore.fsio import atomic_write_bytes
from aimcore.manifest import MANIFEST_NAME
from export.parity import TOLERANCES, torch_reference

__all__ = ["REFERENCE_NAME", "clear_manifest", "make_readable", "write_reference"]

logger = logging.getLogger(__name__)

REFERENCE_NAME = "reference.npz"
_REFERENCE_IMAGES = 4


def clear_manifest(directory: Path) -> None:
    """Remove a previous manifest before writing a new artefact, so a failed export never leaves a manifest that
    describes files it did not check."""
    (directory / MANIFEST_NAME).unlink(missing_ok=True)


def make_readable(directory: Path) -> None:
    """Add group and other read permission to the artefact's files: some writers (temp files renamed into place,
    onnx's external data) leave 0600, and a serving container running as another user must read the artefact."""
    for path in directory.iterdir():
        if path.is_file():
            path.chmod(path.stat().st_mode | 0o044)


def write_reference(
    directory: Path, model: AimModel, outputs: Sequence[str], precision: str, images: np.ndarray, seed: int
) -> dict[str, Any]:
    """Write reference.npz: `pixels` (k, C, S, S) = up to 4 real images then one random row, and PyTorch fp32
    `<output>` arrays (k, ...). Returns the manifest's `reference` section (file, checksum, rows, tolerance)."""
    cfg = model.config
    rng = np.random.default_rng(seed)
    random_row = rng.standard_normal((1, cfg.num_channels, cfg.img_size, cfg.img_size), dtype=np.float32)
    pixels = np.concatenate([images[:_REFERENCE_IMAGES], random_row]).astype(np.float32)
    arrays = {"pixels": pixels, **torch_reference(model, outputs, pixels)}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    path = atomic_write_bytes(directory / REFERENCE_NAME, buffer.getvalue())
    return {
        "file": REFERENCE_NAME,
        "sha256": sha256_file(path),
        "rows": int(pixels.shape[0]),
        "real_images": int(min(len(images), _REFERENCE_IMAGES)),
        "arrays": sorted(arrays),
        "tolerance": TOLERANCES[precision].to_dict(),
    }
