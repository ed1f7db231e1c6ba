"""The dependency direction of STYLE.md: training -> aimcore <- export, service; service never imports training,
export never imports service; aimcore imports only torch, numpy, Pillow, safetensors and the standard library
(huggingface_hub lazily, as an option)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"aimcore", "training", "export", "service"}
# huggingface_hub and tokenizers (the LiT tokenizer) are optional, imported lazily where needed.
AIMCORE_ALLOWED = {"torch", "numpy", "PIL", "safetensors", "huggingface_hub", "tokenizers", "aimcore"}
FORBIDDEN = {"aimcore": {"training", "export", "service"}, "service": {"training"}, "export": {"service", "training"}}


def imports_of(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependency_direction(package: str) -> None:
    for path, names in imports_of(package).items():
        bad = names & FORBIDDEN[package]
        assert not bad, f"{path} imports {sorted(bad)}"


def test_aimcore_imports_only_its_small_dependency_set() -> None:
    stdlib = set(sys.stdlib_module_names)
    for path, names in imports_of("aimcore").items():
        extra = names - stdlib - AIMCORE_ALLOWED - {"__future__"}
        assert not extra, f"{path} imports {sorted(extra)}"
