"""The daemon as a subprocess (`python -m linewatch.cli run`) with real sources, real ZeroMQ sockets, a real
systemd notify socket and a real (tiny) ONNX bundle whose map is |grey-128|/127: grey frames are OK and frames
with a white square are NOK once calibrated."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
import zmq
from onnx import TensorProto, helper

from linewatch import bundle
from tests.bundles import make_deviation_bundle
from tests.helpers import MjpegServer, NotifySocket, fill_queue, free_port, grey, with_white_square, write_video

ROOT = Path(__file__).resolve().parents[1]
PERIOD = 4  # video frame i is NOK when i % PERIOD == 1


# --- helpers ----------------------------------------------------------------------------------------------


def write_calibration(bundle_dir: Path, pixel_threshold: float, min_defect_area: int = 4) -> int:
    """Calibrate with linewatch.calibrate.store's own writer; returns the new calibration version."""
    from linewatch.calibrate.store import write_calibration as write

    return write(bundle_dir, pixel_threshold, min_defect_area=min_defect_area).version


def video_frames(n: int = 8) -> list[np.ndarray]:
    return [with_white_square() if i % PERIOD == 1 else grey() for i in range(n)]


def expected_verdict(frame_index: int, n: int = 8) -> str:
    return "NOK" if ((frame_index - 1) % n) % PERIOD == 1 else "OK"


def write_config(tmp_path: Path, bundle_dir: Path, cameras: list[dict], **sections) -> tuple[Path, str]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    data = {
        "model": {"bundle": str(bundle_dir)},
        "cameras": cameras,
        "engine": {"providers": ["cpu"], "threads": 1, "max_batch": 4, "max_wait_ms": 2},
        "publish": {"endpoint": endpoint, "status_interval_s": 0.2},
        "health": {"drain_timeout_s": 5.0},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    path = tmp_path / "linewatch.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, endpoint


def start_daemon(config: Path, tmp_path: Path, notify: NotifySocket | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    if notify is not None:
        env.update(NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="400000")
    log = open(tmp_path / "daemon.log", "wb")
    return subprocess.Popen(
        [sys.executable, "-m", "linewatch.cli", "run", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def daemon_log(tmp_path: Path) -> str:
    return (tmp_path / "daemon.log").read_text(errors="replace")


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


class Subscriber:
    """Plain pyzmq SUB: results and status of every camera."""

    def __init__(self, endpoint: str, prefix: str = "linewatch/", rcvhwm: int = 100_000):
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 10)  # connected within ms of the daemon binding
        self.sock.setsockopt_string(zmq.SUBSCRIBE, prefix)
        self.sock.connect(endpoint)
        self.results: list[dict] = []
        self.masks: list[bytes] = []
        self.statuses: list[dict] = []

    def poll(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000) + 1):
                return
            parts = self.sock.recv_multipart()
            topic, header = parts[0].decode(), json.loads(parts[1])
            if topic.endswith("/result"):
                assert topic == f"linewatch/{header['camera']}/result"
                self.results.append(header)
                self.masks.append(parts[2] if len(parts) > 2 else b"")
            elif topic.endswith("/status"):
                header.setdefault("camera", topic.split("/")[1])
                self.statuses.append(header)

    def until(self, cond, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < end, f"timed out waiting for {what}"
            self.poll(0.1)

    def _latest(self, camera: str) -> dict | None:
        return next((s for s in reversed(self.statuses) if s["camera"] == camera), None)

    def status(self, camera: str) -> dict:
        latest = self._latest(camera)
        assert latest is not None, f"no status message for camera {camera!r} received"
        return latest

    def field(self, camera: str, key: str):
        """The latest status value for a wait condition; None before the first status arrives."""
        latest = self._latest(camera)
        return None if latest is None else status_fields(latest).get(key)

    def close(self) -> None:
        self.sock.close(0)


def status_fields(status: dict) -> dict:
    """The per-camera counters, wherever the protocol nests them."""
    return status.get("status", status)


def slow_bundle(path: Path, iterations: int = 10**9, per_extra_frame: bool = False) -> Path:
    """A real bundle whose graph loops for minutes per batch: an inference that is stuck, not failed. With
    `per_extra_frame` the loop runs `iterations` times per frame beyond the first: single frames are quick, a big
    batch (warm-up at max_batch) is slow."""
    make_deviation_bundle(path, 64, 64)
    model = onnx.load(str(path / bundle.GRAPH))
    g = model.graph
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["x_in", "one"], ["x_out"])],
        "spin",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )
    g.initializer.extend(
        [
            helper.make_tensor("per_frame" if per_extra_frame else "trips", TensorProto.INT64, [], [iterations]),
            helper.make_tensor("yes", TensorProto.BOOL, [], [True]),
            helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        ]
    )
    if per_extra_frame:  # trips = (N - 1) * iterations
        g.initializer.extend(
            [
                helper.make_tensor("first", TensorProto.INT64, [], [0]),
                helper.make_tensor("one_frame", TensorProto.INT64, [], [1]),
            ]
        )
        g.node.extend(
            [
                helper.make_node("Shape", [bundle.INPUT_NAME], ["in_shape"]),
                helper.make_node("Gather", ["in_shape", "first"], ["n_frames"], axis=0),
                helper.make_node("Sub", ["n_frames", "one_frame"], ["extra_frames"]),
                helper.make_node("Mul", ["extra_frames", "per_frame"], ["trips"]),
            ]
        )
    for node in g.node:  # the deviation map is now an intermediate; the output waits for the loop
        node.input[:] = ["map_fast" if x == bundle.OUTPUT_MAP else x for x in node.input]
        node.output[:] = ["map_fast" if x == bundle.OUTPUT_MAP else x for x in node.output]
    g.node.extend(
        [
            helper.make_node("Loop", ["trips", "yes", "zero"], ["spun"], body=body),
            helper.make_node("Mul", ["spun", "zero"], ["nothing"]),
            helper.make_node("Add", ["map_fast", "nothing"], [bundle.OUTPUT_MAP]),
        ]
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(path / bundle.GRAPH))
    meta = bundle.read_metadata(path)
    meta["graph"]["sha256"] = bundle.sha256_file(path / bundle.GRAPH)
    bundle.write_metadata(path, meta)
    return path


# --- tests ------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_video_file_verdicts_metrics_archive_and_sigterm_accounting(calibrated, tmp_path):
    video = write_video(tmp_path / "line.avi", video_frames(8))
    archive = tmp_path / "archive"
    metrics_port = free_port()
    config, endpoint = write_config(
        tmp_path,
        calibrated,
        [{"name": "cam1", "kind": "video", "source": str(video), "loop": True, "fps": 300, "queue_size": 16}],
        archive={"enabled": True, "dir": str(archive), "max_mb": 0.05},
        metrics={"enabled": True, "port": metrics_port},
    )
    notify = NotifySocket(tmp_path / "notify.sock")
    sub = Subscriber(endpoint)  # before the daemon binds: it sees every message
    proc = start_daemon(config, tmp_path, notify)
    try:
        sub.until(lambda: len(sub.results) >= 150, 30, "150 results")
        for header in sub.results:
            assert header["verdict"] == expected_verdict(header["frame_index"]), header
        nok = [h for h in sub.results if h["verdict"] == "NOK"]
        assert nok and all(h["regions"] and h["regions"][0]["area"] >= 4 for h in nok)
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert 'linewatch_verdicts_total{camera="cam1",verdict="NOK"}' in text
        assert 'linewatch_camera_state{camera="cam1",state="online"} 1.0' in text
        captured = [ln for ln in text.splitlines() if ln.startswith('linewatch_frames_captured_total{camera="cam1"}')]
        assert captured and float(captured[0].split()[-1]) >= 150
        sent_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        sub.until(lambda: proc.poll() is not None, 15, "daemon exit")
        assert time.monotonic() - sent_term < 10
        sub.poll(0.5)
        assert proc.returncode == 0, daemon_log(tmp_path)[-3000:]
    finally:
        stop(proc)
        sub.close()
    final = status_fields(sub.status("cam1"))
    assert final["captured"] > 0
    assert final["captured"] == final["results"] + final["dropped"] + final["skipped"], final
    seqs = [h["seq"] for h in sub.results]
    assert seqs == sorted(seqs) and seqs[-1] == final["results"]
    missing = (seqs[-1] - seqs[0] + 1) - len(seqs)
    assert missing <= final["publish_dropped"]
    messages = "\n".join(notify.drain())
    assert "READY=1" in messages and "WATCHDOG=1" in messages and "STOPPING=1" in messages
    assert "STATUS=" in messages
    files = list(archive.glob("*_NOK.png"))
    assert files and sum(f.stat().st_size for f in archive.iterdir()) <= 0.05 * 1024 * 1024


@pytest.mark.e2e
def test_http_stream_outage_reports_offline_never_ok_and_reconnects(calibrated, tmp_path):
    port = free_port()
    server = MjpegServer(port, lambda i: with_white_square(), fps=40)
    config, endpoint = write_config(
        tmp_path,
        calibrated,
        [
            {
                "name": "cam1",
                "kind": "url",
                "source": server.url,
                "open_timeout_ms": 1000,
                "read_timeout_ms": 1000,
                "stall_s": 1.0,
                "reconnect": {"initial_s": 0.1, "max_s": 0.5},
            }
        ],
    )
    notify = NotifySocket(tmp_path / "notify.sock")
    sub = Subscriber(endpoint)  # before the daemon binds: it sees every message
    proc = start_daemon(config, tmp_path, notify)
    try:
        sub.until(lambda: sub.field("cam1", "state") not in (None, "online"), 20, "status before the stream exists")
        server.start()
        sub.until(lambda: len(sub.results) >= 10, 20, "results from the stream")
        server.stop()
        sub.until(lambda: sub.field("cam1", "state") in ("offline", "reconnecting"), 10, "offline status")
        sub.poll(0.3)
        during = len(sub.results)
        notify.drain()
        notify.messages.clear()
        sub.poll(1.5)
        assert len(sub.results) == during, "results published while the camera was down"
        assert status_fields(sub.status("cam1"))["state"] != "online"
        # a camera that is down is reported, not a reason for systemd to restart us: pings go on
        assert "WATCHDOG=1" in notify.drain() and "offline" in " ".join(notify.messages)
        server.start()
        sub.until(lambda: len(sub.results) >= during + 10, 20, "results after reconnect")
        assert status_fields(sub.status("cam1"))["reconnects"] >= 1
        assert {h["verdict"] for h in sub.results} == {"NOK"}  # every frame had a defect: never an OK
        assert stop(proc) == 0
    finally:
        server.stop()
        stop(proc)
        sub.close()


@pytest.mark.e2e
def test_a_notify_socket_nobody_reads_never_freezes_the_daemon(calibrated, tmp_path):
    """A full sd_notify queue (systemd busy, queue length 10) must not block status publishing or SIGTERM."""
    video = write_video(tmp_path / "line.avi", video_frames(8))
    config, endpoint = write_config(
        tmp_path, calibrated, [{"name": "cam1", "kind": "video", "source": str(video), "loop": True, "fps": 50}]
    )
    notify = NotifySocket(tmp_path / "notify.sock", reading=False)
    fill_queue(notify.path)  # full from the start, whatever the machine's max_dgram_qlen
    sub = Subscriber(endpoint)  # before the daemon binds: it sees every message
    proc = start_daemon(config, tmp_path, notify)
    try:
        sub.until(lambda: len(sub.statuses) >= 3, 30, "first status messages")
        time.sleep(1.0)
        before = len(sub.statuses), len(sub.results)
        sub.poll(2.0)
        assert len(sub.statuses) - before[0] >= 5, "status publishing stalled behind sd_notify"
        assert len(sub.results) - before[1] >= 20, "inspection stalled behind sd_notify"
        t0 = time.monotonic()
        assert stop(proc, 10) == 0
        assert time.monotonic() - t0 < 6
        assert "systemd notification dropped" in daemon_log(tmp_path)
    finally:
        stop(proc)
        sub.close()


@pytest.mark.e2e
def test_sighup_reloads_calibration_and_keeps_the_old_one_when_the_new_is_broken(deviation_bundle, tmp_path):
    model = tmp_path / "bundle"
    shutil.copytree(deviation_bundle, model)  # not calibrated yet
    video = write_video(tmp_path / "line.avi", [grey()] * 4)
    config, endpoint = write_config(
        tmp_path, model, [{"name": "cam1", "kind": "video", "source": str(video), "loop": True, "fps": 50}]
    )
    sub = Subscriber(endpoint)  # before the daemon binds: it sees every message
    proc = start_daemon(config, tmp_path)
    try:
        sub.until(lambda: len(sub.results) >= 5, 30, "uncalibrated results")
        assert {h["verdict"] for h in sub.results} == {"ERROR"}
        assert all("uncalibrated" in h["error"] for h in sub.results)
        version = write_calibration(model, 0.5)
        proc.send_signal(signal.SIGHUP)
        sub.until(lambda: sub.results[-1].get("calibration_version") == version, 10, "calibrated results")
        (model / bundle.CALIBRATION).write_text('{"broken": ')
        proc.send_signal(signal.SIGHUP)
        n = len(sub.results)
        sub.until(lambda: len(sub.results) >= n + 50, 10, "results after a refused reload")
        after = sub.results[n:]
        assert {h["calibration_version"] for h in after} == {version} and {h["verdict"] for h in after} == {"OK"}
        assert proc.poll() is None
        assert stop(proc) == 0
        assert "reload refused" in daemon_log(tmp_path)
    finally:
        stop(proc)
        sub.close()


@pytest.mark.e2e
def test_a_slow_reload_keeps_status_and_pings_going_then_switches_the_calibration(calibrated, tmp_path):
    """SIGHUP to a bundle whose warm-up takes seconds (its graph is slow at max_batch): the new model loads off the
    main loop, so status messages and watchdog pings keep their interval and results keep coming from the old model;
    then results carry the new calibration. Start-up asked systemd for time (EXTEND_TIMEOUT_USEC) before READY=1."""
    new_bundle = slow_bundle(tmp_path / "slow_at_max_batch", iterations=60_000, per_extra_frame=True)
    write_calibration(new_bundle, 0.5)
    new_version = write_calibration(new_bundle, 0.5)  # version 2: told apart from the running bundle's version 1
    video = write_video(tmp_path / "line.avi", [grey()] * 4)
    camera = {"name": "cam1", "kind": "video", "source": str(video), "loop": True, "fps": 50}
    config, endpoint = write_config(
        tmp_path, calibrated, [camera], engine={"max_batch": 64}, health={"inference_stall_s": 0.5}
    )
    notify = NotifySocket(tmp_path / "notify.sock")
    sub = Subscriber(endpoint)  # before the daemon binds: it sees every message
    proc = start_daemon(config, tmp_path, notify)
    try:
        sub.until(lambda: len(sub.results) >= 5, 30, "results from the first bundle")
        assert {h["calibration_version"] for h in sub.results} == {1}
        data = yaml.safe_load(config.read_text())
        data["model"]["bundle"] = str(new_bundle)
        config.write_text(yaml.safe_dump(data))
        before = len(sub.statuses)
        n = len(sub.results)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGHUP)
        sub.until(lambda: sub.results[-1]["calibration_version"] == new_version, 60, "results of the new calibration")
        took = time.monotonic() - t0
        sub.poll(0.5)
    finally:
        stop(proc)
        sub.close()
    assert took > 1.5, f"the reload took {took:.2f} s: too quick to show anything"
    stamps = [s["publish_time"] for s in sub.statuses[before:] if s["calibration_version"] == 1]
    assert len(stamps) >= 5, "status stopped while the model was loading"
    assert max(np.diff(stamps)) < 1.0, "status stopped while the model was loading"
    old_results = [h for h in sub.results[n:] if h["calibration_version"] == 1]
    assert len(old_results) >= 25, "inspection stopped while the model was loading"
    assert {h["calibration_version"] for h in sub.results[n + len(old_results) :]} == {new_version}  # and no return
    messages = notify.drain()
    ready = messages.index("READY=1")
    assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in messages[:ready]), messages[: ready + 1]
    pings = pings_while_reloading(messages)
    assert pings >= took / 0.2 / 3, f"{pings} watchdog pings in a {took:.1f} s reload"
    assert "longer than health.inference_stall_s" in daemon_log(tmp_path)  # the new model's warm batch: ~2 s


def pings_while_reloading(messages: list[str]) -> int:
    """WATCHDOG=1 messages between the first RELOADING=1 and the READY=1 that ends it."""
    start = next(i for i, m in enumerate(messages) if m.startswith("RELOADING=1"))
    return messages[start : messages.index("READY=1", start)].count("WATCHDOG=1")


@pytest.mark.e2e
def test_slow_subscriber_does_not_slow_inference(calibrated, tmp_path):
    rng = np.random.default_rng(0)
    noisy = [np.clip(rng.normal(128, 90, (64, 64, 3)), 0, 255).astype(np.uint8) for _ in range(4)]
    video = write_video(tmp_path / "noise.avi", noisy)
    config, endpoint = write_config(
        tmp_path,
        calibrated,
        [{"name": "cam1", "kind": "video", "source": str(video), "loop": True, "fps": 100, "queue_size": 4}],
        publish={
            "hwm": 5,
            "mask": {"enabled": True, "width": 256, "height": 256},
            "endpoint": f"ipc://{tmp_path}/results.ipc",
        },
    )  # small kernel buffers: congestion comes fast
    endpoint = f"ipc://{tmp_path}/results.ipc"
    stalled = zmq.Context.instance().socket(zmq.SUB)  # subscribes, never reads
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.setsockopt(zmq.RCVBUF, 4096)
    stalled.setsockopt(zmq.LINGER, 0)
    stalled.setsockopt_string(zmq.SUBSCRIBE, "")
    stalled.connect(endpoint)
    proc = start_daemon(config, tmp_path)
    sub = Subscriber(endpoint, prefix="linewatch/cam1/status")
    try:
        sub.until(lambda: (sub.field("cam1", "results") or 0) > 0, 30, "first results")
        first = status_fields(sub.status("cam1"))
        t0 = time.monotonic()
        sub.poll(3.0)
        last = status_fields(sub.status("cam1"))
        rate = (last["results"] - first["results"]) / (time.monotonic() - t0)
        assert rate > 0.8 * 100, (rate, last)
        assert last["dropped"] - first["dropped"] < 0.05 * (last["captured"] - first["captured"]) + 2
        assert stop(proc) == 0
        got = 0
        while stalled.poll(200):
            got += stalled.recv_multipart()[0].endswith(b"/result")
        assert got < 0.5 * last["results"], "the stalled subscriber was never congested: test too weak"
    finally:
        stop(proc)
        stalled.close(0)
        sub.close()


@pytest.mark.e2e
def test_stuck_inference_stops_watchdog_pings_and_sigterm_still_exits(tmp_path):
    model = slow_bundle(tmp_path / "slow")
    write_calibration(model, 0.5)
    video = write_video(tmp_path / "line.avi", [grey()] * 4)
    config, endpoint = write_config(
        tmp_path,
        model,
        [{"name": "cam1", "kind": "video", "source": str(video), "loop": True, "fps": 20}],
        health={"inference_stall_s": 1.0, "drain_timeout_s": 1.0},
        engine={"warmup": False},
    )
    notify = NotifySocket(tmp_path / "notify.sock")
    sub = Subscriber(endpoint)  # before the daemon binds: it sees every message
    proc = start_daemon(config, tmp_path, notify)
    try:
        sub.until(lambda: "READY=1" in "".join(notify.drain()), 30, "READY")
        sub.until(
            lambda: any(s.get("healthy") is False for s in map(status_fields, sub.statuses)), 10, "unhealthy status"
        )
        notify.drain()
        notify.messages.clear()
        sub.poll(1.5)
        messages = notify.drain()
        assert not any("WATCHDOG=1" in m for m in messages), messages
        assert any("UNHEALTHY" in m and "inference stalled" in m for m in messages)
        assert not sub.results
        t0 = time.monotonic()
        assert stop(proc, 10) == 0
        assert time.monotonic() - t0 < 6
    finally:
        stop(proc)
        sub.close()


@pytest.mark.e2e
def test_sigterm_inspects_and_publishes_the_frames_already_captured(tmp_path):
    model = slow_bundle(tmp_path / "slow", iterations=200_000)  # 0.1-1 s a batch: far slower than the camera
    write_calibration(model, 0.5)
    video = write_video(tmp_path / "line.avi", video_frames(8))
    config, endpoint = write_config(
        tmp_path,
        model,
        [{"name": "cam1", "kind": "video", "source": str(video), "loop": True, "fps": 100, "queue_size": 12}],
        health={"drain_timeout_s": 20.0},
    )  # 3 slow batches to drain, even on a loaded machine
    sub = Subscriber(endpoint)  # before the daemon binds: it sees every message
    proc = start_daemon(config, tmp_path)
    try:
        sub.until(
            lambda: len(sub.results) >= 12 and (sub.field("cam1", "dropped") or 0) > 0, 60, "a backlog (queue drops)"
        )
        proc.send_signal(signal.SIGTERM)
        before = len(sub.results)
        sub.until(lambda: proc.poll() is not None, 25, "daemon exit")
        sub.poll(0.5)
        assert proc.returncode == 0, daemon_log(tmp_path)[-3000:]
    finally:
        stop(proc)
        sub.close()
    drained = sub.results[before:]
    assert len(drained) >= 8  # the queue was full (12) when SIGTERM came: those frames were still published
    assert all(h["verdict"] == expected_verdict(h["frame_index"]) for h in sub.results)
    final = status_fields(sub.status("cam1"))
    assert final["captured"] == final["results"] + final["dropped"] + final["skipped"], final
    assert [h["seq"] for h in sub.results] == list(range(sub.results[0]["seq"], final["results"] + 1))


@pytest.mark.e2e
def test_trigger_returns_the_result_of_a_frame_taken_after_the_request(calibrated, tmp_path):
    from linewatch.protocol.client import TriggerClient, TriggerError

    scene = {"frame": grey()}
    port = free_port()
    server = MjpegServer(port, lambda i: scene["frame"], fps=40).start()
    trigger = f"tcp://127.0.0.1:{free_port()}"
    config, endpoint = write_config(
        tmp_path,
        calibrated,
        [{"name": "cam1", "kind": "url", "source": server.url, "mode": "triggered"}],
        trigger={"enabled": True, "endpoint": trigger, "timeout_s": 5.0},
    )
    sub = Subscriber(endpoint)  # before the daemon binds: it sees every message
    proc = start_daemon(config, tmp_path)
    client = TriggerClient(trigger)
    try:
        sub.until(lambda: sub.field("cam1", "state") == "online", 30, "online")
        good = client.inspect("cam1", "part-A", timeout_s=5)
        assert good.header["part_id"] == "part-A" and good.verdict == "OK"
        scene["frame"] = with_white_square()
        time.sleep(0.5)
        bad = client.inspect("cam1", "part-B", timeout_s=5)
        assert bad.part_id == "part-B" and bad.verdict == "NOK" and bad.header["regions"]
        assert bad.mask_array().max() == 255
        with pytest.raises(TriggerError) as info:
            client.inspect("cam9", "part-C", timeout_s=5)
        assert info.value.code == "unknown_camera"
        reply, _ = client.request({"camera": "cam1"}, timeout_s=5)
        assert reply["ok"] is False and reply["code"] == "bad_request"
        assert client.inspect("cam1", "part-D", timeout_s=5).verdict == "NOK"  # still serving
        sub.poll(0.5)
        assert [h["part_id"] for h in sub.results] == ["part-A", "part-B", "part-D"]  # only triggered frames
        assert status_fields(sub.status("cam1"))["skipped"] > 0
        assert stop(proc) == 0
    finally:
        client.close()
        server.stop()
        stop(proc)
        sub.close()


@pytest.mark.e2e
def test_curve_daemon_serves_allowed_keys_and_nothing_to_others(calibrated, tmp_path):
    import zmq.auth

    from linewatch.protocol.client import Subscriber as LwSubscriber
    from linewatch.protocol.client import TriggerClient, TriggerTimeout

    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    zmq.auth.create_certificates(keys, "server")
    zmq.auth.create_certificates(allowed, "line_pc")
    zmq.auth.create_certificates(keys, "intruder")
    for secret in [*keys.glob("*.key_secret"), *allowed.glob("*.key_secret")]:
        secret.chmod(0o600)  # secret keys are private to their owner (the daemon refuses others)
    server_public, _ = zmq.auth.load_certificate(keys / "server.key")
    good_keys = zmq.auth.load_certificate(allowed / "line_pc.key_secret")
    bad_keys = zmq.auth.load_certificate(keys / "intruder.key_secret")
    video = write_video(tmp_path / "line.avi", video_frames(8))
    trigger = f"tcp://127.0.0.1:{free_port()}"
    config, endpoint = write_config(
        tmp_path,
        calibrated,
        [{"name": "cam1", "kind": "video", "source": str(video), "loop": True, "fps": 50}],
        security={
            "curve": True,
            "server_secret_key_file": str(keys / "server.key_secret"),
            "authorized_keys_dir": str(allowed),
        },
        trigger={"enabled": True, "endpoint": trigger},
    )
    proc = start_daemon(config, tmp_path)
    good = LwSubscriber(endpoint, server_key=server_public, client_keys=good_keys)
    bad = LwSubscriber(endpoint, server_key=server_public, client_keys=bad_keys)
    plain = Subscriber(endpoint)
    try:
        first = good.recv(timeout_s=30)
        assert first is not None and first.camera == "cam1"
        got_bad = [m for m in iter(lambda: bad.recv(timeout_s=1.5), None)]
        plain.poll(0.5)
        assert got_bad == [] and plain.results == [] and plain.statuses == []
        with TriggerClient(trigger, server_key=server_public, client_keys=bad_keys) as intruder:
            with pytest.raises(TriggerTimeout):
                intruder.inspect("cam1", "p1", timeout_s=1.5)
        with TriggerClient(trigger, server_key=server_public, client_keys=good_keys) as client:
            assert client.inspect("cam1", "p2", timeout_s=5).part_id == "p2"
        assert stop(proc) == 0
    finally:
        good.close()
        bad.close()
        plain.close()
        stop(proc)


@pytest.mark.e2e
def test_bad_config_exits_2_before_starting(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {bundle: nowhere}\ncameras: [{name: c, kind: device, source: 0}]\n")
    result = subprocess.run(
        [sys.executable, "-m", "linewatch.cli", "run", "--config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "model.bundle" in result.stderr


@pytest.mark.integration
def test_archive_keeps_the_newest_under_the_cap_and_survives_write_errors(tmp_path):
    from linewatch.line.archive import Archive

    folder = tmp_path / "archive"
    archive = Archive(folder, max_bytes=6000)
    frame = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)  # ~3 kB as PNG
    for seq in range(1, 7):
        archive.write("cam1", seq, "NOK", frame, None, wall_time=1000.0 + seq)
    kept = sorted(p.name for p in folder.iterdir())
    assert archive.used_bytes <= 6000 and sum(p.stat().st_size for p in folder.iterdir()) == archive.used_bytes
    assert kept and all("_cam1_" in n for n in kept) and "_000000006_NOK.png" in kept[-1]
    assert not any("_000000001_" in n for n in kept) and archive.deleted >= 1  # the oldest went first
    blocked = tmp_path / "not_a_dir"
    blocked.write_text("a file where the archive folder should be")
    broken = Archive(blocked, max_bytes=10_000)
    broken.start()
    assert broken.submit("cam1", 1, "ERROR", frame, b"png")
    broken.close()
    assert broken.errors >= 1 and broken.saved == 0  # counted and logged, never raised


@pytest.mark.e2e
def test_exit_when_sources_end_inspects_every_frame_of_a_file_then_exits_0(calibrated, tmp_path):
    video = write_video(tmp_path / "line.avi", video_frames(6))
    config, endpoint = write_config(
        tmp_path,
        calibrated,
        [{"name": "cam1", "kind": "video", "source": str(video), "loop": False}],
        health={"exit_when_sources_end": True},
    )
    sub = Subscriber(endpoint)  # before the daemon binds: it sees every message
    proc = start_daemon(config, tmp_path)
    try:
        assert proc.wait(30) == 0, daemon_log(tmp_path)[-3000:]
        sub.poll(0.5)
    finally:
        stop(proc)
        sub.close()
    final = status_fields(sub.status("cam1"))
    assert final["state"] == "finished" and final["captured"] == final["results"] == 6 and final["dropped"] == 0
    assert final["verdicts"] == {"OK": 4, "NOK": 2, "ERROR": 0}


# --- the publish path in-process: real engine, real publisher, real SUB socket -----------------------------


@pytest.fixture
def daemon_in_process(calibrated, tmp_path):
    """A Daemon built from a real config (cameras not started): its publish path is called directly."""
    from linewatch.line.config import load_config
    from linewatch.line.daemon import Daemon

    video = write_video(tmp_path / "line.avi", [grey()] * 2)
    cameras = [{"name": name, "kind": "video", "source": str(video)} for name in ("cam1", "cam2")]
    config, endpoint = write_config(tmp_path, calibrated, cameras)
    daemon = Daemon(load_config(config))
    sub = Subscriber(endpoint)
    try:
        sub.until(lambda: daemon.publish_status() or sub.statuses, 10, "the subscription to reach the publisher")
        yield daemon, sub
    finally:
        sub.close()
        daemon._close_sockets()


def frame_of(camera: str, index: int, image: np.ndarray):
    from linewatch.line.frames import Frame

    return Frame(camera, index, time.time(), time.monotonic(), image)


@pytest.mark.integration
def test_a_frame_with_120_regions_publishes_all_of_them_counted_and_the_largest_100(daemon_in_process):
    from linewatch.line.inference import judge_frames
    from linewatch.protocol.wire import decode_mask_png

    daemon, sub = daemon_in_process
    image = grey()
    for i in range(120):  # 2×2 white squares 2 px apart: 120 separate 8-connected regions of 4 px
        y, x = 4 * (i // 16) + 1, 4 * (i % 16) + 1
        image[y : y + 2, x : x + 2] = 255
    image[1:3, 1:4] = 255  # one of them larger (6 px): listed first
    daemon.publish_results(judge_frames(daemon.model, [frame_of("cam1", 7, image)]))
    sub.until(lambda: sub.results, 5, "the result")
    header, mask = sub.results[0], decode_mask_png(sub.masks[0])
    assert header["verdict"] == "NOK" and header["frame_index"] == 7
    assert header["regions_total"] == 120 and len(header["regions"]) == 100
    assert header["regions"][0] == {"bbox": [1, 1, 3, 2], "area": 6, "peak": 1.0, "defect": True}
    assert {r["area"] for r in header["regions"][1:]} == {4}
    assert header["mask"] == {"format": "png", "width": 64, "height": 64}
    np.testing.assert_array_equal(mask > 0, image[:, :, 0] == 255)


@pytest.mark.integration
def test_a_result_that_cannot_be_published_goes_out_as_error_and_the_rest_of_its_batch_in_order(daemon_in_process):
    """A result without a valid header or mask (a bug) becomes an ERROR result for its frame, with the reason and
    the next seq, and its trigger gets that ERROR; only a frame not even an ERROR can describe is counted as
    publish_dropped. Either way, the other results of the batch, other cameras' too, go out in order."""
    from concurrent.futures import Future

    from linewatch.line.inference import Result, judge_frames
    from linewatch.line.verdict import Judgement
    from linewatch.protocol.wire import Verdict

    daemon, sub = daemon_in_process
    frames = [
        frame_of(cam, i, with_white_square() if i % 2 else grey()) for i, cam in enumerate(["cam1"] * 2 + ["cam2"])
    ]
    claims_ok, bad_mask, hopeless = (
        frame_of("cam1", 99, grey()),
        frame_of("cam2", 98, grey()),
        frame_of("cam1", 97, grey()),
    )
    hopeless.captured_wall = float("nan")  # no header can carry this frame time, not even an ERROR's
    for frame in (claims_ok, hopeless, frames[1]):
        frame.future = Future()
    results = judge_frames(daemon.model, frames)
    batch = [
        results[0],
        Result(claims_ok, Verdict.OK, daemon.model, score=float("nan")),  # a bug: OK without a score
        results[1],
        Result(
            bad_mask, Verdict.NOK, daemon.model, score=0.9, judgement=Judgement(Verdict.NOK, np.zeros((0, 0), bool))
        ),
        results[2],
        Result(hopeless, Verdict.OK, daemon.model, score=0.1, judgement=results[0].judgement),
        *judge_frames(daemon.model, frames[:1]),
    ]
    daemon.publish_results(batch)
    sub.until(lambda: len(sub.results) >= 6, 5, "the results")
    sub.poll(0.3)
    got = [(h["camera"], h["seq"], h["frame_index"], h["verdict"]) for h in sub.results]
    assert got == [
        ("cam1", 1, 0, "OK"),
        ("cam1", 2, 99, "ERROR"),
        ("cam1", 3, 1, "NOK"),
        ("cam2", 1, 98, "ERROR"),
        ("cam2", 2, 2, "OK"),
        ("cam1", 4, 0, "OK"),
    ]
    errors = {h["frame_index"]: h for h in sub.results if h["verdict"] == "ERROR"}
    assert_error_instead(errors[99], "score")
    assert_error_instead(errors[98], "mask")
    reply = claims_ok.future.result(0)  # the trigger gets the ERROR that was published for its frame
    assert reply["header"] == errors[99] and reply["mask"] is None
    assert frames[1].future.result(0)["header"] == sub.results[2]
    with pytest.raises(Exception, match="could not be published"):
        hopeless.future.result(0)
    daemon.publish_status()
    sub.until(lambda: len(sub.statuses) >= 2 and sub.field("cam1", "publish_dropped") == 1, 5, "the count")
    cam1, cam2 = status_fields(sub.status("cam1")), status_fields(sub.status("cam2"))
    assert (cam1["results"], cam1["publish_dropped"], cam1["verdicts"]) == (4, 1, {"OK": 2, "NOK": 1, "ERROR": 1})
    assert (cam2["results"], cam2["publish_dropped"], cam2["verdicts"]) == (2, 0, {"OK": 1, "NOK": 0, "ERROR": 1})


def assert_error_instead(header: dict, cause: str) -> None:
    """An ERROR published in place of a result that could not be: the reason says why, nothing of it is claimed."""
    assert "could not be published" in header["error"] and cause in header["error"], header["error"]
    assert header["image_score"] is None and header["mask"] is None and header["regions"] == []


# --- health: every long-lived thread, and a slow machine is not a hang --------------------------------------


class SlowScorer:
    """A real engine that takes `delay_s` longer per batch (a slow CPU), or never returns while `hang` is set."""

    def __init__(self, engine, delay_s: float):
        self.engine, self.delay_s = engine, delay_s
        self.input_size = engine.input_size
        self.hang = threading.Event()
        self.release = threading.Event()

    def score(self, frames: np.ndarray):
        time.sleep(self.delay_s)
        if self.hang.is_set():
            self.release.wait(30)
        return self.engine.score(frames)


@pytest.mark.integration
def test_a_slow_machine_is_not_taken_for_a_hung_engine_but_a_hang_still_is(calibrated, tmp_path):
    """The stall limit follows the measured batch time: batches of 0.6 s against inference_stall_s 0.5 keep the
    daemon healthy; a batch that does not finish within 3 × the slowest recent batch is still a hang."""
    import dataclasses

    from linewatch.line.config import load_config
    from linewatch.line.daemon import Daemon

    video = write_video(tmp_path / "line.avi", [grey()] * 4)
    camera = {"name": "cam1", "kind": "video", "source": str(video), "loop": True, "fps": 20, "queue_size": 4}
    config, _ = write_config(tmp_path, calibrated, [camera], health={"inference_stall_s": 0.5})
    daemon = Daemon(load_config(config))
    slow = SlowScorer(daemon.model.engine, 0.6)
    daemon.worker.model = dataclasses.replace(daemon.model, engine=slow)  # swapped in as a reload does
    try:
        daemon.start()
        assert _wait_for(lambda: daemon.stats["cam1"].seq >= 1, 20), "no first result"
        reasons, longest = set(), 0.0
        end = time.monotonic() + 2.0  # three more slow batches
        while time.monotonic() < end:
            longest = max(longest, daemon.worker.stalled_for())
            reasons.add(daemon.health())
            time.sleep(0.02)
        assert longest > 0.5, "the batches were not slower than the configured limit: test too weak"
        assert reasons == {None}
        slow.hang.set()
        assert _wait_for(lambda: "inference stalled" in (daemon.health() or ""), 5), "a hung engine went unnoticed"
        limit = float(re.search(r"limit ([0-9.]+) s", daemon.health() or "").group(1))
        assert 1.8 <= limit < 6.0  # 3 × the slowest measured batch (>= 0.6 s), not the 0.5 s configured
    finally:
        slow.release.set()
        daemon.stop_requested.set()
        daemon.shutdown()


@pytest.mark.integration
def test_warm_up_measures_a_full_warm_batch(calibrated):
    from linewatch.line.inference import load_model, warm_up

    model = load_model(calibrated, ("cpu",), 1, max_batch=4, warmup=True)
    assert model.batch_s is not None and 0 < model.batch_s < 1.0
    assert 0.3 <= warm_up(SlowScorer(model.engine, 0.3), 4) < 1.0  # one warm batch, not the whole warm-up


class Crash(BaseException):
    """Raised where no guard for ordinary errors catches it: the trigger server's thread ends, as it would on an
    internal bug."""


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_trigger_thread_stops_the_watchdog_pings_and_the_status_says_why(calibrated, tmp_path, monkeypatch):
    from linewatch.line.config import load_config
    from linewatch.line.daemon import Daemon
    from linewatch.line.trigger import TriggerServer
    from linewatch.protocol.client import TriggerClient

    video = write_video(tmp_path / "line.avi", [grey()] * 4)
    camera = {"name": "cam1", "kind": "video", "source": str(video), "loop": True, "fps": 20}
    config, endpoint = write_config(tmp_path, calibrated, [camera])
    notify = NotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    daemon = Daemon(load_config(config))

    def handler(camera: str, part_id: str):
        if part_id == "crash":
            raise Crash()
        return daemon.handle_trigger(camera, part_id)

    trigger = f"tcp://127.0.0.1:{free_port()}"
    sub = Subscriber(endpoint)
    runner = threading.Thread(target=daemon.run, name="daemon-main")
    try:
        daemon.trigger = TriggerServer(trigger, handler, timeout_s=5.0)  # the daemon's own, with a crash on request
        daemon.trigger.start()
        runner.start()
        sub.until(lambda: sub.field("cam1", "healthy") is True, 30, "a healthy status")
        assert sub.field("cam1", "unhealthy_reason") is None
        with TriggerClient(trigger) as client:
            assert client.inspect("cam1", "part-1", timeout_s=5).verdict == "OK"
        assert "WATCHDOG=1" in notify.drain()
        crash = zmq.Context.instance().socket(zmq.DEALER)
        crash.setsockopt(zmq.LINGER, 0)
        crash.connect(trigger)
        crash.send_multipart([b"", json.dumps({"camera": "cam1", "part_id": "crash"}).encode()])
        sub.until(lambda: sub.field("cam1", "healthy") is False, 10, "an unhealthy status")
        crash.close(0)
        assert "trigger server" in sub.field("cam1", "unhealthy_reason")
        notify.messages.clear()
        sub.poll(1.5)
        messages = notify.drain()
        assert not any("WATCHDOG=1" in m for m in messages), messages
        assert any("UNHEALTHY (trigger server" in m for m in messages), messages
        assert "trigger server" in status_fields(sub.status("cam1"))["unhealthy_reason"]
    finally:
        daemon.stop_requested.set()
        if runner.is_alive():
            runner.join(15)
        else:
            daemon._close_sockets()
        sub.close()
    assert not runner.is_alive()


def _wait_for(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


# --- every frame accounted for (issue 13, items 5 and 6) and a calibration-only reload (item 7) -------------


def results_in_capture_order(results: list[dict], camera: str = "cam1") -> list[dict]:
    return sorted((h for h in results if h["camera"] == camera), key=lambda h: h["frame_index"])


@pytest.mark.e2e
def test_sigterm_past_the_drain_timeout_gives_every_captured_frame_one_message_and_status_keeps_beating(tmp_path):
    """Batches of ~0.5 s, a full queue and 1 s to drain: what is not inspected in time is published as ERROR
    ("shutdown: not inspected"), so results == captured with seq gapless; status kept its interval meanwhile."""
    model = slow_bundle(tmp_path / "slow", iterations=1_000_000)
    write_calibration(model, 0.5)
    video = write_video(tmp_path / "line.avi", video_frames(8))
    config, endpoint = write_config(
        tmp_path,
        model,
        [{"name": "cam1", "kind": "video", "source": str(video), "loop": True, "queue_size": 8}],
        health={"drain_timeout_s": 1.0},
        engine={"warmup": False},
    )  # a file without an fps cap waits for queue room: nothing is dropped, every frame is captured for a result
    sub = Subscriber(endpoint)  # before the daemon binds: it sees every message
    proc = start_daemon(config, tmp_path)
    try:
        sub.until(lambda: len(sub.results) >= 6, 60, "first results")
        sent_term = time.time()
        proc.send_signal(signal.SIGTERM)
        sub.until(lambda: proc.poll() is not None, 20, "daemon exit")
        sub.poll(0.5)
        assert proc.returncode == 0, daemon_log(tmp_path)[-3000:]
    finally:
        stop(proc)
        sub.close()
    final = status_fields(sub.status("cam1"))
    assert final["stopping"] and final["dropped"] == 0 and final["publish_dropped"] == 0, final
    assert final["results"] == final["captured"], final
    assert [h["seq"] for h in sub.results] == list(range(1, final["captured"] + 1))
    ordered = results_in_capture_order(sub.results)
    assert [h["frame_index"] for h in ordered] == list(range(1, final["captured"] + 1))  # each frame exactly once
    assert [h["frame_index"] for h in sub.results] == [h["frame_index"] for h in ordered]  # published in order
    late = [h for h in sub.results if h["verdict"] == "ERROR"]
    assert len(late) >= 4, "the drain finished everything: test too weak"
    assert {h["error"] for h in late} == {"shutdown: not inspected"}
    assert all(h["image_score"] is None for h in late)
    assert all(h["verdict"] == expected_verdict(h["frame_index"]) for h in sub.results if h["verdict"] != "ERROR")
    during = [s["publish_time"] for s in sub.statuses if s["publish_time"] >= sent_term]
    assert len(during) >= 4, f"{len(during)} status messages during a 1 s drain"
    assert max(np.diff(during)) < 0.6, "the life bit stopped during the drain"
    assert "published as ERROR" in daemon_log(tmp_path)


@pytest.mark.e2e
@pytest.mark.parametrize("frames_are_parts", [True, False])
def test_frames_dropped_because_inference_is_behind_are_errors_when_frames_are_parts(tmp_path, frames_are_parts):
    """A camera at 50 frames/s into an engine of ~10 batches/s and a queue of 2: with frames_are_parts every
    dropped frame is an ERROR result, in capture order, so results == captured; without it, as before: drops are
    counted in the status and get no message."""
    model = slow_bundle(tmp_path / "slow", iterations=400_000)
    write_calibration(model, 0.5)
    video = write_video(tmp_path / "line.avi", video_frames(8))
    camera = {"name": "cam1", "kind": "video", "source": str(video), "loop": True, "fps": 50, "queue_size": 2}
    camera["frames_are_parts"] = frames_are_parts
    config, endpoint = write_config(
        tmp_path, model, [camera], health={"drain_timeout_s": 3.0}, engine={"warmup": False}
    )
    sub = Subscriber(endpoint)  # before the daemon binds: it sees every message
    proc = start_daemon(config, tmp_path)
    key = "dropped_as_error" if frames_are_parts else "dropped"
    try:
        sub.until(lambda: (sub.field("cam1", key) or 0) >= 10, 60, f"10 frames counted as {key}")
        proc.send_signal(signal.SIGTERM)
        sub.until(lambda: proc.poll() is not None, 20, "daemon exit")
        sub.poll(0.5)
        assert proc.returncode == 0, daemon_log(tmp_path)[-3000:]
    finally:
        stop(proc)
        sub.close()
    final = status_fields(sub.status("cam1"))
    assert [h["seq"] for h in sub.results] == list(range(1, final["results"] + 1))
    indices = [h["frame_index"] for h in sub.results]
    assert indices == sorted(indices)  # in capture order, the dropped parts' ERRORs included
    dropped = [h for h in sub.results if h["error"] == "dropped: inference behind, not inspected"]
    inspected = [h for h in sub.results if h["verdict"] != "ERROR"]
    assert inspected and all(h["verdict"] == expected_verdict(h["frame_index"]) for h in inspected)
    if frames_are_parts:
        assert final["dropped"] == 0 and final["results"] == final["captured"], final
        assert indices == list(range(1, final["captured"] + 1))  # every part has its message
        assert len(dropped) >= final["dropped_as_error"] >= 10
        assert all(h["image_score"] is None and h["verdict"] == "ERROR" for h in dropped)
    else:
        assert not dropped and final["dropped_as_error"] == 0
        assert final["dropped"] >= 10 and final["results"] + final["dropped"] == final["captured"], final


@pytest.mark.e2e
def test_a_calibration_only_reload_swaps_at_once_and_a_refused_one_costs_no_warm_up(tmp_path):
    """The running graph warms up in ~2.5 s (slow at max_batch). A SIGHUP that changes only the calibration keeps
    the engine: results carry the new thresholds within a fraction of that, without a gap; a broken calibration
    is refused before any engine is built or warmed up."""
    model = slow_bundle(tmp_path / "slow_at_max_batch", iterations=60_000, per_extra_frame=True)
    write_calibration(model, 0.5)
    video = write_video(tmp_path / "line.avi", video_frames(8))
    camera = {"name": "cam1", "kind": "video", "source": str(video), "loop": True, "fps": 50}
    config, endpoint = write_config(
        tmp_path, model, [camera], engine={"max_batch": 24}, health={"inference_stall_s": 30.0}
    )
    sub = Subscriber(endpoint)  # before the daemon binds: it sees every message
    proc = start_daemon(config, tmp_path)
    try:
        sub.until(lambda: len(sub.results) >= 20, 60, "results of calibration 1")
        assert daemon_log(tmp_path).count("engine warm-up") == 1
        version = write_calibration(model, 0.75)
        n = len(sub.results)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGHUP)
        sub.until(lambda: sub.results[-1]["calibration_version"] == version, 20, "results of the new calibration")
        swapped = time.monotonic() - t0
        sub.poll(0.5)
        (model / bundle.CALIBRATION).write_text('{"broken": ')
        t1 = time.monotonic()
        proc.send_signal(signal.SIGHUP)
        assert _wait_for(lambda: "reload refused" in daemon_log(tmp_path), 20), "the broken calibration was taken"
        refused = time.monotonic() - t1
        m = len(sub.results)
        sub.until(lambda: len(sub.results) >= m + 10, 10, "results after the refused reload")
        assert proc.poll() is None
        assert stop(proc) == 0
    finally:
        stop(proc)
        sub.close()
    text = daemon_log(tmp_path)
    assert text.count("engine warm-up") == 1 and text.count("engine kept") == 1, text[-3000:]
    assert swapped < 1.0, f"the calibration took {swapped:.2f} s to swap in"
    assert refused < 1.0, f"the broken calibration took {refused:.2f} s to refuse"
    after = [h for h in sub.results[n:] if h["calibration_version"] == version]
    assert after and {h["thresholds"]["pixel"] for h in after} == {0.75}
    assert {h["calibration_version"] for h in sub.results[m:]} == {version}  # kept after the refusal
    stamps = [h["publish_time"] for h in sub.results[n - 10 :]]
    assert max(np.diff(stamps)) < 0.5, "inference paused during the reloads"
