"""The documents and the code agree: every dotted name the docs mention imports, and the module map is the tree."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "systemd" / "README.md",
    ROOT / "benchmarks" / "README.md",
]
DOTTED = re.compile(r"(?<![\w./-])linewatch(?:\.[A-Za-z_]\w*)+")


def documented_names() -> dict[str, str]:
    names: dict[str, str] = {}
    for doc in DOCS:
        for name in DOTTED.findall(doc.read_text()):
            names.setdefault(name.rstrip("."), doc.name)
    return names


def resolve(name: str) -> object:
    """Import the longest module prefix of `name`, then follow the rest as attributes."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(name)


def test_every_documented_name_imports():
    names = documented_names()
    assert len(names) > 15, names  # the docs do name the public API
    failures = []
    for name, doc in sorted(names.items()):
        try:
            resolve(name)
        except (ImportError, AttributeError) as exc:
            failures.append(f"{doc}: {name}: {exc}")
    assert not failures, "\n".join(failures)


def test_public_api_names_are_documented_and_import():
    from linewatch.calibrate import load_calibration, write_calibration
    from linewatch.line.engine import Engine
    from linewatch.line.verdict import judge
    from linewatch.protocol import Subscriber, TriggerClient

    assert all(callable(x) for x in (load_calibration, write_calibration, Engine, judge, Subscriber, TriggerClient))
    names = documented_names()
    for name in (
        "linewatch.protocol.Subscriber",
        "linewatch.protocol.TriggerClient",
        "linewatch.calibrate.load_calibration",
        "linewatch.calibrate.write_calibration",
        "linewatch.line.verdict.judge",
        "linewatch.line.engine.Engine",
    ):
        assert name in names, f"{name} is public API but no document names it"


def installed_modules() -> set[str]:
    """Source paths of the modules as imported (checkout or installed wheel), export/ under its source name."""
    import linewatch
    import linewatch.export

    found = set()
    for package, source_name in ((linewatch, "linewatch"), (linewatch.export, "export")):
        root = Path(package.__file__).parent
        for path in root.rglob("*.py"):
            rel = path.relative_to(root)
            if path.name != "__init__.py" and not (package is linewatch and rel.parts[0] == "export"):
                found.add(f"{source_name}/{rel.as_posix()}")
    return found


def test_design_module_map_is_the_tree():
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    mapped = set(re.findall(r"^\| `((?:linewatch|export)/[\w/]+\.py)` \|", text, re.M))
    tree = installed_modules()
    assert not tree - mapped, f"modules missing from docs/DESIGN.md's module map: {sorted(tree - mapped)}"
    assert not mapped - tree, f"docs/DESIGN.md maps modules that do not exist: {sorted(mapped - tree)}"
