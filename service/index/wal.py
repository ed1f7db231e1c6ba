"""Append-only write-ahead log: every add/delete is framed, checksummed, appended and fdatasync'ed before the call
returns, so an acknowledged write survives kill -9 and power loss.

Layout: segment files `wal-<first lsn, 20 digits>.log` in the index directory. A snapshot at lsn L rotates to a new
segment starting at L+1 and then deletes the older ones; replay skips records <= the snapshot's lsn, so a crash
between the snapshot's commit and the deletion only leaves records that are skipped.

Record: header (magic "AIW1", payload length u32, lsn u64, crc32 of lsn + payload u32) then the payload:
- upsert: op u8 = 1, n u32, dim u32, json length u32, JSON [[id, metadata], ...], n*dim float32 (little-endian);
- delete: op u8 = 2, JSON [id, ...].
A crash mid-append leaves a short or mis-checksummed record at the very end of the newest segment: it was never
acknowledged, so replay drops it, truncates the file there and logs a warning. Damage anywhere else is corruption.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aimcore.fsio import fsync_dir
from service.index.errors import IndexCorruptError

__all__ = ["OP_DELETE", "OP_UPSERT", "WalRecord", "WriteAheadLog", "encode_delete", "encode_upsert", "replay"]

logger = logging.getLogger(__name__)

MAGIC = b"AIW1"
HEADER = struct.Struct("<4sIQI")
LSN = struct.Struct("<Q")
UPSERT_HEAD = struct.Struct("<BIII")
OP_UPSERT = 1
OP_DELETE = 2
SEGMENT_RE = re.compile(r"^wal-(\d{20})\.log$")
MAX_PAYLOAD = (1 << 32) - 1


@dataclass
class WalRecord:
    lsn: int
    op: int
    ids: list[str]
    metas: list[dict[str, Any] | None]
    vectors: np.ndarray | None  # (n, dim) float32 for upserts


def encode_upsert(ids: Sequence[str], vectors: np.ndarray, metas: Sequence[dict[str, Any] | None]) -> bytes:
    items = json.dumps([[i, m] for i, m in zip(ids, metas, strict=True)], separators=(",", ":")).encode()
    vecs = np.ascontiguousarray(vectors, dtype="<f4")
    return UPSERT_HEAD.pack(OP_UPSERT, vecs.shape[0], vecs.shape[1], len(items)) + items + vecs.tobytes()


def encode_delete(ids: Sequence[str]) -> bytes:
    return bytes([OP_DELETE]) + json.dumps(list(ids)).encode()


def _decode(lsn: int, payload: bytes) -> WalRecord:
    op = payload[0]
    if op == OP_UPSERT:
        _, n, dim, json_len = UPSERT_HEAD.unpack_from(payload)
        start = UPSERT_HEAD.size
        items = json.loads(payload[start : start + json_len])
        vectors = np.frombuffer(payload, dtype="<f4", offset=start + json_len, count=n * dim).reshape(n, dim)
        return WalRecord(lsn, op, [i for i, _ in items], [m for _, m in items], vectors.astype(np.float32))
    if op == OP_DELETE:
        ids = json.loads(payload[1:])
        return WalRecord(lsn, op, ids, [None] * len(ids), None)
    raise ValueError(f"unknown WAL op {op}")


def segments(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for path in directory.iterdir():
        match = SEGMENT_RE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def segment_path(directory: Path, first_lsn: int) -> Path:
    return directory / f"wal-{first_lsn:020d}.log"


def _read_segment(path: Path, *, is_last: bool, truncate: bool) -> Iterator[tuple[int, bytes]]:
    """(lsn, payload) of each intact record. A torn tail of the last segment is dropped (and cut from the file
    when `truncate`: a read-only reader must not touch a file another process may be appending to)."""
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        problem = None
        end = pos + HEADER.size
        if end > len(data):
            problem = "short header"
        else:
            magic, length, lsn, crc = HEADER.unpack_from(data, pos)
            if magic != MAGIC:
                problem = "bad magic"
            elif end + length > len(data):
                problem = "short payload"
            else:
                payload = data[end : end + length]
                if zlib.crc32(payload, zlib.crc32(LSN.pack(lsn))) != crc:
                    problem = "checksum mismatch"
                    # A bad checksum with intact records after it is not a torn append.
                    if end + length < len(data):
                        is_last = False
        if problem is None:
            yield lsn, payload
            pos = end + length
            continue
        if not is_last:
            raise IndexCorruptError(f"WAL segment {path} is damaged at byte {pos} ({problem}), before its tail")
        logger.warning(
            "WAL %s: dropping a torn tail of %d bytes at offset %d (%s): an append interrupted by a crash, "
            "never acknowledged",
            path.name,
            len(data) - pos,
            pos,
            problem,
        )
        if not truncate:
            return
        with open(path, "rb+") as fh:
            fh.truncate(pos)
            os.fsync(fh.fileno())
        return


def replay(directory: Path, after_lsn: int, *, truncate_torn_tail: bool = True) -> Iterator[WalRecord]:
    """Every record with lsn > after_lsn, in order, from all segments."""
    segs = segments(directory)
    expected: int | None = None
    first = True
    for i, (_, path) in enumerate(segs):
        for lsn, payload in _read_segment(path, is_last=i == len(segs) - 1, truncate=truncate_torn_tail):
            if expected is not None and lsn != expected:
                raise IndexCorruptError(f"WAL {path.name}: lsn {lsn} follows {expected - 1} (a record is missing)")
            expected = lsn + 1
            if lsn > after_lsn:
                if first and lsn != after_lsn + 1:
                    raise IndexCorruptError(f"WAL starts at lsn {lsn} but the snapshot ends at {after_lsn}")
                first = False
                yield _decode(lsn, payload)


class WriteAheadLog:
    """The open, newest segment. Used under the index's writer lock only (one appender at a time)."""

    def __init__(self, directory: Path, next_lsn: int) -> None:
        self.directory = directory
        self.next_lsn = next_lsn
        self.ops_since_rotate = 0
        self.bytes_since_rotate = 0
        segs = segments(directory)
        path = segs[-1][1] if segs else segment_path(directory, next_lsn)
        self._open(path)

    def _open(self, path: Path) -> None:
        created = not path.exists()
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._size = os.fstat(self._fd).st_size
        if created:
            os.fsync(self._fd)
            fsync_dir(self.directory)

    def append(self, payload: bytes) -> int:
        """Write one record and make it durable; returns its lsn. On failure nothing of it remains."""
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"WAL record of {len(payload)} bytes is too large; add fewer items per call")
        lsn = self.next_lsn
        crc = zlib.crc32(payload, zlib.crc32(LSN.pack(lsn)))
        record = HEADER.pack(MAGIC, len(payload), lsn, crc) + payload
        try:
            view = memoryview(record)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fdatasync(self._fd)
        except BaseException:
            # Cut a partial record so the next append does not land behind garbage.
            os.ftruncate(self._fd, self._size)
            raise
        self._size += len(record)
        self.next_lsn = lsn + 1
        self.ops_since_rotate += 1
        self.bytes_since_rotate += len(record)
        return lsn

    def rotate(self) -> None:
        """Start a new segment at next_lsn and delete the older ones (their records are all in a snapshot now)."""
        os.close(self._fd)
        old = [p for _, p in segments(self.directory)]
        self._open(segment_path(self.directory, self.next_lsn))
        for path in old:
            if path != self.path:
                path.unlink(missing_ok=True)
        fsync_dir(self.directory)
        self.ops_since_rotate = 0
        self.bytes_since_rotate = 0

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for _, p in segments(self.directory))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
