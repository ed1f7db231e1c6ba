"""Atomic, step-exact training checkpoints.

Layout under `<run dir>/checkpoints/`:
    step_00001000/state.pt     model, optimizer, grad scaler, every rank's RNG states, the data position, config
    step_00001000/COMPLETE     JSON marker written last: step, size of state.pt, validation loss
    best.json                  the step with the lowest validation loss (when known)

Writing (rank 0): `.tmp-step_…/state.pt` is written and fsynced, the folder is renamed to `step_…`, then the
marker is written atomically (temp file, fsync, rename). A checkpoint without its marker is never read, so a kill
at any moment leaves the previous checkpoint as the latest one. Leftover temp folders are removed at start.

Model and optimizer states are full (unsharded) and keyed by parameter name
(`torch.distributed.checkpoint.state_dict` with `full_state_dict=True`), so one file resumes a plain, DDP or FSDP2
run with any number of processes. Per-rank RNG states are restored when the world size is unchanged; the data
stream itself does not depend on them (see data.py). Multi-node runs need the run directory on a shared file system.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

import aimcore
from aimcore.config import AimConfig
from aimcore.fsio import atomic_write_text, fsync_dir

__all__ = [
    "CheckpointManager",
    "capture_rng",
    "export_trunk",
    "full_model_state",
    "restore_rng",
]

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def capture_rng() -> dict[str, Any]:
    """This process's RNG states: torch CPU, CUDA (all devices), numpy's global and Python's `random`."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": _numpy_state(),
        "python": random.getstate(),
    }


def _numpy_state() -> tuple[Any, ...]:
    """numpy's legacy global state with the key as a tensor (checkpoints are loaded with weights_only)."""
    name, key, pos, has_gauss, gauss = np.random.get_state()  # type: ignore[misc]
    return (name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss))


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict (collective under FSDP: every rank must call; rank 0 gets the tensors)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_trunk(
    state: dict[str, torch.Tensor], config: AimConfig, path: str | os.PathLike[str], provenance: dict[str, Any]
) -> Path:
    """Write the `aim.*` part of a full PretrainModel state as an aimcore checkpoint (self-describing
    safetensors, no classification head): the artefact that export/ and service/ load."""
    trunk = aimcore.build_model(config.replace(num_classes=0), init=False)
    trunk.load_state_dict({k[len("aim.") :]: v for k, v in state.items() if k.startswith("aim.")}, strict=True)
    return aimcore.save_checkpoint(trunk, path, provenance=provenance)


class CheckpointManager:
    def __init__(self, run_dir: str | os.PathLike[str], *, keep_last: int, keep_best: bool, is_main: bool) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.is_main = is_main

    # ----- discovery -----
    def complete(self) -> list[tuple[int, Path]]:
        """(step, folder) of every checkpoint with its marker, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            match = _STEP_DIR.match(entry.name)
            if match and (entry / MARKER).is_file() and self._marker_ok(entry):
                found.append((int(match.group(1)), entry))
        return sorted(found)

    def _marker_ok(self, folder: Path) -> bool:
        try:
            marker = json.loads((folder / MARKER).read_text())
            return (folder / STATE_FILE).stat().st_size == marker["bytes"]
        except (OSError, ValueError, KeyError):
            logger.warning("ignoring checkpoint %s: marker or state file damaged", folder)
            return False

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1][1] if found else None

    def remove_partial(self) -> None:
        """Delete what a killed save left behind (rank 0, at start)."""
        if not (self.is_main and self.root.is_dir()):
            return
        for entry in self.root.iterdir():
            if entry.name.startswith(".tmp-") or (_STEP_DIR.match(entry.name) and not (entry / MARKER).exists()):
                logger.warning("removing incomplete checkpoint %s (an interrupted save)", entry)
                shutil.rmtree(entry, ignore_errors=True)

    # ----- writing -----
    def save(self, state: dict[str, Any], step: int, *, val_loss: float | None, kill_mid_save: bool = False) -> Path:
        """Write `state` for `step` atomically (rank 0 only; other ranks return at once)."""
        final = self.root / f"step_{step:08d}"
        if not self.is_main:
            return final
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-step_{step:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        path = tmp / STATE_FILE
        torch.save(state, path)
        if kill_mid_save:  # fault injection for the resume tests: die with the state written but not committed
            logger.warning("debug: SIGKILL during the save of step %d", step)
            os.kill(os.getpid(), signal.SIGKILL)
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())
        fsync_dir(tmp)
        if final.exists():  # a re-run of this step after a resume: the new state replaces the old
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        marker = {"step": step, "bytes": (final / STATE_FILE).stat().st_size, "val_loss": val_loss}
        atomic_write_text(final / MARKER, json.dumps(marker))
        logger.info("saved checkpoint %s", final)
        self._update_best(step, val_loss)
        self._prune()
        return final

    def _update_best(self, step: int, val_loss: float | None) -> None:
        if val_loss is None or not self.keep_best:
            return
        best_file = self.root / "best.json"
        best = json.loads(best_file.read_text()) if best_file.is_file() else None
        if best is None or val_loss < best["val_loss"] or best["step"] == step:
            atomic_write_text(best_file, json.dumps({"step": step, "val_loss": val_loss}))

    def best_step(self) -> int | None:
        best_file = self.root / "best.json"
        if not (self.keep_best and best_file.is_file()):
            return None
        return int(json.loads(best_file.read_text())["step"])

    def _prune(self) -> None:
        found = self.complete()
        keep = {step for step, _ in found[-self.keep_last :]}
        best = self.best_step()
        if best is not None:
            keep.add(best)
        for step, folder in found:
            if step not in keep:
                shutil.rmtree(folder, ignore_errors=True)
                logger.debug("pruned checkpoint %s", folder)

    # ----- reading -----
    @staticmethod
    def load(folder: str | os.PathLike[str]) -> dict[str, Any]:
        """Read a checkpoint folder (or its state.pt). Tensors and plain containers only (weights_only)."""
        path = Path(folder)
        if path.is_dir():
            if not (path / MARKER).is_file():
                raise FileNotFoundError(f"{path} has no {MARKER} marker: an interrupted save, not a checkpoint")
            path = path / STATE_FILE
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # pages shared by the ranks

    @staticmethod
    def restore_model_and_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load full states into a plain, DDP or FSDP2 model (every rank passes the full dicts)."""
        options = StateDictOptions(full_state_dict=True, strict=True)
        set_model_state_dict(model, state["model"], options=options)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
