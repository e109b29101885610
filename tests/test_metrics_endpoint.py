"""The Prometheus endpoint, scraped over real HTTP: a real daemon subprocess, and a real DaemonMetrics server.

Every labelled series exists from the start, process_* series are there, calibration and thresholds follow a
reload, trigger requests are counted by outcome, and archive write errors reach the counter.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
import zmq
from prometheus_client.parser import text_string_to_metric_families

from linewatch.calibrate.store import write_calibration
from linewatch.line.archive import Archive
from linewatch.line.prometheus import DaemonMetrics
from linewatch.line.trigger import OUTCOMES
from tests.helpers import free_port, grey, with_white_square, write_video

ROOT = Path(__file__).resolve().parents[1]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample of the endpoint, parsed by prometheus_client's own parser: {(name, labels): value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no series {name}{labels} (have {sorted(k[0] for k in samples if k[0].startswith(name))})"
    return samples[key]


def wait_scrape(port: int, cond, timeout: float, what: str) -> Samples:
    end = time.monotonic() + timeout
    while True:
        try:
            samples = scrape(port)
            if cond(samples):
                return samples
        except (OSError, AssertionError):
            samples = {}
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


def block_folder(folder: Path) -> None:
    """Put a file where `folder` is, while a writer may be re-creating it: every later write into it fails."""
    for attempt in range(100):
        try:
            folder.rename(folder.with_name(f"{folder.name}.gone{attempt}"))
        except FileNotFoundError:
            pass
        try:
            os.close(os.open(folder, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return
        except FileExistsError:  # the writer made the folder again in between
            continue
    raise AssertionError(f"could not replace {folder} by a file")


@pytest.mark.integration
def test_archive_write_errors_reach_the_scraped_counter(tmp_path):
    """The archive counted its failed writes but the metric only ever counted a full queue: 111 logged write
    errors left linewatch_archive_errors_total at 0. Now the counter is the archive's own count."""
    folder = tmp_path / "archive"
    archive = Archive(folder, max_bytes=1_000_000)
    metrics = DaemonMetrics()
    metrics.watch_archive(archive)
    port = metrics.serve("127.0.0.1", 0)
    archive.start()
    try:
        assert value(scrape(port), "linewatch_archive_errors_total", kind="write") == 0
        assert value(scrape(port), "linewatch_archive_errors_total", kind="skipped") == 0
        image = grey(200, 32)
        assert archive.submit("cam1", 1, "NOK", image, None)
        samples = wait_scrape(port, lambda s: s.get(("linewatch_archive_saved_total", frozenset())) == 1, 10, "a save")
        assert value(samples, "linewatch_archive_bytes") > 0
        shutil.rmtree(folder)
        folder.write_text("a file where the archive folder was: every write now fails")  # the disk went away
        for seq in range(2, 7):
            assert archive.submit("cam1", seq, "NOK", image, b"\x89PNG mask")
        samples = wait_scrape(
            port, lambda s: s.get(("linewatch_archive_errors_total", frozenset({("kind", "write")}))) == 5, 10, "errors"
        )
        assert value(samples, "linewatch_archive_saved_total") == 1 and archive.errors == 5
    finally:
        archive.close()
        metrics.close()


# --- the daemon as a subprocess ---------------------------------------------------------------------------------


@pytest.fixture
def calibrated(deviation_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(deviation_bundle, dst)
    write_calibration(dst, 0.5, min_defect_area=4)
    return dst


@pytest.mark.e2e
def test_daemon_metrics_exist_from_the_start_and_follow_triggers_reloads_and_archive_failures(calibrated, tmp_path):
    video = write_video(tmp_path / "line.avi", [with_white_square() if i % 2 else grey() for i in range(6)])
    archive = tmp_path / "archive"
    metrics_port, trigger_endpoint = free_port(), f"tcp://127.0.0.1:{free_port()}"
    config = tmp_path / "linewatch.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"bundle": str(calibrated)},
                "cameras": [
                    {"name": "cam1", "kind": "video", "source": str(video), "loop": True, "fps": 30},
                    {"name": "cam2", "kind": "video", "source": str(video), "loop": True, "fps": 5},
                ],
                "engine": {"providers": ["cpu"], "threads": 1, "max_batch": 4, "max_wait_ms": 2, "warmup": False},
                "publish": {"endpoint": f"tcp://127.0.0.1:{free_port()}", "status_interval_s": 0.2},
                "trigger": {"enabled": True, "endpoint": trigger_endpoint, "timeout_s": 5.0},
                "archive": {"enabled": True, "dir": str(archive), "verdicts": ["NOK"]},
                "metrics": {"enabled": True, "port": metrics_port},
            }
        )
    )
    log = open(tmp_path / "daemon.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "linewatch.cli", "run", "--config", str(config)],
        cwd=ROOT,
        env=dict(os.environ),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    ctx = zmq.Context.instance()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.setsockopt(zmq.RCVTIMEO, 10_000)
    req.connect(trigger_endpoint)
    try:
        first = wait_scrape(metrics_port, lambda s: bool(s), 30, "the metrics endpoint")
        for camera in ("cam1", "cam2"):
            for verdict in ("OK", "NOK", "ERROR"):
                value(first, "linewatch_verdicts_total", camera=camera, verdict=verdict)
            assert value(first, "linewatch_verdicts_total", camera=camera, verdict="ERROR") == 0
            assert value(first, "linewatch_publish_dropped_total", camera=camera) == 0
            assert value(first, "linewatch_frame_errors_total", camera=camera) == 0
            value(first, "linewatch_latency_seconds_count", camera=camera)
        for outcome in ("ok", "refused"):
            assert value(first, "linewatch_reloads_total", outcome=outcome) == 0
        for outcome in OUTCOMES:
            assert value(first, "linewatch_trigger_requests_total", outcome=outcome) == 0
        assert value(first, "linewatch_archive_errors_total", kind="write") == 0
        assert value(first, "process_resident_memory_bytes") > 10e6
        assert value(first, "process_open_fds") > 3 and value(first, "process_cpu_seconds_total") > 0
        version = json.loads((calibrated / "calibration.json").read_text())["version"]
        assert value(first, "linewatch_calibration_version") == version
        assert value(first, "linewatch_pixel_threshold") == 0.5
        assert math.isnan(value(first, "linewatch_image_threshold"))
        assert value(first, "linewatch_min_defect_area") == 4

        # NOK frames are archived until the archive folder is replaced by a file: then every write fails
        wait_scrape(metrics_port, lambda s: s.get(("linewatch_archive_saved_total", frozenset()), 0) >= 2, 20, "saves")
        block_folder(archive)
        samples = wait_scrape(
            metrics_port,
            lambda s: s.get(("linewatch_archive_errors_total", frozenset({("kind", "write")})), 0) >= 3,
            20,
            "archive write errors counted",
        )

        req.send(b"not json")
        assert json.loads(req.recv_multipart()[0])["code"] == "bad_request"
        req.send_json({"camera": "cam1", "part_id": "p-1"})
        assert json.loads(req.recv_multipart()[0])["ok"] is True
        samples = wait_scrape(
            metrics_port,
            lambda s: s.get(("linewatch_trigger_requests_total", frozenset({("outcome", "ok")}))) == 1,
            10,
            "the trigger outcome",
        )
        assert value(samples, "linewatch_trigger_requests_total", outcome="bad_request") == 1
        assert value(samples, "linewatch_trigger_requests_total", outcome="timeout") == 0

        new = write_calibration(calibrated, 0.6, image_threshold=0.9, min_defect_area=2).version
        proc.send_signal(signal.SIGHUP)
        samples = wait_scrape(
            metrics_port,
            lambda s: s.get(("linewatch_reloads_total", frozenset({("outcome", "ok")}))) == 1,
            30,
            "the reload",
        )
        assert value(samples, "linewatch_calibration_version") == new != version
        assert value(samples, "linewatch_pixel_threshold") == pytest.approx(0.6)
        assert value(samples, "linewatch_image_threshold") == pytest.approx(0.9)
        assert value(samples, "linewatch_min_defect_area") == 2
        assert value(samples, "linewatch_reloads_total", outcome="refused") == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        req.close(0)
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        log.close()
    text = (tmp_path / "daemon.log").read_text(errors="replace")
    assert text.count("cannot write") == 1  # logged, and rate-limited: not once per failed write


@pytest.mark.unit
def test_every_series_of_a_watched_camera_exists_before_its_first_frame():
    metrics = DaemonMetrics()
    totals = {"cam-a": {"captured": 0, "dropped": 0, "reconnects": 0, "frame_errors": 0}}
    metrics.watch_cameras(lambda: totals)
    names = {
        (s.name, tuple(sorted(s.labels.items())))
        for family in metrics.registry.collect()
        for s in family.samples
        if s.labels.get("camera") == "cam-a"
    }
    for verdict in ("OK", "NOK", "ERROR"):
        assert ("linewatch_verdicts_total", (("camera", "cam-a"), ("verdict", verdict))) in names
    assert ("linewatch_publish_dropped_total", (("camera", "cam-a"),)) in names
    assert ("linewatch_camera_state", (("camera", "cam-a"), ("state", "offline"))) in names
    assert metrics.registry.get_sample_value("linewatch_frame_errors_total", {"camera": "cam-a"}) == 0
