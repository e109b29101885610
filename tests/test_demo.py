"""`linewatch demo` end to end: the real commands (train, export, calibrate, the daemon on a video, a ZeroMQ
subscriber) as subprocesses, checked against the truth the demo wrote and against its own report."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
PARTS = 12
LINE = re.compile(r"^part +(\d+) +truth (\S+) +(OK|NOK|ERROR) +score +(\S+) +defect area +(\d+) px +(.+)$")


def run_demo(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", "linewatch.cli", "demo", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_quick_demo_prints_every_part_and_reports_counts_matching_the_truth(tmp_path):
    out = tmp_path / "demo"
    proc = run_demo("--out", str(out), "--parts", str(PARTS), "--quick", "--seed", "1")
    assert proc.returncode == 0, proc.stderr[-4000:]

    lines = [LINE.match(line) for line in proc.stdout.splitlines() if line.startswith("part ")]
    assert all(lines), proc.stdout
    assert sorted(int(m[1]) for m in lines) == list(range(1, PARTS + 1)), proc.stdout

    truth = json.loads((out / "line" / "truth.json").read_text())
    kinds = {p["part"]: p["kind"] for p in truth["parts"]}
    assert truth["max_decode_difference"] == 0, "the camera video must hold the parts' exact pixels"
    for p in truth["parts"]:
        mask = cv2.imread(str(out / "line" / p["mask"]), cv2.IMREAD_GRAYSCALE)
        assert (mask > 0).sum() == p["defect_area"]
        assert (p["defect_area"] > 0) == (p["kind"] != "good")
    printed = {int(m[1]): (m[2], m[3], int(m[5])) for m in lines}
    for number, (kind, _, _) in printed.items():
        assert kind == kinds[number]
    defective = [n for n, k in kinds.items() if k != "good"]
    assert 0 < len(defective) < PARTS
    assert any(printed[n][1] == "NOK" for n in defective), proc.stdout
    for number, (_, verdict, area) in printed.items():  # no image threshold: NOK exactly when a region is big enough
        assert (verdict == "NOK") == (area > 0), (number, verdict, area)

    report = out / "report"
    assert (report / "report.html").is_file() and (report / "report.json").is_file()
    grid = cv2.imread(str(report / "overlays.png"))
    assert grid is not None and grid.shape[0] > 0
    summary = json.loads((report / "report.json").read_text())
    counts = summary["counts"]
    expect = {
        "detected": sum(kinds[n] != "good" and v == "NOK" for n, (_, v, _) in printed.items()),
        "missed": sum(kinds[n] != "good" and v == "OK" for n, (_, v, _) in printed.items()),
        "false_alarms": sum(kinds[n] == "good" and v == "NOK" for n, (_, v, _) in printed.items()),
        "correct_passes": sum(kinds[n] == "good" and v == "OK" for n, (_, v, _) in printed.items()),
        "errors": sum(v == "ERROR" for _, v, _ in printed.values()),
    }
    assert {k: counts[k] for k in expect} == expect
    assert counts["detection_rate"] == pytest.approx(expect["detected"] / len(defective))
    assert counts["false_alarm_rate"] == pytest.approx(expect["false_alarms"] / (PARTS - len(defective)))
    rows = {r["part"]: r for r in summary["parts"]}
    for number, (_, verdict, area) in printed.items():
        assert rows[number]["verdict"] == verdict and rows[number]["defect_area"] == area
    # The published scores are the graph's scores of the very part images: results were matched to the right parts.
    assert summary["score_max_relative_difference"] < 1e-3
    html = (report / "report.html").read_text()
    assert f"{counts['detected']} detected" in html and "data:image/jpeg;base64," in html
    assert f"{expect['detected']} detected, {expect['missed']} missed" in proc.stdout
    assert str((report / "report.html").resolve()) in proc.stdout


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    proc = run_demo("--out", str(tmp_path), "--parts", "4", "--quick", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "not a previous demo folder" in proc.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
