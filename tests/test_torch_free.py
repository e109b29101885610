"""The runtime must install and run on a line PC without torch: importing it must never load torch."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import linewatch

ROOT = Path(__file__).resolve().parents[1]


# The build side: everything under these packages may import torch; nothing else may.
BUILD_PACKAGES = ("linewatch.training", "linewatch.export")


def runtime_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(linewatch.__path__, "linewatch."):
        if not info.name.startswith(BUILD_PACKAGES):
            names.append(info.name)
    return names


@pytest.mark.unit
def test_runtime_modules_exist():
    mods = runtime_modules()
    for required in (
        "linewatch.cli",
        "linewatch.images",
        "linewatch.bundle",
        "linewatch.line.daemon",
        "linewatch.protocol.client",
        "linewatch.calibrate.command",
        "linewatch.evaluation.evaluate",
        "linewatch.demo.run",
    ):
        assert required in mods
    assert not any(m.startswith(BUILD_PACKAGES) for m in mods)


@pytest.mark.e2e
def test_importing_runtime_never_loads_torch():
    mods = runtime_modules()
    code = (
        "import importlib, sys\n"
        f"for name in {mods!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))\n"
        "print(repr(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"runtime imported torch: {result.stdout} {result.stderr[-2000:]}"


@pytest.mark.e2e
def test_cli_help_runs_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any import of torch now raises ImportError
        "from linewatch.cli import main\n"
        "sys.argv = ['linewatch', '--help']\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "calibrate" in result.stdout and "exit codes" in result.stdout
