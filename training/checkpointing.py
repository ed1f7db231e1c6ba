"""Atomic, step-exact, sharded training checkpoints (torch.distributed.checkpoint, saved asynchronously).

Layout under `<run dir>/checkpoints/`:
    step_00001000/__R_0.distcp  model and optimizer state: each rank writes its own shard (DCP)
    step_00001000/.metadata     DCP's index of the shards (written by the coordinator once every rank is done)
    step_00001000/meta.pt       grad scaler, every rank's RNG states, the data position, world size, config
    step_00001000/COMPLETE      JSON marker written last: step, the size of every file, validation loss
    best.json                   the step with the lowest validation loss (when known)

Saving: every rank stages its shard of `get_state_dict` (sharded DTensors under FSDP2; replicated tensors under
DDP are written once, DCP deduplicates them) into `.tmp-step_…/` with `dcp.async_save`, then goes on training
while a background thread writes. Rank 0 commits once the save's future is done (which means DCP's metadata,
hence every rank's shard, is written): fsync, rename to `step_…`, then the marker (temp file, fsync, rename). A
checkpoint without its marker is never read, so a kill at any moment leaves the previous checkpoint the latest
one; leftovers are removed at start. Loading (`dcp.load` into this launch's sharding) works at any world size.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import time
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_state_dict,
)

import aimcore
from aimcore.config import AimConfig
from aimcore.fsio import atomic_write_text, fsync_dir

__all__ = [
    "CheckpointManager",
    "capture_rng",
    "export_trunk",
    "full_model_state",
    "read_model_state",
    "restore_rng",
]

logger = logging.getLogger(__name__)


def _quiet_single_process() -> None:
    """DCP warns on every single-process save and load, even when no_dist is asked for explicitly (as it is here
    for a one-process run and for the offline consolidation). A group expected but missing cannot happen on these
    paths: no_dist is passed only when no group was started. (Set per call: test runners reset filters per test.)"""
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


META_FILE = "meta.pt"
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
    """Unsharded optimizer state (collective under FSDP): the one-file format before DCP, kept for comparison."""
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def read_model_state(folder: str | os.PathLike[str], template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full model state of a committed checkpoint, read in this process alone (no process group): `template`
    (a plain model's state_dict, e.g. of a PretrainModel built on the CPU) is filled in place and returned."""
    _quiet_single_process()
    state = {"model": template}
    dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    return state["model"]


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
        self._pending: tuple[Future[Any], int, float | None, float] | None = None  # (future, step, val, t0)
        self._group: Any = None
        self.last_save: dict[str, float] = {}  # seconds: blocked (staging), total (until committed)

    # ----- discovery -----
    def complete(self) -> list[tuple[int, Path]]:
        """(step, folder) of every checkpoint with a valid marker, oldest first."""
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
            return all((folder / name).stat().st_size == size for name, size in marker["files"].items())
        except (OSError, ValueError, KeyError, AttributeError):
            logger.warning("ignoring checkpoint %s: marker or state files damaged", folder)
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
    def _tmp(self, step: int) -> Path:
        return self.root / f".tmp-step_{step:08d}"

    def save_async(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        meta: dict[str, Any],
        step: int,
        *,
        val_loss: float | None,
        kill_mid_save: bool = False,
    ) -> None:
        """Start saving `step` (collective: every rank calls). Returns once this rank's shard is staged in host
        memory; the write and the commit finish in the background (`poll`, `wait`)."""
        self.wait()  # one save in flight at a time
        _quiet_single_process()
        t0 = time.perf_counter()
        tmp = self._tmp(step)
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save(meta, tmp / META_FILE)
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            if self._group is None:  # the background writer's collectives must not share the training group
                self._group = dist.new_group(backend="gloo")
            dist.barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        future = dcp.async_save(
            {"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp), process_group=self._group,
            no_dist=not distributed,
        )  # fmt: skip
        self.last_save = {"blocked_s": time.perf_counter() - t0}
        if kill_mid_save:  # fault injection for the resume tests: shards written, checkpoint not committed
            future.result()
            logger.warning("debug: SIGKILL during the save of step %d", step)
            os.kill(os.getpid(), signal.SIGKILL)
        self._pending = (future, step, val_loss, t0)

    def poll(self) -> None:
        """Commit the save in flight if its write has finished (cheap; call every step)."""
        if self._pending is not None and self._pending[0].done():
            self.wait()

    def wait(self) -> Path | None:
        """Finish and commit the save in flight, if any; returns its folder."""
        if self._pending is None:
            return None
        future, step, val_loss, t0 = self._pending
        self._pending = None
        future.result()  # raises what the writer raised
        self.last_save["total_s"] = time.perf_counter() - t0
        final = self.root / f"step_{step:08d}"
        if not self.is_main:
            return final
        tmp = self._tmp(step)
        for path in tmp.iterdir():
            with open(path, "rb+") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        if final.exists():  # a re-run of this step after a resume: the new state replaces the old
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        files = {p.name: p.stat().st_size for p in sorted(final.iterdir())}
        atomic_write_text(final / MARKER, json.dumps({"step": step, "files": files, "val_loss": val_loss}))
        logger.info("saved checkpoint %s (%.2f s in the background)", final, self.last_save["total_s"])
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
    def load_meta(folder: str | os.PathLike[str]) -> dict[str, Any]:
        """The small part of a checkpoint: progress, config, world size, scaler and RNG states."""
        path = Path(folder)
        if not (path / MARKER).is_file():
            raise FileNotFoundError(f"{path} has no {MARKER} marker: an interrupted save, not a checkpoint")
        return torch.load(path / META_FILE, map_location="cpu", weights_only=True)

    @staticmethod
    def restore_model_and_optimizer(
        model: nn.Module, optimizer: torch.optim.Optimizer, folder: str | os.PathLike[str]
    ) -> None:
        """Load a checkpoint into a plain, DDP or FSDP2 model of this launch (collective; any world size: DCP
        reads each rank's part of every tensor from whichever shards hold it)."""
        _quiet_single_process()
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(folder), no_dist=not (dist.is_available() and dist.is_initialized()))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
