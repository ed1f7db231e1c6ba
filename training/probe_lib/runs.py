"""Reading a pre-training run directory: its trunk checkpoints, their steps and their validation losses.

Expected layout (flexible; every rule below has an override in training/evidence.py):

    RUN/metrics.jsonl                 JSON lines; those with "step" and "val_loss" are used (other lines skipped)
    RUN/**/*.safetensors              trunk checkpoints (ours: aimcore.save_checkpoint), e.g. RUN/checkpoints/
                                      step_00000500/trunk.safetensors or RUN/trunks/step_000500.safetensors

Files with "head", "optim" or "decoder" in their name are not trunks and are skipped. A checkpoint's step is its
provenance metadata's "step" when present, else the last integer in its path relative to RUN. Its validation loss
is the metrics line with the same step, else the provenance's "val_loss", else the nearest logged step (with a
warning naming the gap). Two files with the same step (e.g. the run's final RUN/trunk.safetensors and
its last step folder) count once: the shallower path is kept.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunCheckpoint", "find_checkpoints", "read_val_losses"]

logger = logging.getLogger(__name__)

_NOT_TRUNK = ("head", "optim", "decoder")


@dataclass
class RunCheckpoint:
    path: Path
    step: int
    val_loss: float | None


def read_val_losses(path: Path, key: str = "val_loss") -> dict[int, float]:
    """{step: loss} from a JSON-lines file; later lines win for a repeated step."""
    out: dict[int, float] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s:%d is not JSON; skipped", path, lineno)
            continue
        if isinstance(record, dict) and record.get(key) is not None and record.get("step") is not None:
            out[int(record["step"])] = float(record[key])
    return out


def _provenance(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
    try:
        return json.loads(meta.get("provenance", "{}")) or {}
    except json.JSONDecodeError:
        return {}


def _step_from_path(rel: Path) -> int | None:
    numbers = re.findall(r"\d+", str(rel.with_suffix("")))
    return int(numbers[-1]) if numbers else None


def find_checkpoints(
    run_dir: Path,
    *,
    pattern: str = "**/*.safetensors",
    metrics_file: Path | None = None,
    loss_key: str = "val_loss",
) -> list[RunCheckpoint]:
    """The run's trunk checkpoints sorted by step, each with its validation loss (None when none is known)."""
    files = sorted(p for p in run_dir.glob(pattern) if p.is_file() and not any(w in p.name.lower() for w in _NOT_TRUNK))
    metrics_file = metrics_file or next(iter(sorted(run_dir.rglob("metrics.jsonl"))), None)
    losses = read_val_losses(metrics_file, loss_key) if metrics_file else {}
    found: list[RunCheckpoint] = []
    for path in files:
        prov = _provenance(path)
        step = prov.get("step")
        step = int(step) if step is not None else _step_from_path(path.relative_to(run_dir))
        if step is None:
            logger.warning("no step for %s (no provenance 'step', no number in its path); skipped", path)
            continue
        loss = losses.get(step, prov.get(loss_key))
        if loss is None and losses:
            nearest = min(losses, key=lambda s: (abs(s - step), s))
            if nearest != step:
                logger.warning("%s: no %s logged at step %d; using step %d's", path.name, loss_key, step, nearest)
            loss = losses[nearest]
        found.append(RunCheckpoint(path=path, step=step, val_loss=None if loss is None else float(loss)))
    found.sort(key=lambda c: (c.step, len(c.path.parts)))
    unique: list[RunCheckpoint] = []
    for c in found:  # e.g. RUN/trunk.safetensors (final export) and RUN/checkpoints/step_N/trunk.safetensors
        if unique and unique[-1].step == c.step:
            logger.warning("step %d: %s and %s; probing only the first", c.step, unique[-1].path, c.path)
            continue
        unique.append(c)
    return unique
