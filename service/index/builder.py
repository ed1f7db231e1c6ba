"""Offline index builder: embed a folder of images (recursively) into an index the service loads.

- id = the file's path relative to the folder (POSIX separators); metadata {"dir", "width", "height"}.
- Resumable: every chunk is upserted (durable) as soon as it is embedded; a re-run skips ids already present,
  so an interrupted build continues where it stopped.
- Corrupt, truncated or unsupported files are skipped, logged and listed in `<index>/build-report.json`.
- IVF kinds train automatically once `train_min` vectors are in; a smaller collection is trained at the end.
- Idempotent (a pipeline re-runs it): an index already holding every image with this model's recipe is left as it
  is, even while a service holds it open; with `rebuild_stale`, an index of another model is rebuilt from scratch
  instead of refused (RecipeMismatchError).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from aimcore.fsio import atomic_write_text
from service.index.config import IndexConfig
from service.index.embedder import ImageEmbedder
from service.index.errors import IndexLockedError, RecipeMismatchError
from service.index.index import VectorIndex
from service.index.snapshot import MANIFEST_NAME
from service.index.store import id_problem

__all__ = ["IMAGE_SUFFIXES", "BuildReport", "build_index", "find_images"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
REPORT_NAME = "build-report.json"


@dataclass
class BuildReport:
    images_found: int = 0
    already_indexed: int = 0
    added: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)  # [{"id": ..., "reason": ...}]
    index_size: int = 0
    seconds: float = 0.0
    recipe_fingerprint: str = ""

    @property
    def images_per_s(self) -> float:
        return self.added / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "images_per_s": round(self.images_per_s, 2)}


def find_images(root: Path) -> list[Path]:
    """Image files under root by suffix, sorted (stable ids and progress), hidden files and folders skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(
            Path(dirpath) / f for f in filenames if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES
        )
    return sorted(found)


def build_index(
    images: str | os.PathLike[str],
    out: str | os.PathLike[str],
    embedder: ImageEmbedder,
    config: IndexConfig | None = None,
    *,
    chunk_size: int | None = None,
    progress: bool = True,
    on_chunk: Callable[[int], None] | None = None,
    rebuild_stale: bool = False,
) -> BuildReport:
    """Embed every image under `images` not yet in the index at `out` (created with `config` if absent).

    An existing index must have been built with the embedder's recipe (RecipeMismatchError otherwise) and, when
    `config` is given, of the same kind; `rebuild_stale` replaces one of another recipe by a new build instead.
    on_chunk(n_added_so_far) runs after each durable chunk (tests use it)."""
    started = time.perf_counter()
    root = Path(images)
    if not root.is_dir():
        raise NotADirectoryError(f"--images {root} is not a directory")
    recipe = embedder.recipe
    out = Path(out)
    if (out / MANIFEST_NAME).exists():
        try:
            index = VectorIndex.open(out)
        except IndexLockedError:
            return _current_or_raise(root, out, embedder, started)
        if config is not None and config.kind != index.config.kind:
            index.close(snapshot=False)
            raise ValueError(
                f"{out} is a {index.config.kind!r} index, not {config.kind!r}: resume with --type "
                f"{index.config.kind}, or build into a new directory"
            )
        try:
            index.check_recipe(recipe, "resume this build")
        except RecipeMismatchError:
            index.close(snapshot=False)
            if not rebuild_stale:
                raise
            logger.warning("%s was built with another model or recipe: rebuilding it from scratch", out)
            _remove_index(out)
            index = VectorIndex.create(out, recipe, config or IndexConfig())
        except Exception:
            index.close(snapshot=False)
            raise
        else:
            logger.info("resuming %s: %d items already indexed", out, len(index))
    else:
        index = VectorIndex.create(out, recipe, config or IndexConfig())
    report = BuildReport(recipe_fingerprint=recipe.fingerprint)
    try:
        files = find_images(root)
        ids = [p.relative_to(root).as_posix() for p in files]
        report.images_found = len(files)
        todo = [(i, p) for i, p in zip(ids, files, strict=True) if i not in index]
        report.already_indexed = len(files) - len(todo)
        # A file name the index refuses as an id (a control character in it) is skipped like an unreadable file,
        # not the reason a whole chunk of good images fails.
        for item_id, _ in todo:
            if (problem := id_problem(item_id)) is not None:
                report.skipped.append({"id": item_id, "reason": problem})
        todo = [(i, p) for i, p in todo if id_problem(i) is None]
        logger.info(
            "%d images under %s, %d already indexed, %d to embed", len(files), root, report.already_indexed, len(todo)
        )
        step = chunk_size or max(embedder.batch_size * 4, 64)
        with tqdm(total=len(todo), unit="img", desc="embedding", disable=not progress) as bar:
            for start in range(0, len(todo), step):
                chunk = todo[start : start + step]
                report.added += _embed_chunk(index, embedder, chunk, report)
                bar.update(len(chunk))
                if on_chunk is not None:
                    on_chunk(report.added)
        if index.config.needs_training and not index.trained and len(index):
            logger.info(
                "training %s on all %d vectors (fewer than train_min=%d)",
                index.config.kind,
                len(index),
                index.config.train_min,
            )
            index.train()
        report.index_size = len(index)
        index.snapshot()
    finally:
        index.close()
    report.seconds = time.perf_counter() - started
    for item in report.skipped:
        logger.warning("skipped %s: %s", item["id"], item["reason"])
    atomic_write_text(out / REPORT_NAME, json.dumps(report.to_dict(), indent=1))
    logger.info(
        "index %s: %d items (%d added, %d skipped) in %.1fs (%.1f images/s)",
        out,
        report.index_size,
        report.added,
        len(report.skipped),
        report.seconds,
        report.images_per_s,
    )
    return report


def _current_or_raise(root: Path, out: Path, embedder: ImageEmbedder, started: float) -> BuildReport:
    """The index is open for writing in another process (a running service): fine when it already holds every
    image with this recipe (nothing to write), else the lock error, saying what to do."""
    with VectorIndex.open(out, read_only=True) as index:
        index.check_recipe(embedder.recipe, "resume this build")
        files = find_images(root)
        skipped = _last_skipped(out)  # unreadable last time: retried by a writable build, not worth an error
        missing = sum(i not in index and i not in skipped for i in (p.relative_to(root).as_posix() for p in files))
        size = len(index)
    if missing:
        raise IndexLockedError(
            f"index {out} is open for writing in another process (a running service?) and lacks {missing} of the "
            f"{len(files)} images: stop that process and run the build again"
        )
    logger.info("index %s is up to date (%d items, open in another process): nothing to do", out, size)
    report = BuildReport(images_found=len(files), already_indexed=len(files), index_size=size)
    report.recipe_fingerprint, report.seconds = embedder.recipe.fingerprint, time.perf_counter() - started
    return report


def _last_skipped(out: Path) -> set[str]:
    try:
        return {item["id"] for item in json.loads((out / REPORT_NAME).read_text())["skipped"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _remove_index(out: Path) -> None:
    """Move the stale index aside before deleting it, so a crash midway never leaves a half-deleted index that
    `open` would try to read."""
    aside = out.with_name(f".{out.name}.stale-{os.getpid()}")
    os.replace(out, aside)
    shutil.rmtree(aside)


def _embed_chunk(
    index: VectorIndex, embedder: ImageEmbedder, chunk: list[tuple[str, Path]], report: BuildReport
) -> int:
    decoded = embedder.decode([p for _, p in chunk])
    ok = []
    for (item_id, _), image in zip(chunk, decoded, strict=True):
        if image.pixels is None:
            report.skipped.append({"id": item_id, "reason": image.error or "unreadable"})
        else:
            ok.append((item_id, image))
    if not ok:
        return 0
    vectors = embedder.embed([image.pixels for _, image in ok if image.pixels is not None])
    ids, rows, metas = [], [], []
    for (item_id, image), vector in zip(ok, vectors, strict=True):
        if isinstance(vector, BaseException):
            report.skipped.append({"id": item_id, "reason": f"model failed: {vector}"})
            continue
        ids.append(item_id)
        rows.append(vector)
        parent = Path(item_id).parent.as_posix()
        metas.append({"dir": "" if parent == "." else parent, "width": image.width, "height": image.height})
    if ids:
        index.upsert(ids, np.stack(rows), metas, recipe=embedder.recipe)
    return len(ids)
