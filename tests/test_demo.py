"""`linewatch demo` end to end: the real commands (train, export, calibrate, the daemon on a video, a ZeroMQ
subscriber) as subprocesses, checked against the truth the demo wrote and against its own report."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
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


@dataclass
class QuickDemo:
    out: Path
    proc: subprocess.CompletedProcess
    url: str | None  # from the `dashboard: URL` line
    page: tuple[int, str] | None  # (status, content type) of GET URL while the demo ran
    state: dict | None  # the last /api/state read while the demo ran
    refused_after: bool  # the URL refused connections once the demo had exited


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> QuickDemo:
    """One quick demo for the module: its stdout read as it comes, and its dashboard asked while the line runs
    (`--dashboard-wait` keeps it up a few seconds after the last part, so the whole line is seen)."""
    out = tmp_path_factory.mktemp("quick_demo") / "demo"
    args = ["--out", str(out), "--parts", str(PARTS), "--quick", "--seed", "1", "--dashboard-wait", "4"]
    stderr = open(out.parent / "stderr.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "linewatch.cli", "demo", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, proc.stdout), lines.put(None)], daemon=True).start()
    stdout, url, page, state = [], None, None, None
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                line = ""
            if line is None:
                break
            stdout.append(line)
            if url is None and (found := re.match(r"^dashboard: (http://\S+) ", line)):
                url = found[1]
            if url is not None and proc.poll() is None:
                page, state = ask_dashboard(url, page, state)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr.seek(0)
    refused_after = url is not None and not answers(url)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, "".join(stdout), stderr.read())
    return QuickDemo(out, done, url, page, state, refused_after)


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
        return True
    except OSError:
        return False


def ask_dashboard(url: str, page: tuple | None, state: dict | None) -> tuple[tuple | None, dict | None]:
    """GET the page once, then /api/state on every call; a refused or failed request keeps what was read."""
    try:
        if page is None:
            with urllib.request.urlopen(url, timeout=2) as r:
                page = (r.status, r.headers.get("Content-Type", ""))
        with urllib.request.urlopen(url + "api/state", timeout=2) as r:
            state = json.loads(r.read())
    except OSError:
        pass
    return page, state


def test_quick_demo_prints_every_part_and_reports_counts_matching_the_truth(quick_demo):
    out, proc = quick_demo.out, quick_demo.proc
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


def test_quick_demo_serves_the_dashboard_while_the_line_runs_and_stops_it_after(quick_demo):
    proc = quick_demo.proc
    assert proc.returncode == 0, proc.stderr[-4000:]
    printed = proc.stdout.splitlines()
    first_part = next(i for i, line in enumerate(printed) if line.startswith("part "))
    board = [i for i, line in enumerate(printed) if line.startswith("dashboard: http://127.0.0.1:")]
    assert board and board[0] < first_part, proc.stdout  # up before the line starts
    assert "open it in a browser while the demo line runs" in printed[board[0]]
    assert quick_demo.page is not None and quick_demo.page[0] == 200 and "text/html" in quick_demo.page[1]
    state = quick_demo.state
    assert state is not None, "/api/state never answered while the demo ran"
    camera = state["cameras"]["line1"]
    counts = camera["counts"]
    warmup = json.loads((quick_demo.out / "line" / "truth.json").read_text())["warmup_frames"]
    assert sum(counts.values()) == warmup + PARTS, counts  # it saw every frame of the line, live
    assert counts == camera["daemon_verdicts"], camera  # the daemon's own counts, from its status
    assert counts["NOK"] >= len(re.findall(r"^part .* NOK ", proc.stdout, re.M)), (counts, proc.stdout)
    assert camera["latest_preview"] is not None, "the demo daemon sends previews for the dashboard"
    assert quick_demo.refused_after, "the dashboard still answers after the demo exited"
    assert "dashboard wait" in proc.stdout and (quick_demo.out / "dashboard.log").is_file()


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    proc = run_demo("--out", str(tmp_path), "--parts", "4", "--quick", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "not a previous demo folder" in proc.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
