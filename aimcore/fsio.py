"""Crash-safe file writes: write a temp file beside the target, fsync it, rename over the target, fsync the
directory. A reader sees the old file or the new one, never a torn one, even after kill -9 or power loss."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "canonicalize_safetensors",
    "fsync_dir",
    "save_safetensors",
]


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Persist a rename: fsync the directory entry (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _default_mode(target: Path) -> int:
    """The mode a plain open() would give: the existing file's, else 0o666 minus the umask (mkstemp's 0o600 would
    make checkpoints unreadable to a container's non-root user)."""
    try:
        return target.stat().st_mode & 0o777
    except FileNotFoundError:
        pass
    umask = 0o022
    try:  # reading the umask via os.umask() would briefly change it for every thread
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                umask = int(line.split()[1], 8)
    except OSError:
        pass
    return 0o666 & ~umask


@contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `target` durably, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _default_mode(target))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def atomic_write_text(target: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(target, text.encode("utf-8"))


def canonicalize_safetensors(path: str | os.PathLike[str]) -> None:
    """Rewrite a safetensors file's JSON header with sorted keys, in place.

    safetensors keeps `__metadata__` in a Rust HashMap, so the same tensors and metadata saved twice come out in a
    different key order, hence different bytes and sha256 (and every hash-keyed cache downstream misses). The
    header is `u64 length (little-endian) | JSON | data`; the data offsets are relative to the end of the header,
    so only the JSON changes. Sorted, compact JSON escapes the same characters as serde_json, so it has the same
    length and is written over the old one; if not, it is padded with spaces (the format allows trailing
    whitespace) or, when longer, the file is copied behind a new header.
    """
    path = Path(path)
    with open(path, "rb+") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
        meta = header.pop("__metadata__", None)
        canonical: dict[str, object] = {}
        if meta is not None:
            canonical["__metadata__"] = dict(sorted(meta.items()))
        canonical.update(sorted(header.items()))
        text = json.dumps(canonical, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) <= length:
            fh.seek(8)
            fh.write(text + b" " * (length - len(text)))
            return
    padded = text + b" " * (-len(text) % 8)
    tmp = path.with_name(path.name + ".canon")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        dst.write(struct.pack("<Q", len(padded)) + padded)
        src.seek(8 + length)
        shutil.copyfileobj(src, dst, 1 << 22)
    os.replace(tmp, path)


def save_safetensors(
    tensors: dict[str, Any], target: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> Path:
    """`safetensors.torch.save_file`, atomically and byte-deterministically: the same tensors and metadata always
    give the same file (see `canonicalize_safetensors`)."""
    from safetensors.torch import save_file

    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        canonicalize_safetensors(tmp)
    return Path(target)
