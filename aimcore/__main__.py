"""`python -m aimcore info SOURCE` and `python -m aimcore embed SOURCE IMAGE...`.

SOURCE is anything `load_model` takes; `info` also takes a bare flavor name (aim-debug, aim-600M, ...) and then
describes that architecture without weights, built on the meta device.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from aimcore.checkpoint import CheckpointError, check_state_dict, sha256_file
from aimcore.config import canonical_flavor, get_flavor
from aimcore.flops import count_flops, count_params
from aimcore.model import AimModel, build_model
from aimcore.preprocess import PreprocessConfig, preprocess
from aimcore.sources import BUNDLED_DIR, load_model

logger = logging.getLogger("aimcore")


def _describe(model: AimModel, *, weights: bool) -> dict[str, Any]:
    cfg = model.config
    params = count_params(cfg)
    flops = count_flops(cfg)
    early = count_flops(cfg, blocks=max(cfg.probe_layers) + 1)
    expected_keys = len(build_model(cfg, device="meta").state_dict())
    info: dict[str, Any] = {
        "config": cfg.to_dict(),
        "params": {"backbone": params.backbone, "head": params.head, "pretrain_decoder": params.decoder},
        "gflops_per_image": {
            "forward_full": round(flops.forward / 1e9, 3),
            "forward_to_probe_layers": round((early.patch_embed + early.trunk + early.head) / 1e9, 3),
            "pretrain_step_fwd_bwd": round(flops.pretrain_step / 1e9, 3),
        },
        # Weights only; activations add ~(batch x tokens x width) per live block on top (README's size table).
        "memory_gib": {
            "weights_fp32": round((params.backbone + params.head) * 4 / 2**30, 3),
            "weights_bf16": round((params.backbone + params.head) * 2 / 2**30, 3),
        },
        "state_dict_keys": expected_keys,
        "weights": "loaded" if weights else "none (architecture only, meta device)",
    }
    if weights:
        files = [str(f) for f in getattr(model, "checkpoint_files", [])]
        info["files"] = files
        info["key_check"] = check_state_dict(model, model.state_dict()) or "ok: strict load passed"
        info["preprocess"] = getattr(model, "preprocess_config", PreprocessConfig.for_size(cfg.img_size)).to_dict()
        info["layout"] = getattr(model, "layout", None)
        info["labels"] = len(model.labels) if getattr(model, "labels", None) else None
    return info


def cmd_info(args: argparse.Namespace) -> int:
    source = args.source
    flavor = canonical_flavor(source)
    if flavor is not None and not Path(source).exists() and not (BUNDLED_DIR / flavor).is_dir():
        # A bare flavor name describes the architecture; it never reaches for the network.
        cfg = get_flavor(flavor)
        if args.probe_layers:
            cfg = cfg.with_probe_layers(args.probe_layers)
        model, weights = build_model(cfg, device="meta"), False
    else:
        model, weights = load_model(source, probe_layers=args.probe_layers), True
    info = _describe(model, weights=weights)
    if weights and args.checksum:
        info["sha256"] = {f: sha256_file(f) for f in info["files"]}
    json.dump(info, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    model = load_model(args.source, probe_layers=args.probe_layers)
    prep: PreprocessConfig = getattr(model, "preprocess_config", PreprocessConfig.for_size(model.config.img_size))
    arrays = []
    for name in args.images:
        try:
            with Image.open(name) as img:
                arrays.append(preprocess(img, prep))
        except (OSError, UnidentifiedImageError) as exc:
            raise SystemExit(f"error: cannot read image {name}: {exc}") from exc
    x = torch.from_numpy(np.stack(arrays))
    labels = getattr(model, "labels", None)
    with torch.inference_mode():
        if args.output == "logits":
            if model.head is None:
                raise SystemExit("error: this model has no classification head; use --output embedding")
            probs = model(x).softmax(dim=-1)
            top = probs.topk(min(args.top_k, probs.shape[-1]), dim=-1)
            rows = [
                {
                    "image": name,
                    "top": [
                        {"index": int(i), "label": labels[int(i)] if labels else None, "prob": round(float(p), 6)}
                        for p, i in zip(top.values[r], top.indices[r], strict=True)
                    ],
                }
                for r, name in enumerate(args.images)
            ]
        else:
            vectors = model.embed(x, pooling=args.pooling, normalize=not args.no_normalize)
            rows = [
                {"image": n, "embedding": [round(float(v), 6) for v in vec]}
                for n, vec in zip(args.images, vectors, strict=True)
            ]
    for row in rows:
        sys.stdout.write(json.dumps(row) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m aimcore", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="config, parameter and FLOP counts, strict key check")
    info.add_argument("source", help="checkpoint file or folder, bundled/released flavor name, or HF id")
    info.add_argument("--probe-layers", choices=["best", "last"], default=None)
    info.add_argument("--checksum", action="store_true", help="also print the SHA-256 of each weights file")
    info.set_defaults(func=cmd_info)

    embed = sub.add_parser("embed", help="print one JSON line per image: embedding or top-k classes")
    embed.add_argument("source")
    embed.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    embed.add_argument("--output", choices=["embedding", "logits"], default="embedding")
    embed.add_argument(
        "--pooling",
        choices=["mean", "probe"],
        default="mean",
        help="mean: average of the final-normed tokens; probe: the head's attention-pooled vector",
    )
    embed.add_argument("--no-normalize", action="store_true", help="skip L2 normalisation of embeddings")
    embed.add_argument("--top-k", type=int, default=5)
    embed.add_argument("--probe-layers", choices=["best", "last"], default=None)
    embed.set_defaults(func=cmd_embed)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except (CheckpointError, ValueError, RuntimeError) as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
