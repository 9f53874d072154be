"""What one requirement adds to an installed environment: the distributions only it pulls in
(not needed by any other requirement of cifar-job) and their size on disk.

    python bench/client_size.py              # mlflow-skinny, in this environment
    python bench/client_size.py tensorboard

Run in the image by tests/test_docker.py (the image's figure in the README comes from there).
"""

from __future__ import annotations

import re
import sys
from importlib import metadata


def name(requirement: str) -> str:
    return re.split(r"[ ;<>=!~\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def closure(roots: list[str]) -> set[str]:
    """Every distribution installed for these requirements (extras not followed)."""
    seen: set[str] = set()
    todo = [name(r) for r in roots]
    while todo:
        dist = todo.pop()
        if dist in seen:
            continue
        try:
            requires = metadata.requires(dist) or []
        except metadata.PackageNotFoundError:
            continue
        seen.add(dist)
        todo += [name(r) for r in requires if "extra ==" not in r]
    return seen


def size(dist: str) -> int:
    files = metadata.distribution(dist).files or []
    return sum(f.locate().stat().st_size for f in files if f.locate().is_file())


def main() -> None:
    target = name(sys.argv[1] if len(sys.argv) > 1 else "mlflow-skinny")
    ours = [r for r in metadata.requires("cifar-job") or [] if "extra ==" not in r]
    only = sorted(closure([target]) - closure(ours))
    total = sum(size(d) for d in only)
    print(f"{target} adds {len(only)} distributions, {total / 1e6:.0f} MB: {' '.join(only)}")


if __name__ == "__main__":
    main()
