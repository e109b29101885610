"""OpenCV's and FFmpeg's own messages stay off stderr (they repeated on every reconnect attempt and flooded the
journal); the camera thread logs the failure itself, with its reason, once per change."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
import zmq

from linewatch.line.cameras import ONLINE
from tests.helpers import MjpegServer, free_port, grey

ROOT = Path(__file__).resolve().parents[1]

RAW_OPENCV_LINE = re.compile(r"\[\s*(WARN|ERROR|INFO)\s*:\d+@|\[\w+ @ 0x[0-9a-f]+\]|OPENCV:FFMPEG|cap_ffmpeg|cap\.cpp")


@pytest.mark.e2e
def test_a_url_camera_reconnecting_logs_the_failure_once_and_no_raw_opencv_lines(deviation_bundle, tmp_path):
    """The daemon as a subprocess with a stream camera: nothing listens at first, then the server comes and goes.
    Reconnect attempts by the dozen, yet stderr holds no line of OpenCV's or FFmpeg's own (they repeated on every
    attempt and flooded the journal), and our own log says what failed, why, and when it recovered."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/stream.mjpg"
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = tmp_path / "linewatch.yaml"
    camera = {
        "name": "cam1",
        "kind": "url",
        "source": url,
        "open_timeout_ms": 500,
        "read_timeout_ms": 500,
        "reconnect": {"initial_s": 0.05, "max_s": 0.1},
    }
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"bundle": str(deviation_bundle)},
                "cameras": [camera],
                "engine": {"providers": ["cpu"], "threads": 1, "warmup": False},
                "publish": {"endpoint": endpoint, "status_interval_s": 0.1},
            }
        )
    )
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt_string(zmq.SUBSCRIBE, "linewatch/cam1/status")
    sub.connect(endpoint)
    status: dict = {}

    def until(cond, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not (status and cond(status)):
            assert time.monotonic() < end and proc.poll() is None, f"timed out waiting for {what}: {status}"
            if sub.poll(100):
                header = json.loads(sub.recv_multipart()[1])
                status.clear()
                status.update(header.get("status", header))

    server = MjpegServer(port, lambda i: grey(128), fps=25)
    with (tmp_path / "daemon.log").open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "linewatch.cli", "run", "--config", str(config)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        until(lambda s: s["reconnects"] >= 8, 30, "reconnect attempts against a dead port")
        assert status["state"] != ONLINE and f"connection refused by 127.0.0.1:{port}" in status["last_error"]
        server.start()
        until(lambda s: s["state"] == ONLINE and s["captured"] >= 5, 20, "the stream")
        assert status["last_error"] is None
        server.stop()
        before = status["reconnects"]
        until(lambda s: s["state"] != ONLINE and s["reconnects"] >= before + 8, 20, "reconnects after the outage")
    finally:
        server.stop()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        sub.close()
    lines = (tmp_path / "daemon.log").read_text(errors="replace").splitlines()
    raw = [line for line in lines if RAW_OPENCV_LINE.search(line)]
    assert not raw, f"{len(raw)} raw OpenCV/FFmpeg lines on stderr, e.g. {raw[:3]}"
    ours = [line for line in lines if "linewatch.line.cameras" in line and "WARNING" in line]
    assert status["reconnects"] >= 16 and 2 <= len(ours) <= 6, ours  # per change of failure, not per attempt
    assert f"camera cam1: offline: cannot open url {url}: connection refused by 127.0.0.1:{port}" in ours[0]
    assert any("camera cam1: online again after" in line for line in lines)
