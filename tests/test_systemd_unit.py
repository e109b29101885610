"""The shipped unit keeps its hardening: systemd's own analyser scores it, so a dropped directive shows."""

from __future__ import annotations

import re
import shutil
import subprocess
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
