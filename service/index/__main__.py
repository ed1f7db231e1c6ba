"""`python -m service.index build --images DIR --out INDEX [--type hnsw] [--checkpoint SRC] [--batch-size N]`
and `python -m service.index info INDEX` (the index's stats as JSON on stdout).

The model is loaded exactly as the service loads it (`service.backends.create_backend` over the service's
Settings: AIM_* environment variables apply, `--checkpoint` sets the model), so the index's recipe matches the
service's and /search accepts it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from service.index.config import INDEX_KINDS, IndexConfig
from service.index.index import VectorIndex

logger = logging.getLogger("service.index")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service.index", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="embed a folder of images into an index (resumable)")
    build.add_argument("--images", required=True, help="folder of images, searched recursively")
    build.add_argument("--out", required=True, help="index directory (created, or resumed if it exists)")
    build.add_argument("--type", choices=INDEX_KINDS, default="hnsw", help="index kind (default hnsw)")
    build.add_argument("--checkpoint", help="model: checkpoint file/folder, export dir, aim-600M, HF id (AIM_MODEL)")
    build.add_argument("--batch-size", type=int, help="images per backend call (AIM_MAX_BATCH_SIZE, default 32)")
    build.add_argument(
        "--output",
        choices=("embedding", "pooled"),
        default="embedding",
        help="vector: mean-pooled last block (embedding) or the probe head's attention pooling",
    )
    build.add_argument("--backend", choices=("auto", "torch", "onnxruntime", "tensorrt"), help="AIM_BACKEND")
    build.add_argument("--device", help="auto, cpu, cuda, cuda:N (AIM_DEVICE)")
    build.add_argument("--decode-workers", type=int, default=2, help="threads decoding images")
    build.add_argument("--hnsw-m", type=int, default=IndexConfig.hnsw_m)
    build.add_argument("--ef-construction", type=int, default=IndexConfig.ef_construction)
    build.add_argument("--ef-search", type=int, default=IndexConfig.ef_search)
    build.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~4*sqrt(n))")
    build.add_argument("--nprobe", type=int, default=IndexConfig.nprobe)
    build.add_argument("--train-min", type=int, default=IndexConfig.train_min)
    build.add_argument("--pq-m", type=int, default=None)
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.add_argument(
        "--rebuild-stale",
        action="store_true",
        help="an existing index of another model or recipe is rebuilt from scratch instead of refused",
    )
    info = sub.add_parser("info", help="print an index's stats as JSON")
    info.add_argument("index")
    parser.add_argument("--log-level", default="INFO")
    return parser


def _build(args: argparse.Namespace) -> int:
    from service.backends import create_backend
    from service.index.builder import build_index
    from service.index.embedder import ImageEmbedder
    from service.settings import Settings

    given = {
        "model": args.checkpoint,
        "max_batch_size": args.batch_size,
        "backend": args.backend,
        "device": args.device,
    }
    settings = Settings(**{k: v for k, v in given.items() if v is not None})
    loaded = create_backend(settings)
    # AIM_PREPROCESS_MODE=fast builds with the fast recipe, so a fast-mode service can serve the index.
    info = loaded.backend.info
    info.preprocess = dataclasses.replace(info.preprocess, fidelity=settings.preprocess_mode)
    for warning in loaded.warnings:
        logger.warning("%s", warning)
    config = IndexConfig(
        kind=args.type,
        hnsw_m=args.hnsw_m,
        ef_construction=args.ef_construction,
        ef_search=args.ef_search,
        nlist=args.nlist,
        nprobe=args.nprobe,
        train_min=args.train_min,
        pq_m=args.pq_m,
    )
    embedder = ImageEmbedder(
        loaded.backend, output=args.output, max_batch_size=settings.max_batch_size, decode_workers=args.decode_workers
    )
    try:
        report = build_index(
            args.images, args.out, embedder, config, progress=not args.no_progress, rebuild_stale=args.rebuild_stale
        )
    finally:
        embedder.close()
        loaded.backend.close()
    if report.skipped:
        logger.warning("%d files skipped (listed in %s/build-report.json)", len(report.skipped), args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level.upper() != "DEBUG":  # faiss's loader: INFO lines for each SIMD build it fails to import
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    if args.command == "build":
        return _build(args)
    with VectorIndex.open(args.index, read_only=True) as index:
        sys.stdout.write(json.dumps(index.stats().to_dict(), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
