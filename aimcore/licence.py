"""The licence of the weights being served, surfaced (in `/info`) rather than hidden (AIMV2_FACTS §1).

Where it comes from, first match wins:
1. the model card beside the weights: `README.md` front matter `license:` (Hugging Face's tag, with
   `license_name` / `license_link` when the tag is `other`), else a `LICENSE*` / `LICENCE*` file's name;
2. the bundled demo: this project's own weights (Apache-2.0, trained on Fashion-MNIST, MIT);
3. a released flavor or `apple/...` hub id with no card at hand: the tag its Hugging Face repo carries
   (AIMv2: `apple-amlr`), marked as such;
4. otherwise unknown, with what to check.
The weights' licence is the publisher's, not ours: this module only reports what it finds.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

__all__ = ["licence_of"]

_CARD_NAMES = ("README.md", "readme.md", "MODEL_CARD.md")
_FILE_PATTERNS = ("LICENSE*", "LICENCE*", "license*", "licence*")
_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.S)
# The tag Apple's Hugging Face repos carry (AIMV2_FACTS §1: `apple-amlr`, earlier `apple-ascl`).
_FAMILY_TAGS = {"aimv2": "apple-amlr"}


def _front_matter(card: Path) -> dict[str, str]:
    """The flat `key: value` pairs of a model card's YAML front matter (no YAML dependency: cards keep the licence
    keys flat)."""
    try:
        text = card.read_text(encoding="utf-8", errors="replace")[:20_000]
    except OSError:
        return {}
    match = _FRONT_MATTER.match(text)
    if not match:
        return {}
    out: dict[str, str] = {}
    for line in match.group(1).splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and not key.startswith((" ", "\t", "-")):
            out[key.strip()] = value.strip().strip("'\"")
    return out


def _from_folder(folder: Path) -> dict[str, Any] | None:
    for name in _CARD_NAMES:
        meta = _front_matter(folder / name)
        if meta.get("license"):
            found: dict[str, Any] = {"id": meta["license"], "from": f"model card ({name})"}
            for extra in ("license_name", "license_link"):
                if meta.get(extra):
                    found[extra.removeprefix("license_")] = meta[extra]
            return found
    for pattern in _FILE_PATTERNS:
        files = sorted(p for p in folder.glob(pattern) if p.is_file())
        if files:
            return {"id": None, "from": f"licence file beside the weights ({files[0].name})", "file": files[0].name}
    return None


def licence_of(source: str | None, flavor: str, *, family: str = "aim") -> dict[str, Any]:
    """{"id": SPDX id or Hugging Face tag or None, "from": where it was found, ...} for the served weights."""
    if source is None or source == "aim-demo":
        return {"id": "Apache-2.0", "from": "bundled aim-demo: this project's weights (data: Fashion-MNIST, MIT)"}
    path = Path(source)
    if path.exists():
        folder = path if path.is_dir() else path.parent
        found = _from_folder(folder) or (_from_folder(folder.parent) if path.is_file() else None)
        if found is not None:
            return found
        return {"id": None, "from": "nothing beside the weights: check the licence of where they came from"}
    name = source.removeprefix("apple/").lower()
    if source.startswith("apple/") or name == flavor.lower() or name.startswith(("aim-", "aimv2-")):
        tag = _FAMILY_TAGS.get("aimv2" if name.startswith("aimv2") or family == "aimv2" else family)
        if tag:
            return {"id": tag, "from": "the Hugging Face repo's licence tag for this family (no model card here)"}
    return {"id": None, "from": "unknown: read the model card of the repo the weights came from"}
