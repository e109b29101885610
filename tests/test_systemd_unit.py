"""The shipped unit keeps its hardening: systemd's own analyser scores it, so a dropped directive shows."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "linewatch@.service"


def unit_directives() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.mark.unit
def test_devices_are_closed_except_cameras_and_gpus():
    d = unit_directives()
    assert d["DevicePolicy"] == ["closed"]
    allowed = {v.split()[0] for v in d["DeviceAllow"]}
    assert {"char-video4linux", "char-nvidia-frontend", "char-nvidia-uvm"} <= allowed
    assert d["SystemCallFilter"] == ["@system-service"]
    assert d["ProtectProc"] == ["invisible"] and d["RemoveIPC"] == ["yes"]
    assert re.fullmatch(r"\d+[KMG]", d["MemoryMax"][0])
    # the daemon cannot rewrite its own model or thresholds: bundles are read-only, only the state dir is writable
    read_only = d["ReadOnlyPaths"][0].split()
    assert "-/var/lib/linewatch/models" in read_only and "/etc/linewatch" in read_only
    assert d["ReadWritePaths"] == ["/var/lib/linewatch"] and d["StateDirectory"] == ["linewatch"]
    # directives that would break the GPU or the metrics stay out (documented in systemd/README.md)
    for breaking in ("ProcSubset", "PrivateDevices", "MemoryDenyWriteExecute", "PrivateUsers"):
        assert breaking not in d, breaking


@pytest.mark.integration
def test_systemd_analyze_scores_the_unit_at_most_2(tmp_path):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is part of the CI image (systemd package)"
    unit = tmp_path / "linewatch@line1.service"  # an instance name, as systemd would load it
    unit.write_text(UNIT.read_text())
    out = subprocess.run([analyze, "security", "--offline=true", str(unit)], capture_output=True, text=True)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
    assert match, out.stdout[-2000:] + out.stderr[-2000:]
    assert float(match.group(1)) <= 2.0, out.stdout[-3000:]


# --- a plain Debian/Ubuntu box: groups, documentation, reload -------------------------------------------------

DEBIAN_BASE_GROUPS = Path("/usr/share/base-passwd/group.master")  # the groups every Debian/Ubuntu system starts with
VENV = "/opt/linewatch/venv/"  # where systemd/README.md installs the runtime; ExecStart= runs from it
DROP_IN = ROOT / "systemd" / "notify-reload.conf"


@pytest.mark.unit
def test_every_supplementary_group_exists_on_a_stock_debian_base():
    """A group that does not exist fails the unit with 216/GROUP before the daemon runs: `render` is missing on
    Debian 12 without a GPU driver's udev rules, so the unit may only name groups of the base system."""
    assert DEBIAN_BASE_GROUPS.is_file(), "the CI image is Debian (base-passwd)"
    base = {line.split(":")[0] for line in DEBIAN_BASE_GROUPS.read_text().splitlines() if line}
    groups = [g for value in unit_directives()["SupplementaryGroups"] for g in value.split()]
    assert "video" in groups  # cameras
    assert set(groups) <= base, f"not on a stock Debian base: {sorted(set(groups) - base)}"


def documentation_files() -> list[str]:
    """The unit's Documentation= files, relative to the venv they are installed into."""
    uris = [u for value in unit_directives()["Documentation"] for u in value.split()]
    assert uris
    for uri in uris:
        assert uri.startswith("file://" + VENV), f"{uri}: not a file the linewatch venv installs"
    return [uri.removeprefix("file://" + VENV) for uri in uris]


@pytest.mark.e2e
def test_documentation_points_to_files_that_pip_install_puts_in_the_venv(tmp_path):
    """`systemctl help linewatch@line1` opens them: they must exist under the prefix of a `pip install`.
    From a checkout, the wheel is built and installed into a fresh prefix; in .ci/test_wheel (no sources, the wheel
    installed) the running interpreter's prefix is that install."""
    if (ROOT / "linewatch").is_dir():
        src = tmp_path / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md", "linewatch", "export", "docs", "systemd"):
            (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, src / name)
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
        built = subprocess.run(
            pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
            capture_output=True,
            text=True,
        )
        assert built.returncode == 0, built.stderr[-3000:]
        prefix = tmp_path / "venv"
        wheel = next((tmp_path / "dist").glob("linewatch-*.whl"))
        installed = subprocess.run(
            # --ignore-installed: without it pip "upgrades" by uninstalling the linewatch the tests run from
            pip + ["install", "--no-deps", "--no-index", "--ignore-installed", "--prefix", str(prefix), str(wheel)],
            capture_output=True,
            text=True,
        )
        assert installed.returncode == 0, installed.stderr[-3000:]
    else:
        prefix = Path(sys.prefix)
    for rel in documentation_files():
        assert (prefix / rel).is_file(), f"{rel} is not installed under {prefix}"
    # the unit and its drop-in come with the package too, so a wheel-only line PC can install them
    for name in ("linewatch@.service", "notify-reload.conf"):
        assert (prefix / "share/doc/linewatch/systemd" / name).read_text() == (ROOT / "systemd" / name).read_text()


@pytest.mark.unit
def test_reload_on_systemd_252_and_the_notify_reload_drop_in_for_253():
    """252 (Debian 12): Type=notify with ExecReload=kill -HUP; the daemon's RELOADING=1 ... READY=1 shows the reload
    as `reloading` in systemctl. >= 253: the drop-in makes systemd send SIGHUP itself and wait for READY=1; it
    must empty ExecReload=, or the daemon would get a second SIGHUP and reload twice."""
    d = unit_directives()
    assert d["Type"] == ["notify"]  # notify-reload fails to load on 252
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    lines = [line.strip() for line in DROP_IN.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0] == "[Service]"
    assert "Type=notify-reload" in lines and "ExecReload=" in lines
    assert not any(line.startswith("ReloadSignal=") and line != "ReloadSignal=SIGHUP" for line in lines)
