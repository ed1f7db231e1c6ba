"""`python -m service [serve] [--flags]`, `python -m service embed|classify|search|index|info ...`, `... golden SOURCE`.

serve (the default): the HTTP service; every setting is a flag or an AIM_* variable (`python -m service serve --help`).
embed / classify / search / index add|get|delete|info|snapshot / info: talk to a running server (--url, default
http://127.0.0.1:8000, or AIM_URL) through service.client and print JSON lines (one per image where there are
images); errors are one line with the server's code, exit status 1 (2 for a bad argument or a missing file).
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
from typing import Any

# onnxruntime 1.2x+ starts a telemetry client when it loads: it would send usage events from a server, and on a
# read-only root (the compose service) it warns at every start that it cannot persist its device id under
# ~/.cache. Off for the service's entry point, before anything imports onnxruntime (a value already in the
# environment wins).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from pydantic import ValidationError

from service.settings import add_settings_arguments, settings_from_args

COMMANDS = ("serve", "embed", "classify", "search", "index", "info", "golden")
logger = logging.getLogger("service")


def _connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("AIM_URL", "http://127.0.0.1:8000"), help="server URL")
    parser.add_argument("--api-key", default=os.environ.get("AIM_API_KEY"), help="API key, if the server needs one")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")


def _json_arg(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text!r}") from None


def _client_parsers(sub: argparse._SubParsersAction) -> None:
    embed = sub.add_parser("embed", help="embed images with a running server")
    embed.add_argument("images", nargs="+", help="image files")
    embed.add_argument("--pooling", choices=["mean", "probe"], default="mean")
    embed.add_argument("--no-normalize", action="store_true", help="raw vectors, not L2-normalised")
    classify = sub.add_parser("classify", help="classify images with a running server")
    classify.add_argument("images", nargs="+", help="image files")
    classify.add_argument("--top-k", type=int, default=5)
    search = sub.add_parser("search", help="nearest neighbours of images (one JSON line each) or of a stored --id")
    search.add_argument("images", nargs="*", help="query image files")
    search.add_argument("--id", default=None, help="search by a stored item instead of images")
    search.add_argument("-k", "--k", type=int, default=10, help="neighbours per query")
    search.add_argument(
        "--where", type=_json_arg, default=None, help='metadata filter as JSON, e.g. \'{"kind": "cat"}\''
    )
    search.add_argument("--score-threshold", type=float, default=None)
    index = sub.add_parser("index", help="manage the index: add, get, delete, info, snapshot")
    actions = index.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="add or replace images (ids default to the file names)")
    add.add_argument("images", nargs="+", help="image files")
    add.add_argument("--ids", nargs="+", default=None, help="one id per image")
    add.add_argument("--metadata", type=_json_arg, default=None, help="JSON list: one object (or null) per image")
    get = actions.add_parser("get", help="one stored item")
    get.add_argument("id")
    get.add_argument("--vector", action="store_true", help="include its unit vector")
    delete = actions.add_parser("delete", help="delete items")
    delete.add_argument("ids", nargs="+")
    actions.add_parser("info", help="type, size, recipe and parameters of the index")
    actions.add_parser("snapshot", help="fold the write-ahead log into a snapshot now")
    info = sub.add_parser("info", help="what the server serves (/info)")
    for parser in (embed, classify, search, add, get, delete, info, *actions.choices.values()):
        if not any(a.dest == "url" for a in parser._actions):
            _connection_args(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the HTTP service (default)")
    add_settings_arguments(serve)
    _client_parsers(sub)
    golden = sub.add_parser("golden", help="store reference outputs with a model for the boot self-check")
    golden.add_argument("source", help="checkpoint file or folder, or export directory")
    golden.add_argument("--out", type=Path, default=None, help="where to write (default: beside the weights)")
    return parser


def _client_rows(client: Any, args: argparse.Namespace) -> list[Any]:
    """The JSON lines a client command prints."""
    cmd = args.command
    if cmd == "embed":
        result = client.embed(args.images, pooling=args.pooling, normalize=not args.no_normalize)
        return [{"image": n, "embedding": v} for n, v in zip(args.images, result["embeddings"], strict=True)]
    if cmd == "classify":
        result = client.classify(args.images, top_k=args.top_k)
        return [{"image": n, **p} for n, p in zip(args.images, result["predictions"], strict=True)]
    if cmd == "search":
        if bool(args.images) == (args.id is not None):
            raise ValueError("search needs image files or --id (not both)")
        knobs = {"k": args.k, "where": args.where, "score_threshold": args.score_threshold}
        if args.id is not None:
            return [{"id": args.id, **client.search(id=args.id, **knobs)["results"][0]}]
        results = client.search(args.images, **knobs)["results"]
        return [{"image": n, **r} for n, r in zip(args.images, results, strict=True)]
    if cmd == "info":
        return [client.info()]
    action = args.action
    if action == "add":
        ids = args.ids or [Path(p).name for p in args.images]
        if len(ids) != len(args.images):
            raise ValueError(f"{len(ids)} --ids for {len(args.images)} images")
        return [client.add_items(ids, args.images, metadata=args.metadata)]
    if action == "get":
        return [client.get_item(args.id, vector=args.vector)]
    if action == "delete":
        return [client.delete_item(i) for i in args.ids]
    return [client.index_info() if action == "info" else client.snapshot()]


def _client_command(args: argparse.Namespace) -> int:
    from service.client import AimClient, ImageFileError, ServiceClientError

    try:
        with AimClient(args.url, api_key=args.api_key, timeout=args.timeout) as client:
            rows = _client_rows(client, args)
    except (ServiceClientError, ImageFileError, ValueError) as exc:
        logger.error("%s", exc)  # one line, no traceback: the server's code and message, or the bad argument
        return 1 if isinstance(exc, ServiceClientError) else 2
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


_SECRET_SETTINGS = ("api_keys",)


def settings_error_line(exc: ValidationError) -> str:
    """One line naming each bad setting, its variable and flag, and why; pydantic's report is for developers."""
    parts = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err.get("loc", ())) or "settings"
        where = f"{name} (AIM_{name.upper()}, --{name.replace('_', '-')})" if name != "settings" else name
        got = "" if name in _SECRET_SETTINGS or "input" not in err else f", got {err['input']!r}"
        parts.append(f"{where}: {err.get('msg', 'invalid')}{got}")
    return "invalid settings: " + "; ".join(parts)


def _configure_logging(level: str, fmt: str) -> None:
    logging.basicConfig(level=level, format=fmt)
    if level.upper() != "DEBUG":
        # faiss's loader logs at INFO every variant it tries and fails to import (AVX512, AVX2) before the generic
        # build that this wheel ships: four lines with a ModuleNotFoundError at every start, saying nothing wrong.
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["serve", *argv]
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        try:
            settings = settings_from_args(args)
        except ValidationError as exc:
            _configure_logging("INFO", "%(levelname)s %(name)s: %(message)s")
            logger.error("%s", settings_error_line(exc))
            return 2
        _configure_logging(settings.log_level.upper(), "%(asctime)s %(levelname)s %(name)s: %(message)s")
        from service.server import serve

        return serve(settings)
    _configure_logging("INFO", "%(levelname)s %(name)s: %(message)s")
    if args.command == "golden":
        return _golden_command(args)
    return _client_command(args)


if __name__ == "__main__":
    raise SystemExit(main())
