"""Attentive probe (the AIM paper's downstream protocol) on a frozen trunk.

    python training/probe.py --checkpoint <trunk> --data <labelled folder or list file> [--out DIR]

Frozen trunk (eval, no gradients) -> mean of the probe layers' raw outputs (B, N, D) -> BatchNorm (affine=False) ->
attention pooling with one learned query -> linear. For an AIMv2 trunk: post_trunk_norm(mean of the probe layers,
by default the last block) -> attention pooling -> linear with a bias, and no BatchNorm (AIMv2's pooling head has
none; its tokens are RMS-normalised already). AdamW, linear warmup then cosine. Without augmentation the trunk
runs once per image and the head trains on cached features. Reports held-out top-1 / top-5, the most-confused class
pairs and a k-NN top-1 (cosine, k=20, temperature-weighted votes) on the same features. Writes to --out:
head.safetensors (released `head.*` layout; `aimcore.load_model(trunk, head=...)` takes it), labels.json
(index -> name) and metrics.json.

--checkpoint takes anything aimcore.load_model does: our safetensors trunk, a released backbone .pth (with
--config aim-600M etc. when the shape alone is ambiguous), a folder, or a released flavor name (hub cache).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a plain script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.probe_lib.cli import (
    add_data_args,
    add_probe_args,
    add_runtime_args,
    data_from,
    options_from,
    probe_config_from,
)
from training.probe_lib.features import load_trunk
from training.probe_lib.runner import run_probe

logger = logging.getLogger("training.probe")


def parse_layers(text: str | None) -> str | tuple[int, ...] | None:
    if text is None or text in ("best", "last"):
        return text
    return tuple(int(i) for i in text.split(","))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="trunk: file, folder, or released flavor name")
    parser.add_argument("--config", default=None, help="flavor name for weights without a config (e.g. aim-600M)")
    parser.add_argument("--probe-layers", default=None, help="best, last, or block indices '4,5,6'")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/probe/<checkpoint>)")
    add_data_args(parser)
    add_probe_args(parser)
    add_runtime_args(parser)
    args = parser.parse_args(argv)
    opts = options_from(args)

    trunk = load_trunk(
        args.checkpoint, config=args.config, probe_layers=parse_layers(args.probe_layers), device=opts.device
    )
    data = data_from(args)
    out = args.out or Path("runs/probe") / Path(args.checkpoint).stem
    metrics = run_probe(trunk, data, probe_config_from(args), opts, out_dir=out, trunk_source=str(args.checkpoint))
    trip = metrics.get("head_round_trip", {})
    logger.info(
        "top-1 %.4f, top-5 %.4f, k-NN top-1 %s; head -> %s (load_model round trip: %s)",
        metrics["top1"],
        metrics["top5"],
        f"{metrics['knn_top1']:.4f}" if "knn_top1" in metrics else "n/a",
        metrics.get("head_file"),
        trip.get("ok"),
    )
    return 0 if trip.get("ok") is not False else 1


if __name__ == "__main__":
    sys.exit(main())
