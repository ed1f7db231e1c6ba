"""Print the requirements of pyproject.toml's core dependencies plus the named extras, one per line.

Used by the Dockerfile to install the dependencies in their own layer before the source is copied, so editing code
does not re-download them. Runs with the base image's python3 (3.11: tomllib), before the venv has anything in it.

    python3 requirements.py pyproject.toml serve hub > requirements.txt
    python3 requirements.py pyproject.toml serve hub --without onnxruntime,faiss-cpu   # the GPU image's CUDA builds
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib

SELF_REFERENCE = re.compile(r"^aim-stack(\[|$)")  # e.g. the dev extra's "aim-stack[train,export,serve]"


def _name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower()


def requirements(pyproject: str, extras: list[str], without: frozenset[str] = frozenset()) -> list[str]:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"unknown extras {unknown}; pyproject.toml has {sorted(optional)}")
    out: list[str] = []
    for req in [*project["dependencies"], *(r for e in extras for r in optional[e])]:
        # torch is installed separately (TORCH_SOURCE); a bare requirement here could pull a CUDA build.
        if SELF_REFERENCE.match(req) or _name(req) == "torch" or _name(req) in without or req in out:
            continue
        out.append(req)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pyproject")
    parser.add_argument("extras", nargs="*")
    parser.add_argument("--without", default="", help="comma-separated distribution names to leave out")
    args = parser.parse_args()
    without = frozenset(n.strip().lower() for n in args.without.split(",") if n.strip())
    sys.stdout.write("".join(r + "\n" for r in requirements(args.pyproject, args.extras, without)))


if __name__ == "__main__":
    main()
