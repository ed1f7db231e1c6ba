"""`python -m service [serve] [--flags]`, `python -m service embed|classify IMAGE...`, `... golden SOURCE`.

serve (the default): the HTTP service; every setting is a flag or an AIM_* variable (`python -m service serve --help`).
embed / classify: send images to a running server (--url, default http://127.0.0.1:8000) and print one JSON line
per image.
golden: compute reference outputs for a checkpoint or export directory and store them with it, for the boot
self-check (see service.golden).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from service.settings import add_settings_arguments, settings_from_args

COMMANDS = ("serve", "embed", "classify", "golden")
logger = logging.getLogger("service")


def _client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--url", default=os.environ.get("AIM_URL", "http://127.0.0.1:8000"), help="server URL")
    parser.add_argument("--api-key", default=os.environ.get("AIM_API_KEY"), help="API key, if the server needs one")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the HTTP service (default)")
    add_settings_arguments(serve)
    embed = sub.add_parser("embed", help="embed images with a running server")
    _client_args(embed)
    embed.add_argument("--pooling", choices=["mean", "probe"], default="mean")
    embed.add_argument("--no-normalize", action="store_true", help="raw vectors, not L2-normalised")
    classify = sub.add_parser("classify", help="classify images with a running server")
    _client_args(classify)
    classify.add_argument("--top-k", type=int, default=5)
    golden = sub.add_parser("golden", help="store reference outputs with a model for the boot self-check")
    golden.add_argument("source", help="checkpoint file or folder, or export directory")
    golden.add_argument("--out", type=Path, default=None, help="where to write (default: beside the weights)")
    return parser


def _client_command(args: argparse.Namespace) -> int:
    from service.client import AimClient, ServiceClientError

    with AimClient(args.url, api_key=args.api_key, timeout=args.timeout) as client:
        try:
            if args.command == "embed":
                result = client.embed(args.images, pooling=args.pooling, normalize=not args.no_normalize)
                rows = [
                    {"image": name, "embedding": vec}
                    for name, vec in zip(args.images, result["embeddings"], strict=True)
                ]
            else:
                result = client.classify(args.images, top_k=args.top_k)
                rows = [{"image": name, **pred} for name, pred in zip(args.images, result["predictions"], strict=True)]
        except ServiceClientError as exc:
            logger.error("%s", exc)
            return 1
    for row in rows:
        sys.stdout.write(json.dumps(row) + "\n")
    return 0


def _golden_command(args: argparse.Namespace) -> int:
    import aimcore
    from service.backends import find_artifacts, golden_path_for
    from service.backends.torch_backend import model_sha256
    from service.golden import make_golden, save_golden

    artifacts = find_artifacts(args.source)
    if artifacts:
        directory, manifest = artifacts[0]
        ckpt = manifest.source.get("checkpoint")
        if not ckpt or not Path(ckpt).is_file():
            logger.error("%s was exported from %s, which is not here: pass that checkpoint's folder", directory, ckpt)
            return 1
        model = aimcore.load_model(ckpt)
        sha = str(manifest.source.get("sha256") or model_sha256(model))
        prep, out = manifest.preprocess_config, args.out or directory / "golden.npz"
    else:
        model = aimcore.load_model(args.source)
        sha = model_sha256(model)
        prep = getattr(model, "preprocess_config", aimcore.PreprocessConfig.for_size(model.config.img_size))
        out = args.out or golden_path_for(model, args.source)
    if out is None:
        logger.error("no place beside the weights for %s: pass --out", args.source)
        return 1
    save_golden(make_golden(model, weights_sha256=sha, preprocess_config=prep), out)
    logger.info("wrote %s (weights %s...)", out, sha[:12])
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["serve", *argv]
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        settings = settings_from_args(args)
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from service.server import serve

        return serve(settings)
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    if args.command == "golden":
        return _golden_command(args)
    return _client_command(args)


if __name__ == "__main__":
    raise SystemExit(main())
