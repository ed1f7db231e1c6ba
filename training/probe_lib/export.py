"""The trained head as a file aimcore loads, and the proof that it does.

The file is our self-describing safetensors with only `head.*` keys, in the released layout: `head.cls_token`
(1, 1, D), `head.k.weight` / `head.v.weight` (D, D), `head.linear.weight` (C, D) [+ `head.linear.bias` (C,)],
`head.bn.running_mean` / `running_var` (D,), `head.bn.num_batches_tracked` (). Its metadata carries the config (with
the probe layers and class count), the preprocessing, the labels and provenance, so
`aimcore.load_model(trunk, head=<file>)` builds the classifier.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import aimcore
from aimcore import AimModel
from aimcore.checkpoint import CheckpointError
from aimcore.heads import AttentionPoolingClassifier

__all__ = ["HEAD_FILE", "save_head", "verify_head_file"]

logger = logging.getLogger(__name__)

HEAD_FILE = "head.safetensors"  # "head" in the name: aimcore's folder loader takes it as the head file


def save_head(
    trunk: AimModel,
    head: AttentionPoolingClassifier,
    path: Path,
    class_names: list[str],
    provenance: dict[str, Any],
) -> Path:
    """Write `head` beside no trunk weights: a meta-device shell model carries the config, only head.* is saved."""
    config = trunk.config.replace(num_classes=len(class_names), head_linear_bias=head.linear.bias is not None)
    shell = aimcore.build_model(config, device="meta")
    shell.head = copy.deepcopy(head).to("cpu").eval()  # a copy: the caller's head stays on its device
    prep = getattr(trunk, "preprocess_config", None) or aimcore.PreprocessConfig.for_size(config.img_size)
    return aimcore.save_checkpoint(
        shell, path, provenance=provenance, preprocess=prep, labels=list(class_names), include_trunk=False
    )


def verify_head_file(
    trunk_source: str | os.PathLike[str],
    head_path: Path,
    images: Tensor,
    expected_logits: Tensor,
    *,
    config: str | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Load trunk + head through aimcore.load_model, classify `images` (B, 3, S, S) and compare with the probe's own
    logits (B, C). Returns {"ok", "max_abs_diff", "tolerance", ...}; a source that cannot take a separate head
    (e.g. a merged file that already has one) is reported, not raised."""
    try:
        model = aimcore.load_model(trunk_source, config, head=head_path, device=device)
    except CheckpointError as exc:
        logger.warning(
            "head round trip skipped: aimcore.load_model(%s, head=%s) failed: %s", trunk_source, head_path, exc
        )
        return {"ok": None, "skipped": str(exc)}
    with torch.no_grad():
        logits = model(images.to(device)).float().cpu()
    diff = float((logits - expected_logits).abs().max()) if len(logits) else 0.0
    # The same float32 weights and inputs; only the batch composition differs, so a few ulps of the logit scale.
    tolerance = 1e-4 * max(1.0, float(expected_logits.abs().max()))
    agree = float((logits.argmax(-1) == expected_logits.argmax(-1)).float().mean()) if len(logits) else 1.0
    result = {
        "ok": diff <= tolerance,
        "max_abs_diff": diff,
        "tolerance": tolerance,
        "argmax_agreement": agree,
        "images": len(images),
        "labels_in_file": getattr(model, "labels", None) is not None,
    }
    log = logger.info if result["ok"] else logger.error
    log("head round trip through aimcore.load_model: max |logit diff| %.2e (tolerance %.1e)", diff, tolerance)
    return result
