"""Export the trunk of every complete checkpoint of a pre-training run as an aimcore checkpoint.

    python -m training.export_trunks RUN            # writes RUN/checkpoints/step_N/trunk.safetensors

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

from training.checkpointing import MARKER, CheckpointManager, export_trunk
from training.config import TrainConfig

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
        state = CheckpointManager.load(folder)
        config = TrainConfig.from_dict(state["config"]).aim_config()
        progress = state.get("progress", {})
        provenance = {
            "trained_by": "training/pretrain.py",
            "step": step,
            "val_loss": json.loads((folder / MARKER).read_text()).get("val_loss"),
            "samples_seen": progress.get("samples_seen"),
        }
        written.append(export_trunk(state["model"], config, target, provenance))
        logger.info("step %d -> %s", step, target)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="pre-training run directory (holds checkpoints/step_*/)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite trunk files that already exist")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    paths = export_run(args.run, overwrite=args.overwrite)
    if not paths:
        logger.error("no complete checkpoints under %s/checkpoints", args.run)
        return 1
    logger.info("%d trunk files", len(paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
