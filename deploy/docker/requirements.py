"""Print inferq's runtime requirements from pyproject.toml, one per line, without the ones named.

The images install their dependencies from this list and then the project itself with
`pip install --no-deps .`. pyproject.toml lists torch (and the embedded servers that only `inferq up`
uses) as hard dependencies, and the API image must not carry torch: it only counts tokens, which
transformers does without torch. Deriving the list from pyproject.toml keeps it in step with it.

    python deploy/docker/requirements.py pyproject.toml torch accelerate > requirements.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path


def name_of(requirement: str) -> str:
    """The normalized project name of a PEP 508 requirement (`uvicorn[standard]>=0.30` -> `uvicorn`)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(pyproject: Path, without: list[str]) -> list[str]:
    deps: list[str] = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    skip = {name_of(n) for n in without}
    unknown = skip - {name_of(d) for d in deps}
    if unknown:  # a typo here would silently keep a dependency in the image
        raise SystemExit(f"not dependencies of the project: {', '.join(sorted(unknown))}")
    return [d for d in deps if name_of(d) not in skip]


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    print("\n".join(requirements(Path(argv[0]), argv[1:])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
