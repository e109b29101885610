"""The accounting soak (benchmarks/soak.py), short: the daemon as a subprocess with five real cameras (video,
folder with bad images, MJPEG over HTTP, one that drops out and returns, one triggered), a subscriber that keeps
up and a slow one, a polite trigger client and a flooding one, SIGHUP with good and corrupt calibrations. Every
captured frame must be accounted for in the daemon's final status and every check of the benchmark must pass;
the 30-minute run of the same script is in docs/RELIABILITY.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e

SHORT = [
    "--minutes", "0.7",
    "--hup-every", "4",
    "--outage-every", "10",
    "--outage-s", "3",
    "--flood-every", "5",
    "--flood-burst", "1500",
    "--slow-ms", "100",
    "--ipc",  # results over ipc://: small kernel buffers, so the slow subscriber loses within seconds
    "--rss-every", "1",
]  # fmt: skip


def test_short_soak_accounts_for_every_frame_under_load_and_faults(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "soak.py"), *SHORT, "--json", str(out), "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.is_file(), proc.stderr[-4000:]
    summary = json.loads(out.read_text())
    failed = {c["name"]: c["detail"] for c in summary["checks"] if not c["ok"]}
    assert not failed, (failed, proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the load and the faults really happened, so the checks above were not passed by doing nothing
    cams = summary["cameras"]
    assert all(c["results"] >= 100 for c in cams.values()), cams
    assert cams["trig"]["skipped"] > 0 and cams["dir"]["verdicts"]["ERROR"] > 0 and cams["flaky"]["reconnects"] >= 2
    assert summary["reloads"]["good"] >= 3 and summary["reloads"]["corrupt"] >= 3
    assert summary["outages"]["count"] >= 2
    flood = summary["triggers"]["flood"]
    assert flood["codes"].get("busy", 0) > 0 and flood["codes"].get("bad_request", 0) > 0
    assert sum(c["slow_subscriber"]["lost"] for c in cams.values()) > 0
