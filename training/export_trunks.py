"""Consolidate sharded (DCP) pre-training checkpoints into aimcore trunk checkpoints.

    python -m training.export_trunks RUN                          # every RUN/checkpoints/step_N/trunk.safetensors
    python -m training.export_trunks RUN/checkpoints/step_N -o trunk.safetensors    # one checkpoint, one file

Runs in one process with no process group, whatever world size wrote the checkpoint: DCP reads every rank's
shard into a plain CPU model (peak host memory: the model's fp32 weights once, no optimizer state).

Each file is self-describing (aimcore.save_checkpoint) with provenance {"step", "val_loss", "samples_seen"}, so
`training/evidence.py` and `training/probe.py` read any step of a run, not only the final export.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a plain script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from training.checkpointing import MARKER, CheckpointManager, export_trunk, read_model_state
from training.config import TrainConfig
from training.decoder import PretrainModel

logger = logging.getLogger("training.export_trunks")

TRUNK_FILE = "trunk.safetensors"


def export_run(run_dir: Path, *, overwrite: bool = False) -> list[Path]:
    """One trunk file per complete step folder under `run_dir/checkpoints`; returns the paths written or kept."""
    manager = CheckpointManager(run_dir, keep_last=1 << 30, keep_best=False, is_main=True)
    written: list[Path] = []
    for step, folder in manager.complete():
        target = folder / TRUNK_FILE
        if target.is_file() and not overwrite:
            written.append(target)
            continue
        written.append(export_checkpoint(folder, target))
        logger.info("step %d -> %s", step, target)
    return written


def export_checkpoint(folder: Path, target: Path) -> Path:
    """One committed checkpoint folder -> one self-describing trunk file."""
    meta = CheckpointManager.load_meta(folder)
    cfg = TrainConfig.from_dict(meta["config"])
    aim_cfg = cfg.aim_config()
    with torch.device("meta"):  # no initialisation: every tensor is read from the checkpoint
        model = PretrainModel(aim_cfg, decoder_style=cfg.model.decoder_block, decoder_eps=cfg.model.decoder_norm_eps)
    model.to_empty(device="cpu")
    state = read_model_state(folder, model.state_dict())
    progress = meta.get("progress", {})
    provenance = {
        "trained_by": "training/pretrain.py",
        "step": progress.get("step"),
        "val_loss": json.loads((folder / MARKER).read_text()).get("val_loss"),
        "samples_seen": progress.get("samples_seen"),
    }
    return export_trunk(state, aim_cfg, target, provenance)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run directory (holds checkpoints/step_*/) or one step folder")
    parser.add_argument("-o", "--output", type=Path, help="with one step folder: where to write the trunk")
    parser.add_argument("--overwrite", action="store_true", help="rewrite trunk files that already exist")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if (args.run / MARKER).is_file():
        path = export_checkpoint(args.run, args.output or args.run / TRUNK_FILE)
        logger.info("%s -> %s", args.run, path)
        return 0
    paths = export_run(args.run, overwrite=args.overwrite)
    if not paths:
        logger.error("no complete checkpoints under %s/checkpoints", args.run)
        return 1
    logger.info("%d trunk files", len(paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
