"""The two baselines a pre-trained trunk's probe top-1 is judged against, measured the same way, in one command.

    python -m training.baselines --data DIR [--flavor aim-demo] [--out runs/baselines] [probe budget options]

1. random-init trunk: `build_model(flavor)` with the pre-training init (aimcore's init_weights, seed --seed), frozen,
   and the same attentive probe, data, split and budget as training/probe.py;
2. raw-pixel linear: softmax regression on the eval transform's pixels (pooled to --pixel-size), with the same
   optimiser, schedule and budget.
Writes OUT/baselines.json, OUT/baselines.md (a table for docs/), OUT/random_init/{trunk,head}.safetensors.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import aimcore
from aimcore import PreprocessConfig
from training.probe_lib.cli import (
    add_data_args,
    add_probe_args,
    add_runtime_args,
    data_from,
    options_from,
    probe_config_from,
)
from training.probe_lib.features import freeze
from training.probe_lib.pixels import run_pixel_linear
from training.probe_lib.runner import run_probe

logger = logging.getLogger("training.baselines")


def random_trunk(flavor: str, seed: int, path: Path, device: torch.device) -> aimcore.AimModel:
    """A fresh trunk as pre-training would start it, saved so the head round trip can reload it."""
    torch.manual_seed(seed)
    config = aimcore.get_flavor(flavor).replace(num_classes=0)
    model = aimcore.build_model(config)  # init_weights(): xavier linears, unit/zero norms
    path.parent.mkdir(parents=True, exist_ok=True)
    aimcore.save_checkpoint(model, path, provenance={"kind": "random-init baseline", "seed": seed})
    return freeze(model.to(device))


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    rows = [
        "| model | held-out top-1 | top-5 | k-NN top-1 (k=20) | train / held-out images | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in results.items():
        seconds = m.get("feature_seconds", 0.0) + m.get("train_seconds", 0.0)
        rows.append(
            f"| {name} | {m['top1']:.4f} | {m['top5']:.4f} | {m.get('knn_top1', float('nan')):.4f} "
            f"| {m['num_train']} / {m['num_val']} | {seconds:.0f} |"
        )
    return "\n".join(rows) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavor", default="aim-demo", help="architecture of the random-init trunk")
    parser.add_argument("--pixel-size", type=int, default=28, help="raw-pixel side after pooling (0 = full size)")
    parser.add_argument("--out", type=Path, default=Path("runs/baselines"))
    parser.add_argument("--skip", choices=("random", "pixels"), action="append", default=[])
    add_data_args(parser)
    add_probe_args(parser)
    add_runtime_args(parser)
    args = parser.parse_args(argv)
    opts = options_from(args)
    cfg = probe_config_from(args)
    data = data_from(args)
    results: dict[str, dict[str, Any]] = {}

    if "random" not in args.skip:
        trunk_path = args.out / "random_init" / "trunk.safetensors"
        trunk = random_trunk(args.flavor, cfg.seed, trunk_path, opts.device)
        m = run_probe(trunk, data, cfg, opts, out_dir=trunk_path.parent, trunk_source=str(trunk_path))
        results[f"random-init {args.flavor} trunk + attentive probe"] = m
    if "pixels" not in args.skip:
        prep = PreprocessConfig.for_size(aimcore.get_flavor(args.flavor).img_size)
        m = run_pixel_linear(data, prep, cfg, args.pixel_size, opts.device)
        results[f"linear classifier on raw pixels ({m['pixel_size']}x{m['pixel_size']}x3)"] = m

    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "data": data.description,
        "command": "python -m training.baselines " + " ".join(sys.argv[1:] if argv is None else argv),
        "probe_config": cfg.to_dict(),
        "results": {k: {kk: vv for kk, vv in v.items() if kk != "history"} for k, v in results.items()},
    }
    (args.out / "baselines.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    table = markdown_table(results)
    (args.out / "baselines.md").write_text(table)
    logger.info("baselines (%s):\n%s", data.description, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
