"""`python -m export`: ONNX and TensorRT artefacts with parity checks and a manifest.

    python -m export onnx --checkpoint SRC --out DIR [--fp16] [--int8] [--max-batch N] [--opset N]
                          [--outputs embedding,pooled,logits] [--images DIR] [--random-weights --seed N]
    python -m export tensorrt --onnx DIR/model.onnx --out DIR_TRT [--precision fp16|bf16|fp32]
                              [--min-batch N --opt-batch N --max-batch N] [--timing-cache FILE]
    python -m export validate DIR [--checkpoint SRC] [--images DIR] [--max-batch N]

`onnx` writes the fp32 graph to DIR and the variants to DIR/fp16 and DIR/int8, each with manifest.json and
reference.npz. A JSON summary goes to stdout, logs to stderr. Exit status: 0 ok, 1 parity or validation failed,
2 bad arguments or inputs, 3 TensorRT or a GPU is missing here.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from aimcore import CheckpointError, build_model, get_flavor, load_model, save_checkpoint
from aimcore.lit_sources import is_lit_source, load_lit_model
from aimcore.manifest import PROBE_GRAPH_DIR
from export.onnx import DEFAULT_OPSET, export_onnx
from export.parity import ParityError
from export.provenance import SourceMismatchError

logger = logging.getLogger("export")

EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 1, 2, 3


def _emit(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


def _summary(manifest: Any, directory: Path) -> dict[str, Any]:
    parity = manifest.parity
    return {
        "directory": str(directory),
        "precision": manifest.precision,
        "outputs": manifest.outputs,
        "sha256": manifest.artifact_sha256,
        "worst": parity.get("worst"),
        "real_images": parity.get("real_images"),
        "not_validated": parity.get("not_validated"),
    }


def _random_source(flavor: str, out: Path, seed: int) -> Path:
    """A random-init checkpoint saved in the output folder, so the artefact's source exists and can be re-checked."""
    torch.manual_seed(seed)
    model = build_model(get_flavor(flavor)).eval()
    path = out / "source.safetensors"
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, path, provenance={"random_init": True, "flavor": flavor, "seed": seed})
    logger.info("random %s weights (seed %d) saved to %s", flavor, seed, path)
    return path


def cmd_onnx(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if not args.random_weights and is_lit_source(args.checkpoint):  # AIMv2-LiT: one graph per tower
        from export.lit_onnx import LitParityError, export_lit_onnx

        try:
            manifest = export_lit_onnx(load_lit_model(args.checkpoint), out, max_batch=args.max_batch, opset=args.opset)
        except LitParityError as exc:
            logger.error("%s", exc)
            return EXIT_FAILED
        _emit({"directory": str(out), "kind": manifest["kind"], "parity": manifest["parity"]})
        return 0
    source = _random_source(args.checkpoint, out, args.seed) if args.random_weights else args.checkpoint
    model = load_model(source)  # loaded once; load_model records its files, so every variant keeps provenance
    variants = [("fp32", out)]
    variants += [("fp16", out / "fp16")] if args.fp16 else []
    variants += [("int8", out / "int8")] if args.int8 else []
    results = []
    for precision, directory in variants:
        manifest = export_onnx(
            model,
            directory,
            max_batch=args.max_batch,
            precision=precision,
            opset=args.opset,
            outputs=args.outputs,
            check_parity=not args.skip_parity,
            images=args.images,
            external_data=True if args.external_data else None,
        )
        results.append(_summary(manifest, directory))
        if args.probe_graph and model.config.has_head and "embedding" in manifest.outputs:
            # Early exit for logits-only batches (issue 13): the same precision, stopping after the last probe
            # layer, with its own parity in its own manifest; the service routes such batches to it.
            probe = export_onnx(
                model,
                directory / PROBE_GRAPH_DIR,
                max_batch=args.max_batch,
                precision=precision,
                opset=args.opset,
                outputs="pooled,logits",
                check_parity=not args.skip_parity,
                images=args.images,
                external_data=True if args.external_data else None,
            )
            results.append(_summary(probe, directory / PROBE_GRAPH_DIR))
    _emit(results)
    return 0


def cmd_tensorrt(args: argparse.Namespace) -> int:
    from export.tensorrt import build_engine

    manifest = build_engine(
        args.onnx,
        args.out,
        precision=args.precision,
        min_batch=args.min_batch,
        opt_batch=args.opt_batch,
        max_batch=args.max_batch,
        timing_cache=args.timing_cache,
        workspace_gib=args.workspace_gib,
        checkpoint=args.checkpoint,
        images=args.images,
    )
    _emit({**_summary(manifest, Path(args.out)), "runtime": manifest.runtime})
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from export.validate import validate_directory

    results = validate_directory(args.dir, checkpoint=args.checkpoint, images=args.images, max_batch=args.max_batch)
    _emit([r.to_dict() for r in results])
    failed = [r for r in results if not r.passed]
    if failed:
        logger.error("%d of %d artefacts failed validation", len(failed), len(results))
        return EXIT_FAILED
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("onnx", help="export a checkpoint to ONNX (+ fp16 / int8 variants) and check parity")
    p.add_argument("--checkpoint", required=True, help="file, folder, flavor or hub id (see aimcore.load_model)")
    p.add_argument("--out", required=True, help="output folder (variants go to OUT/fp16, OUT/int8)")
    p.add_argument("--fp16", action="store_true", help="also write the fp16 graph (for GPU providers)")
    p.add_argument("--int8", action="store_true", help="also write the int8 dynamically quantised graph (CPU)")
    p.add_argument("--max-batch", type=int, default=32, help="largest batch checked; top of the batch profile")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument(
        "--outputs",
        default=None,
        help="comma-separated subset of embedding,pooled,logits; without embedding the graph stops after the "
        "last probe layer (default: every output the model has)",
    )
    p.add_argument(
        "--probe-graph",
        action="store_true",
        help=f"also write OUT/.../{PROBE_GRAPH_DIR}: pooled + logits only, stopping after the last probe layer "
        "(the service runs /classify batches on it)",
    )
    p.add_argument("--images", default=None, help="folder of real images for parity (default: tests/assets/images)")
    p.add_argument("--external-data", action="store_true", help="store weights in model.onnx.data at any size")
    p.add_argument("--random-weights", action="store_true", help="--checkpoint is a flavor: random init, saved")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-weights")
    p.add_argument("--skip-parity", action="store_true", help="do not check parity (recorded in the manifest)")
    p.set_defaults(func=cmd_onnx)

    t = sub.add_parser("tensorrt", help="build a TensorRT engine from an exported ONNX file and check parity")
    t.add_argument("--onnx", required=True, help="model.onnx written by `python -m export onnx`")
    t.add_argument("--out", required=True)
    t.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default="fp16")
    t.add_argument("--min-batch", type=int, default=1)
    t.add_argument("--opt-batch", type=int, default=None)
    t.add_argument("--max-batch", type=int, default=None)
    t.add_argument("--timing-cache", default=None, help="timing cache file reused across builds")
    t.add_argument("--workspace-gib", type=float, default=None)
    t.add_argument("--checkpoint", default=None, help="the PyTorch source, if it moved since the ONNX export")
    t.add_argument("--images", default=None)
    t.set_defaults(func=cmd_tensorrt)

    v = sub.add_parser("validate", help="re-check checksums and parity of every artefact in DIR and DIR/*/")
    v.add_argument("dir")
    v.add_argument("--checkpoint", default=None, help="the PyTorch source, if it moved (or was in memory)")
    v.add_argument("--images", default=None)
    v.add_argument("--max-batch", type=int, default=None, help="default: the manifest's max batch")
    v.set_defaults(func=cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from export.tensorrt import TensorRTUnavailable

    try:
        return args.func(args)
    except TensorRTUnavailable as exc:
        logger.error("TensorRT unavailable: %s", exc)
        return EXIT_UNAVAILABLE
    except ParityError as exc:
        logger.error("%s", exc)
        return EXIT_FAILED
    except (CheckpointError, SourceMismatchError, FileNotFoundError, ValueError, KeyError) as exc:
        logger.error("%s", exc)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
