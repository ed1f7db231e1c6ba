"""Names, not paths: what the service says about its files to clients.

The model, the index and the golden file live at server paths (`/srv/models/run-7/trunk.safetensors`,
`/home/alice/...`). Clients need to know *which* model answers, and the weights' sha256 says that exactly; the path
only tells an unauthenticated caller how the server's disk is laid out. So every name a response carries is reduced
to the file's own name (`public_name`), and free text bound for a public answer (/info, /readyz) has absolute paths
cut to their last component (`redact_paths`). Logs keep the full paths: the operator needs them there.
"""

from __future__ import annotations

import os
import re
from typing import Any

__all__ = ["public_name", "redact_paths"]

# An absolute POSIX path of at least two components (`/a/b`), or a home-relative one (`~/a`), not preceded by a
# character that would make it part of a URL (`http://host/a/b`) or of a longer token. Two components so a route
# named in a message (`/embed`) stays as it is.
_SEGMENT = r"[^\s/'\"`<>()\[\]{},;]+"
_ABSOLUTE = re.compile(rf"(?<![\w.:/~-])(?:~|/{_SEGMENT})(?:/{_SEGMENT})*/({_SEGMENT})/?")


def _is_path(value: str) -> bool:
    if value.startswith(("/", "~", "./", "../", "\\")) or re.match(r"^[A-Za-z]:[\\/]", value):
        return True
    if "/" not in value and "\\" not in value:
        return False
    # "apple/aim-600M" is a Hugging Face id; "models/run-7/trunk.safetensors" a relative path: only the disk knows.
    try:
        return os.path.exists(value)
    except (OSError, ValueError):  # NUL bytes, names too long
        return False


def public_name(value: str) -> str:
    """A model or file reference as clients may see it: a path becomes its last component ("aim-debug.safetensors",
    the export folder's name); Hugging Face ids ("apple/aim-600M") and names ("aim-demo") are kept as they are."""
    if not value or not _is_path(value):
        return value
    name = re.split(r"[\\/]", value.rstrip("/\\"))[-1]
    return name or value


def redact_paths(value: Any) -> Any:
    """`value` (a string, or lists and dicts of them, as /info is) with every absolute path cut to its last
    component. A string that is wholly a path goes through `public_name` (relative paths that exist included)."""
    if isinstance(value, str):
        return public_name(value) if _is_path(value) else _ABSOLUTE.sub(lambda m: m.group(1), value)
    if isinstance(value, dict):
        return {k: redact_paths(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_paths(v) for v in value]
    return value
