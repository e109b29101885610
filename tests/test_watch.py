"""`linewatch watch` as a real subprocess against a real publisher: lines, JSON lines, saved masks, CURVE."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq.auth

from linewatch.line.publisher import ResultPublisher
from linewatch.protocol.curve import CurveConfig
from linewatch.protocol.watch import format_result
from linewatch.protocol.wire import decode_mask_png, encode_mask_png
from tests.helpers import result_header

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
MASK = np.zeros((24, 32), bool)
MASK[4:10, 6:18] = True


def run_watch(pub: ResultPublisher, args: list[str], timeout_s: float = 20.0) -> subprocess.CompletedProcess:
    """Start `linewatch watch`, publish cam1 and cam10 results until it exits."""
    env = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, "-m", "linewatch.cli", "watch", "--connect", pub.endpoint, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out: dict[str, str] = {}
    reader = threading.Thread(target=lambda: out.update(zip(("stdout", "stderr"), proc.communicate())), daemon=True)
    reader.start()
    png = encode_mask_png(MASK)
    seq, deadline = 0, time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        seq += 1
        pub.publish_result(result_header("cam10", seq, "OK", 0.01, model_id="m"), None)
        pub.publish_result(
            result_header(
                "cam1",
                seq,
                "NOK",
                0.875,
                calibration_version=3,
                model_id="abcdefabcdef",
                regions=[{"bbox": [6, 4, 12, 6], "area": 72, "peak": 0.875}],
                part_id=f"P/{seq}",
                mask={"width": 32, "height": 24},
            ),
            png,
        )
        pub.publish_status("cam1", {"state": "online"})
        time.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
    reader.join(10)
    return subprocess.CompletedProcess(proc.args, proc.wait(5), out.get("stdout", ""), out.get("stderr", ""))


def test_watch_prints_one_line_per_result_and_saves_masks(tmp_path):
    with ResultPublisher("tcp://127.0.0.1:*") as pub:
        done = run_watch(pub, ["--camera", "cam1", "--count", "3", "--save", str(tmp_path / "masks")])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3, done.stdout
    seqs = []
    for line in lines:
        fields = line.split()
        assert fields[1] == "cam1" and fields[3] == f"part=P/{fields[2][4:]}" and fields[4] == "NOK", line
        assert fields[5] == "score=0.875" and fields[6] == "regions=1" and "[6,4 12x6 area=72]" in line
        seqs.append(int(fields[2][4:]))
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    assert "camera cam1: online" in done.stderr
    saved = sorted((tmp_path / "masks").iterdir())
    assert [p.name for p in saved] == [f"cam1_{s:08d}_P_{s}_NOK.png" for s in seqs]
    np.testing.assert_array_equal(decode_mask_png(saved[0].read_bytes()) > 0, MASK)


def test_watch_json_lines_with_curve(tmp_path):
    zmq.auth.create_certificates(tmp_path, "server")
    (tmp_path / "allowed").mkdir()
    zmq.auth.create_certificates(tmp_path / "allowed", "watcher")
    for secret in (tmp_path / "server.key_secret", tmp_path / "allowed" / "watcher.key_secret"):
        secret.chmod(0o600)  # secret key files others can read are refused
    curve = CurveConfig.from_files(tmp_path / "server.key_secret", tmp_path / "allowed")
    with ResultPublisher("tcp://127.0.0.1:*", curve=curve) as pub:
        done = run_watch(
            pub,
            [
                "--count",
                "4",
                "--json",
                "--server-key",
                str(tmp_path / "server.key"),
                "--client-key-file",
                str(tmp_path / "allowed" / "watcher.key_secret"),
            ],
        )
    assert done.returncode == 0, done.stderr
    headers = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(headers) == 4
    assert {h["camera"] for h in headers} <= {"cam1", "cam10"} and all(h["kind"] == "result" for h in headers)
    for h in headers:
        assert h["verdict"] == ("NOK" if h["camera"] == "cam1" else "OK") and h["run_id"] == pub.run_id
    assert all(h["part_id"] == f"P/{h['seq']}" for h in headers if h["camera"] == "cam1")


def test_watch_on_a_port_nobody_publishes_on_says_what_to_check_and_keeps_waiting():
    from linewatch.demo.run import free_port

    endpoint = f"tcp://127.0.0.1:{free_port()}"  # nothing listens here
    proc = subprocess.Popen(
        [sys.executable, "-m", "linewatch.cli", "watch", "--connect", endpoint, "--camera", "cam7"]
        + ["--quiet-after", "1.5"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(4.5)  # start-up (~1 s) + quiet-after + margin; it must still be waiting after the hint
        assert proc.poll() is None, proc.communicate()
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    assert out == ""  # stdout stays one record per result
    assert err.count("nothing received") == 1, err  # said once, not every second
    hint = err[err.index("nothing received") :]
    assert f"nothing received from {endpoint} for camera cam7 in 1.5 s" in hint and "still waiting" in hint
    for check in ("daemon running", "publish.endpoint", "'cam7'", "--server-key"):
        assert check in hint, (check, hint)


def test_watch_gives_no_hint_while_messages_arrive_and_shows_defect_counts(tmp_path):
    with ResultPublisher("tcp://127.0.0.1:*") as pub:  # ~50 results at 20 ms: well past --quiet-after
        done = run_watch(pub, ["--camera", "cam1", "--count", "50", "--quiet-after", "0.5"])
    assert done.returncode == 0, done.stderr
    assert "nothing received" not in done.stderr and len(done.stdout.splitlines()) == 50
    header = result_header("cam1", 3, regions=[{"bbox": [1, 2, 3, 4], "area": 12, "peak": 0.9, "defect": True}])
    line = format_result(header.model_copy(update={"defect_regions": 1}).model_dump(mode="json"))
    assert " regions=1 defects=1 [1,2 3x4 area=12]" in line
