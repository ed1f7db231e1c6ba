"""Where the exported weights came from, and how to get the same PyTorch model back to re-check an artefact.

manifest["source"] = {
    "checkpoint": what was asked for (a path, a folder, a flavor or hub id), or null for an in-memory model,
    "files": [{"path": str, "sha256": str}, ...] the weight files actually read, in load order,
    "sha256": the weights' identity: the file's sha256 for one file; for several (a released backbone + head),
              sha256 of their hex digests joined by "\n" in load order; for an in-memory model, `state_dict_sha256`,
    "state_dict_sha256": (in-memory only) sha256 over every tensor's name, dtype, shape and bytes,
}
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch

from aimcore import AimConfig, AimModel, PreprocessConfig, load_model, sha256_file

__all__ = [
    "SourceMismatchError",
    "describe_source",
    "load_source_model",
    "model_preprocess",
    "state_dict_sha256",
]

logger = logging.getLogger(__name__)


class SourceMismatchError(RuntimeError):
    """The checkpoint on disk is not the one an artefact was exported from."""


def state_dict_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d tensors as 1-d
    return digest.hexdigest()


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a weights file, remembered while its size and mtime stay the same (exporting three variants of a
    7B checkpoint should not hash 28 GB three times)."""
    return sha256_file(path)


def _combined_sha256(digests: list[str]) -> str:
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def describe_source(model: AimModel, requested: str | os.PathLike[str] | None) -> dict[str, Any]:
    """The manifest's `source` for a model loaded by `load_model(requested)` (or built in memory)."""
    files = [Path(f) for f in getattr(model, "checkpoint_files", [])]
    if requested is None or not files:
        digest = state_dict_sha256(model)
        return {"checkpoint": None, "files": [], "sha256": digest, "state_dict_sha256": digest}
    entries = []
    for f in files:
        stat = f.stat()
        entries.append(
            {"path": str(f.resolve()), "sha256": _file_sha256(str(f.resolve()), stat.st_size, stat.st_mtime_ns)}
        )
    return {
        "checkpoint": str(requested),
        "files": entries,
        "sha256": _combined_sha256([e["sha256"] for e in entries]),
    }


def model_preprocess(model: AimModel) -> PreprocessConfig:
    return getattr(model, "preprocess_config", None) or PreprocessConfig.for_size(model.config.img_size)


def load_source_model(
    source: dict[str, Any], config: dict[str, Any], checkpoint: str | os.PathLike[str] | None = None
) -> AimModel:
    """Reload the PyTorch model an artefact came from and prove it is the same weights.

    checkpoint overrides the recorded location (the files moved, or the artefact came from an in-memory model).
    The recorded config is passed to the loader so probe layers and head match what was exported.
    """
    where = checkpoint if checkpoint is not None else source.get("checkpoint")
    if where is None:
        raise SourceMismatchError(
            "this artefact was exported from an in-memory model; pass the checkpoint it came from "
            "(`python -m export validate DIR --checkpoint FILE`)"
        )
    model = load_model(where, AimConfig.from_dict(config))
    if source.get("state_dict_sha256") is not None:
        found = state_dict_sha256(model)
        expected = source["state_dict_sha256"]
    else:
        found = describe_source(model, where)["sha256"]
        expected = source.get("sha256")
    if found != expected:
        raise SourceMismatchError(
            f"checkpoint {where} has weights sha256 {found}, but the artefact was exported from {expected}: "
            "parity against different weights means nothing; pass the original checkpoint"
        )
    logger.info("reloaded source %s (sha256 %s)", where, found[:12])
    return model
