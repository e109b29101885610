"""Print exact pins for everything `linewatch[build,dev,dashboard,opcua,mqtt,postgresql,triton]` pulls in, as
installed here: config/constraints.txt.

Run after a dependency change, on a machine where the CI tests passed:
    python .ci/make_constraints.py > config/constraints.txt
A line PC can then install what CI tested: `pip install linewatch -c config/constraints.txt`.
"""

from __future__ import annotations

import importlib.metadata as md
import re

from packaging.markers import default_environment
from packaging.requirements import Requirement


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str, extras: set[str]) -> dict[str, str]:
    """Installed versions of `root`'s requirements (with `extras`), transitively, for this interpreter."""
    env = default_environment()
    pins: dict[str, str] = {}
    todo = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        key = canonical(name)
        if key in pins:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        pins[key] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in wanted or {""}):
                todo.append((req.name, set(req.extras)))
    pins.pop(canonical(root), None)
    return pins


def main() -> None:
    pins = closure("linewatch", {"build", "dev", "dashboard", "opcua", "mqtt", "postgresql", "triton"})
    pins.update(closure("pyimgano", set()) | {"pyimgano": md.version("pyimgano")})  # installed --no-deps by CI
    print("# Exact versions CI tested (python .ci/make_constraints.py > config/constraints.txt); used by .ci/run.")
    for name, version in sorted(pins.items()):
        print(f"{name}=={version}")


if __name__ == "__main__":
    main()
