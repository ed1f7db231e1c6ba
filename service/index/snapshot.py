"""The index directory on disk: MANIFEST.json (the commit point), snapshot files, WAL segments, a lock file.

    INDEX/
      MANIFEST.json              format, config, recipe, and the current snapshot (file names, lsn, checksums)
      snap-<lsn>-<tag>.faiss     faiss.write_index of the FAISS index at that lsn
      snap-<lsn>-<tag>.items.json  row -> id (null = tombstone) and row -> metadata
      wal-<lsn>.log              write-ahead log segments (wal.py)
      LOCK                       flock'ed by the one process that may write

A snapshot writes its two files (temp, fsync, rename), then replaces MANIFEST.json the same way: until that rename
the old manifest names the old, untouched files, so a crash at any point leaves either snapshot whole. Files no
manifest names (a crash's leftovers) are deleted on the next open.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any

import faiss

from aimcore import sha256_file
from aimcore.fsio import atomic_path, atomic_write_text
from service.index.errors import IndexCorruptError, IndexNotFoundError
from service.index.store import ItemTable

__all__ = ["FORMAT", "MANIFEST_NAME", "cleanup", "load_snapshot", "read_manifest", "write_manifest", "write_snapshot"]

logger = logging.getLogger(__name__)

FORMAT = "aim-index/1"
MANIFEST_NAME = "MANIFEST.json"


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise IndexNotFoundError(f"no index at {directory} ({MANIFEST_NAME} missing); build one first")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:  # atomic writes make this a foreign or hand-edited file, not a torn one
        raise IndexCorruptError(f"{path} is not valid JSON: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise IndexCorruptError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    return manifest


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(directory / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True))


def write_snapshot(directory: Path, lsn: int, index: faiss.Index, table: ItemTable) -> dict[str, Any]:
    """Write the snapshot files durably; returns the manifest's "snapshot" section (not yet committed)."""
    started = time.perf_counter()
    # A random tag: two snapshots at one lsn (a forced compaction) must never overwrite the committed files.
    stem = f"snap-{lsn:020d}-{secrets.token_hex(4)}"
    names = {"faiss": f"{stem}.faiss", "items": f"{stem}.items.json"}
    with atomic_path(directory / names["faiss"]) as tmp:
        faiss.write_index(index, str(tmp))
    with atomic_path(directory / names["items"]) as tmp:
        tmp.write_text(json.dumps(table.to_json(), separators=(",", ":")))
    section = {
        "lsn": lsn,
        "files": names,
        "sha256": {k: sha256_file(directory / v) for k, v in names.items()},
        "bytes": {k: (directory / v).stat().st_size for k, v in names.items()},
        "count": table.n_live,
        "rows": table.n_rows,
        "written_at": time.time(),
    }
    logger.info(
        "snapshot at lsn %d: %d items, %.1f MiB in %.2fs",
        lsn,
        table.n_live,
        sum(section["bytes"].values()) / 2**20,
        time.perf_counter() - started,
    )
    return section


def load_snapshot(directory: Path, section: dict[str, Any], *, verify: bool) -> tuple[faiss.Index, ItemTable]:
    paths = {k: directory / v for k, v in section["files"].items()}
    for key, path in paths.items():
        if not path.is_file():
            raise IndexCorruptError(f"snapshot file {path} named in {MANIFEST_NAME} is missing")
        if verify and sha256_file(path) != section["sha256"][key]:
            raise IndexCorruptError(f"snapshot file {path} fails its sha256 check")
    index = faiss.read_index(str(paths["faiss"]))
    table = ItemTable.from_json(json.loads(paths["items"].read_text()))
    if index.ntotal != table.n_rows:
        raise IndexCorruptError(f"snapshot holds {index.ntotal} vectors but {table.n_rows} item rows")
    return index, table


def cleanup(directory: Path, manifest: dict[str, Any]) -> None:
    """Delete temp files and snapshot files that the manifest does not name."""
    snapshot = manifest.get("snapshot") or {}
    keep = set((snapshot.get("files") or {}).values())
    for path in directory.iterdir():
        stale_tmp = path.name.startswith(".") and path.name.endswith(".tmp")
        stale_snap = path.name.startswith("snap-") and path.name not in keep
        if stale_tmp or stale_snap:
            logger.info("removing leftover %s", path.name)
            path.unlink(missing_ok=True)
