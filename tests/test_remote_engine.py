"""The daemon on a remote engine (issue 19 item 3): `engine.backend: triton` against the real server, `linewatch
serve` (PyTriton's tritonserver) run from its own virtual environment as a subprocess, the daemon as a subprocess on
a real video camera, real ZeroMQ subscribers and a real sd_notify socket.

The serve environment is `$LINEWATCH_SERVE_PYTHON`, default `~/.cache/linewatch-ci/serve-venv/bin/python`
(docs/SCALING.md says how to make it); without it these tests fail, naming what is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from linewatch.errors import ConfigError
from linewatch.line.config import load_config
from tests.bundles import make_deviation_bundle
from tests.helpers import NotifySocket, free_port, grey, write_video
from tests.test_daemon import (
    Subscriber,
    daemon_log,
    expected_verdict,
    start_daemon,
    status_fields,
    stop,
    video_frames,
    write_calibration,
    write_config,
)

ROOT = Path(__file__).resolve().parents[1]
SERVE_PYTHON = os.environ.get(
    "LINEWATCH_SERVE_PYTHON", str(Path.home() / ".cache" / "linewatch-ci" / "serve-venv" / "bin" / "python")
)
OFFLINE = "remote engine offline"


def _grpc_ready(url: str, model: str) -> bool:
    import tritonclient.grpc as grpcclient

    try:
        client = grpcclient.InferenceServerClient(url)
        try:
            return bool(client.is_model_ready(model, client_timeout=1.0))
        finally:
            client.close()
    except Exception:
        return False


class Served:
    """`linewatch serve BUNDLE` on fixed ports picked at run time: start, kill (SIGKILL to the whole process group,
    tritonserver included: a crash, not a clean stop) and start again on the same ports."""

    def __init__(self, bundle_dir: Path, log_dir: Path):
        if not Path(SERVE_PYTHON).is_file():
            pytest.fail(
                f"no serve environment at {SERVE_PYTHON} (set LINEWATCH_SERVE_PYTHON, or create it: python -m venv "
                f"~/.cache/linewatch-ci/serve-venv && ~/.cache/linewatch-ci/serve-venv/bin/pip install -e '.[serve]')"
            )
        from linewatch import bundle

        self.bundle_dir = bundle_dir
        self.model = "linewatch-" + bundle.read_metadata(bundle_dir)["graph"]["sha256"][:16]
        self.grpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 90.0) -> None:
        self.starts += 1
        log = open(self.log_dir / f"serve-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(
            [
                SERVE_PYTHON,
                "-m",
                "linewatch.cli",
                "serve",
                str(self.bundle_dir),
                "--grpc-port",
                str(self.grpc_port),
                "--http-port",
                str(self.http_port),
                "--metrics-port",
                str(self.metrics_port),
                "--providers",
                "cpu",
                "--threads",
                "1",
                "--max-batch",
                "8",
            ],  # fmt: skip
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        end = time.monotonic() + timeout
        while not _grpc_ready(self.url, self.model):
            assert self.proc.poll() is None, self.log()[-3000:]
            assert time.monotonic() < end, f"linewatch serve not ready in {timeout} s:\n{self.log()[-3000:]}"
            time.sleep(0.3)

    def kill(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        pid, self.proc = self.proc.pid, None
        # what SIGKILL left behind of this server: PyTriton's shared memory, named after its process id
        for leftover in Path("/dev/shm").glob(f"pytrtion{pid}-*"):
            leftover.unlink(missing_ok=True)

    def log(self) -> str:
        return (self.log_dir / f"serve-{self.starts}.log").read_text(errors="replace")

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        match = re.search(rf'^{name}{{model="{self.model}",version="1"}} (\S+)$', text, re.M)
        return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def calibrated_bundle(tmp_path_factory) -> Path:
    folder = make_deviation_bundle(tmp_path_factory.mktemp("remote_bundle"), 64, 64)
    write_calibration(folder, 0.5)
    return folder


@pytest.fixture(scope="module")
def served(calibrated_bundle, tmp_path_factory):
    server = Served(calibrated_bundle, tmp_path_factory.mktemp("serve_logs"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


def remote(served: Served, **extra) -> dict:
    return {
        "backend": "triton",
        "url": served.url,
        "timeout_s": 2.0,
        "check_interval_s": 0.3,
        "reconnect": {"initial_s": 0.2, "max_s": 1.0},
    } | extra


def graded_frames(n: int) -> list[np.ndarray]:
    """Grey frames with a square whose brightness steps up frame by frame: scores spread over 0..1, both verdicts."""
    frames = []
    for i in range(n):
        img = grey()
        img[20 : 20 + 6 + i % 5, 12 : 12 + 8] = min(255, 128 + 9 * i)
        frames.append(img)
    return frames


def collect(tmp_path: Path, bundle_dir: Path, video: Path, n: int, engine: dict) -> dict[int, list[dict]]:
    """Results of a daemon on the looped video until every one of its n frames was judged twice, by frame."""
    config, endpoint = write_config(
        tmp_path,
        bundle_dir,
        [{"name": "cam1", "kind": "video", "source": str(video), "loop": True, "fps": 100, "queue_size": 8}],
        engine=engine,
    )
    sub = Subscriber(endpoint)
    proc = start_daemon(config, tmp_path)
    by_frame: dict[int, list[dict]] = {}
    try:
        sub.until(lambda: len(sub.results) >= 3 * n, 60, f"{3 * n} results")
        for h in sub.results:
            by_frame.setdefault((h["frame_index"] - 1) % n, []).append(h)
        assert stop(proc) == 0, daemon_log(tmp_path)[-3000:]
    finally:
        stop(proc)
        sub.close()
    return by_frame


# --- tests ----------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_triton_backend_publishes_the_local_engines_verdicts_and_scores(served, calibrated_bundle, tmp_path):
    n = 16
    video = write_video(tmp_path / "line.avi", graded_frames(n))
    (tmp_path / "local").mkdir()
    (tmp_path / "remote").mkdir()
    local = collect(tmp_path / "local", calibrated_bundle, video, n, {"max_batch": 4})
    remote_results = collect(tmp_path / "remote", calibrated_bundle, video, n, remote(served, max_batch=4))
    assert {h["verdict"] for hs in local.values() for h in hs} == {"OK", "NOK"}  # the video has both verdicts
    assert len({hs[0]["image_score"] for hs in local.values()}) > 4  # scores spread, not one value compared
    compared = 0
    for frame, headers in remote_results.items():
        if frame not in local:
            continue
        want = local[frame][0]
        for h in headers:
            assert h["verdict"] == want["verdict"] and h["error"] is None, (want, h)
            assert abs(h["image_score"] - want["image_score"]) <= 1e-5, (want, h)
            assert [(g["bbox"], g["area"], g["defect"]) for g in h["regions"]] == [
                (g["bbox"], g["area"], g["defect"]) for g in want["regions"]
            ]
            assert h["model_id"] == want["model_id"]
            compared += 1
    assert compared >= 2 * n, compared


@pytest.mark.integration
def test_a_batch_is_one_request_to_the_server(served, calibrated_bundle):
    """The batch the daemon forms is what the server receives: one request of N frames (the server's dynamic
    batcher, not the client, merges requests across daemons)."""
    from linewatch.calibrate.store import load_calibration
    from linewatch.line.config import EngineConfig
    from linewatch.line.remote_engine import TritonScorer

    settings = EngineConfig.model_validate(remote(served))
    scorer = TritonScorer.connect(calibrated_bundle, "fp32", settings, 8, load_calibration(calibrated_bundle))
    try:
        frames = np.stack([grey(128 + 10 * i) for i in range(7)])
        requests0, frames0 = served.metric("nv_inference_request_success"), served.metric("nv_inference_count")
        maps, scores = scorer.score(frames)
        assert served.metric("nv_inference_request_success") - requests0 == 1
        assert served.metric("nv_inference_count") - frames0 == 7
        assert maps.shape == (7, 64, 64) and scores.shape == (7,) and scores.dtype == np.float32
        np.testing.assert_allclose(scores, [10 * i / 127 for i in range(7)], atol=1e-6)
        assert scorer.status()["state"] == "online" and scorer.health() is None
    finally:
        scorer.close()


@pytest.mark.e2e
def test_a_server_hosting_another_graph_is_refused_before_ready(served, tmp_path):
    other = make_deviation_bundle(tmp_path / "other", 96, 96)  # another graph (its own hash)
    write_calibration(other, 0.5)
    video = write_video(tmp_path / "line.avi", [grey(size=96)] * 4)
    config, _ = write_config(
        tmp_path, other, [{"name": "cam1", "kind": "video", "source": str(video)}], engine=remote(served)
    )
    notify = NotifySocket(tmp_path / "notify.sock")
    proc = start_daemon(config, tmp_path, notify)
    try:
        code = proc.wait(60)
    finally:
        stop(proc)
    log = daemon_log(tmp_path)
    assert code == 2, log[-3000:]
    assert "has no model 'linewatch-" in log and "serves another graph" in log, log[-3000:]
    assert not any("READY=1" in m for m in notify.drain())
    # `linewatch check-config` (the unit's ExecStartPre) says the same before anything starts
    checked = subprocess.run(
        [sys.executable, "-m", "linewatch.cli", "check-config", str(config)], cwd=ROOT, capture_output=True, text=True
    )
    assert checked.returncode == 2 and "serves another graph" in checked.stderr, checked.stderr


@pytest.mark.e2e
def test_check_config_passes_a_server_running_the_bundles_graph(served, calibrated_bundle, tmp_path):
    video = write_video(tmp_path / "line.avi", [grey()] * 2)
    config, _ = write_config(
        tmp_path, calibrated_bundle, [{"name": "cam1", "kind": "video", "source": str(video)}], engine=remote(served)
    )
    checked = subprocess.run(
        [sys.executable, "-m", "linewatch.cli", "check-config", str(config)], cwd=ROOT, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr


@pytest.mark.e2e
def test_server_outage_gives_error_results_and_offline_engine_watchdog_fed_and_results_resume(served, tmp_path):
    """Unreachable at start: the daemon starts and says so; killed mid-run: ERROR, never OK, status offline, pings
    go on; restarted on the same port: results resume."""
    served.kill()
    video = write_video(tmp_path / "line.avi", video_frames(8))
    config, endpoint = write_config(
        tmp_path,
        served.bundle_dir,
        [{"name": "cam1", "kind": "video", "source": str(video), "loop": True, "fps": 20, "queue_size": 8}],
        engine=remote(served),
    )
    notify = NotifySocket(tmp_path / "notify.sock")
    sub = Subscriber(endpoint)
    proc = start_daemon(config, tmp_path, notify)

    def engine() -> dict:
        return status_fields(sub.status("cam1")).get("engine") or {}

    def judged() -> list[dict]:
        return [h for h in sub.results if h["verdict"] != "ERROR"]

    try:
        # unreachable at start: READY, ERROR results with the reason, the engine offline, healthy
        sub.until(lambda: len(sub.results) >= 5, 30, "ERROR results while the server is down at start")
        assert all(h["verdict"] == "ERROR" and OFFLINE in h["error"] for h in sub.results), sub.results[:3]
        assert engine()["state"] == "offline" and engine()["backend"] == "triton", engine()
        assert "READY=1" in notify.drain()

        served.start()
        sub.until(lambda: len(judged()) >= 8, 30, "results once the server is up")
        sub.until(lambda: engine().get("state") == "online", 5, "the engine online in the status")
        assert engine()["last_error"] is None and engine()["reconnects"] >= 1, engine()
        for h in judged():
            assert h["verdict"] == expected_verdict(h["frame_index"]), h

        served.kill()
        sub.until(lambda: engine().get("state") == "offline", 15, "the engine offline in the status")
        sub.until(lambda: sub.results[-1]["verdict"] == "ERROR", 15, "ERROR results after the kill")
        during = len(sub.results)
        notify.messages.clear()
        sub.poll(1.5)
        outage = sub.results[during:]
        assert len(outage) >= 10, "frames stopped being answered while the engine was down"
        assert all(h["verdict"] == "ERROR" and OFFLINE in h["error"] for h in outage), outage[:3]
        status = status_fields(sub.status("cam1"))
        assert status["healthy"] is True and status["engine"]["last_error"], status
        assert status["engine"]["failures"] >= 2, status["engine"]
        # an engine outage is reported, not a reason for systemd to restart the daemon: pings go on
        messages = notify.drain()
        assert "WATCHDOG=1" in messages and any("engine offline" in m for m in messages), messages

        served.start()
        resumed = len(sub.results)
        sub.until(lambda: len(judged()) >= 8 + 8 and sub.results[-1]["verdict"] != "ERROR", 30, "results resume")
        after = [h for h in sub.results[resumed:] if h["verdict"] != "ERROR"]
        assert after and all(h["verdict"] == expected_verdict(h["frame_index"]) for h in after)
        sub.poll(0.5)
        assert engine()["state"] == "online" and engine()["reconnects"] >= 2, engine()
        assert stop(proc) == 0
    finally:
        stop(proc)
        sub.close()
    assert not re.search(r"unhealthy", daemon_log(tmp_path)), daemon_log(tmp_path)[-3000:]


@pytest.mark.unit
def test_triton_backend_config_needs_a_url_and_a_deadline_below_the_stall_limit(tmp_path):
    video = write_video(tmp_path / "line.avi", [grey()] * 2)
    bundle_dir = make_deviation_bundle(tmp_path / "bundle", 64, 64)
    cams = [{"name": "cam1", "kind": "video", "source": str(video)}]
    config, _ = write_config(tmp_path, bundle_dir, cams, engine={"backend": "triton"})
    with pytest.raises(ConfigError, match=r"engine\.url: expected host:port of the Triton server"):
        load_config(config)
    config, _ = write_config(tmp_path, bundle_dir, cams, engine={"backend": "triton", "url": "grpc://gpu1:8001"})
    with pytest.raises(ConfigError, match=r"engine\.url: expected host:port \(gRPC, no scheme\)"):
        load_config(config)
    config, _ = write_config(
        tmp_path, bundle_dir, cams, engine={"backend": "triton", "url": "gpu1:8001", "timeout_s": 10.0}
    )
    with pytest.raises(ConfigError, match=r"engine\.timeout_s: expected less than health\.inference_stall_s"):
        load_config(config)
    cfg = load_config(write_config(tmp_path, bundle_dir, cams, engine={"backend": "triton", "url": "gpu1:8001"})[0])
    assert cfg.engine.backend == "triton" and cfg.engine.model is None and not cfg.engine.tls.enabled
    key = tmp_path / "client.key"
    key.write_text("not used\n")
    config, _ = write_config(
        tmp_path, bundle_dir, cams, engine={"backend": "triton", "url": "gpu1:8001", "tls": {"private_key": str(key)}}
    )
    with pytest.raises(ConfigError, match=r"engine\.tls\.certificate_chain"):
        load_config(config)
    shutil.rmtree(bundle_dir)
