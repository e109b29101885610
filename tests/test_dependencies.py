"""A line PC installs what CI tested: bounded runtime dependencies, and exact pins that satisfy them."""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pins() -> dict[str, Version]:
    lines = (ROOT / "config" / "constraints.txt").read_text().splitlines()
    found = {}
    for line in lines:
        if line and not line.startswith("#"):
            name, version = line.split("==")
            found[canonical(name)] = Version(version)
    return found


def requirements(exclude: tuple[str, ...] = ()) -> list[Requirement]:
    reqs = [Requirement(r) for r in project()["dependencies"]]
    for name, extra in project()["optional-dependencies"].items():
        if name not in exclude:
            reqs += [Requirement(r) for r in extra]
    return reqs


def test_every_runtime_dependency_has_an_upper_bound():
    for req in map(Requirement, project()["dependencies"]):
        assert any(spec.operator in ("<", "<=", "==", "~=") for spec in req.specifier), (
            f"{req}: a line PC must not resolve an untested major version"
        )


# extras installed into their own virtual environment, never this one (`serve`: PyTriton 0.7 needs numpy<2); its
# pins are config/serve-constraints.txt, checked by tests/test_serve.py in that environment
SEPARATE_ENVIRONMENT_EXTRAS = ("serve",)


def test_the_pins_satisfy_the_declared_ranges():
    pinned = pins()
    for req in requirements(exclude=SEPARATE_ENVIRONMENT_EXTRAS):
        assert canonical(req.name) in pinned, f"{req.name} is not pinned in config/constraints.txt"
        assert req.specifier.contains(pinned[canonical(req.name)], prereleases=True), (
            f"config/constraints.txt pins {req.name}=={pinned[canonical(req.name)]}, outside {req}"
        )


def test_this_environment_is_the_pinned_one():
    """CI installs with PIP_CONSTRAINT=config/constraints.txt: what it tests is exactly what the pins say."""
    pinned = pins()
    here = requirements(exclude=SEPARATE_ENVIRONMENT_EXTRAS)
    for req in here:
        installed = Version(md.version(req.name))
        assert installed == pinned[canonical(req.name)], (
            f"{req.name} {installed} is installed but config/constraints.txt pins {pinned[canonical(req.name)]}: "
            "install with -c config/constraints.txt, or regenerate it (.ci/make_constraints.py) after testing"
        )
