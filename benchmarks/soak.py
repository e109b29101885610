"""Accounting soak: the daemon under load and faults for N minutes, then every captured frame accounted for.

  python benchmarks/soak.py [--minutes 30] [--json soak.json] [--workdir DIR] [--bundle DIR]

`linewatch run` runs as a real subprocess with five cameras: `vid` (looped MJPG video file), `dir` (image folder
holding a corrupt, an empty, a 16-bit, a grey-only, a BGRA and an odd-sized image), `web` (MJPEG over HTTP from a
local server, queue of one frame), `flaky` (MJPEG over HTTP whose server is stopped and restarted periodically: an
outage) and `trig` (video file, `mode: triggered`). Against it, all at once:

  * a subscriber that keeps up (unbounded RCVHWM, every message parsed with `linewatch.protocol.wire`),
  * a slow subscriber (sleeps per message, RCVHWM 10, a 4 KiB kernel buffer): it must lose, and exactly its seq gaps,
  * a polite trigger client (one request at a time, from 127.0.0.2) and a flooding one (bursts of requests, one in
    ten malformed, from 127.0.0.3: another client at another address),
  * SIGHUP every few seconds, alternating a good new calibration and a corrupt one (truncated, nested too deeply,
    wrong types, NaN, another model's hash, empty, invalid UTF-8, not an object),
  * the `flaky` camera's outages, and the daemon's RSS sampled throughout.

After SIGTERM, from the daemon's final status per camera (`stopping: true`), the checks:

  captured = results (handed to ZeroMQ: OK/NOK/ERROR) + publish_dropped + dropped + skipped, exactly; and
  publish_dropped = 0 (an inspected frame that was not handed over is a loss);
  the keeping-up subscriber got every seq 1..results and the daemon's verdict counts;
  the slow one's losses (results - received) equal its seq gaps, and what it got matches the keeping-up one's;
  every trigger request got exactly one reply, every `ok` reply's result was published with that part_id, and the
  triggered camera published only frames somebody asked for;
  no OK/NOK without a finite score and a calibration that was written as good (thresholds to match); frames whose
  content is known (video, folder) got the verdict their pixels call for, corrupt images ERROR;
  every good reload took effect, every corrupt one was refused and the old calibration kept (status topic and the
  `linewatch_reloads_total` metric); a calibration version never names two calibrations, the history stays loadable;
  the flood never costs the polite client a `busy`, a `timeout` or a wait of over half the trigger timeout;
  the flaky camera came back after every outage; every status said healthy; RSS flat (least-squares slope).

Prints a JSON summary (also written with --json) and exits 1 if any check fails. The defaults are the 30-minute
benchmark; tests/test_soak.py runs the same checks for under a minute.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import yaml
import zmq
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests.helpers and tests.bundles: the test suite's real sources and bundle
    sys.path.insert(0, str(ROOT))

from linewatch import bundle  # noqa: E402
from linewatch.calibrate.store import history_dir, read_calibration_file, write_calibration  # noqa: E402
from linewatch.errors import LinewatchError  # noqa: E402
from linewatch.protocol.wire import ProtocolError, decode_message  # noqa: E402
from tests.bundles import make_deviation_bundle  # noqa: E402
from tests.helpers import MjpegServer, free_port, grey, with_white_square, write_video  # noqa: E402

SIZE = 64  # the built-in bundle's input: CPU inference keeps up on two cores
TRIGGERED = "trig"
FLAKY = "flaky"
CAMERAS = ("vid", "dir", "web", FLAKY, TRIGGERED)
THRESHOLDS = (0.5, 0.55)  # good calibrations alternate; the deviation map is ~0 on grey, ~1 on a white square
MIN_AREA = 4


# --- the scene: sources whose verdicts are known from their pixels ---------------------------------------------


def video_frames(n: int, period: int) -> list[np.ndarray]:
    return [with_white_square() if i % period == 1 else grey() for i in range(n)]


def verdict_of(image: np.ndarray | None) -> str:
    """What the built-in bundle must say about a frame (None: unreadable, so ERROR)."""
    return "ERROR" if image is None else ("NOK" if int(image.max()) == 255 else "OK")


def write_folder(folder: Path) -> list[str]:
    """The folder camera's images in name order and their expected verdicts; some are bad on purpose."""
    folder.mkdir(parents=True)
    square16 = with_white_square().astype(np.uint16) * 257
    garbage = np.random.default_rng(0).bytes(200)
    files: list[tuple[str, np.ndarray | bytes, str]] = [
        ("a_grey.png", grey(), "OK"),
        ("b_square.png", with_white_square(), "NOK"),
        ("c_corrupt.png", b"\x89PNG\r\n\x1a\n" + garbage, "ERROR"),  # a PNG signature, then garbage
        ("d_grey16.png", grey().astype(np.uint16) * 257, "OK"),  # 16-bit
        ("e_empty.png", b"", "ERROR"),
        ("f_square16.png", square16, "NOK"),
        ("g_greyonly.png", np.full((SIZE, SIZE), 128, np.uint8), "OK"),  # one channel
        ("h_bgra.png", cv2.cvtColor(with_white_square(), cv2.COLOR_BGR2BGRA), "NOK"),
        ("i_big.png", cv2.resize(with_white_square(), (3 * SIZE, 2 * SIZE), interpolation=cv2.INTER_NEAREST), "NOK"),
    ]
    expected = []
    for name, content, verdict in files:
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            assert cv2.imwrite(str(folder / name), content)
        expected.append(verdict)
    return expected


def mjpeg_frame(i: int) -> np.ndarray:
    return with_white_square() if i % 5 == 2 else grey()


@dataclass
class Scene:
    workdir: Path
    bundle: Path
    known_content: bool  # the built-in bundle: verdicts follow from the pixels
    expected: dict[str, list[str]]  # camera -> expected verdict of frame index i at [(i - 1) % len]
    web: MjpegServer
    flaky: MjpegServer


def build_scene(workdir: Path, bundle_dir: str | None) -> Scene:
    model = workdir / "bundle"
    if bundle_dir:
        shutil.copytree(bundle_dir, model)
    else:
        make_deviation_bundle(model, SIZE, SIZE)
    vid = video_frames(8, 4)
    trig = video_frames(6, 3)
    write_video(workdir / "vid.avi", vid)
    write_video(workdir / "trig.avi", trig)
    expected = {
        "vid": [verdict_of(f) for f in vid],
        TRIGGERED: [verdict_of(f) for f in trig],
        "dir": write_folder(workdir / "folder"),
    }
    web = MjpegServer(free_port(), mjpeg_frame, fps=25).start()
    flaky = MjpegServer(free_port(), mjpeg_frame, fps=20).start()
    return Scene(workdir, model, not bundle_dir, expected, web, flaky)


@dataclass(frozen=True)
class Endpoints:
    publish: str
    trigger: str
    metrics_port: int
    trigger_timeout_s: float = 5.0


def write_config(scene: Scene, endpoints: Endpoints) -> Path:
    w = scene.workdir
    url = {
        "kind": "url",
        "open_timeout_ms": 1500,
        "read_timeout_ms": 1500,
        "reconnect": {"initial_s": 0.2, "max_s": 1.0},
    }
    config = {
        "model": {"bundle": str(scene.bundle)},
        "cameras": [
            {"name": "vid", "kind": "video", "source": str(w / "vid.avi"), "fps": 25},
            {"name": "dir", "kind": "folder", "source": str(w / "folder"), "fps": 20},
            {"name": "web", "source": scene.web.url, "queue_size": 1, **url},
            {"name": FLAKY, "source": scene.flaky.url, **url},
            {"name": TRIGGERED, "kind": "video", "source": str(w / "trig.avi"), "fps": 50, "mode": "triggered"},
        ],
        "engine": {"providers": ["cpu"], "threads": 1, "max_batch": 8, "max_wait_ms": 5},
        "publish": {"endpoint": endpoints.publish, "hwm": 1000, "status_interval_s": 0.5},
        "trigger": {"enabled": True, "endpoint": endpoints.trigger, "timeout_s": endpoints.trigger_timeout_s},
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": endpoints.metrics_port},
        "health": {"drain_timeout_s": 10.0},
        "logging": {"level": "INFO"},
    }
    path = w / "linewatch.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --- subscribers -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """What a subscriber keeps of one result (enough to compare two subscribers and judge the verdict)."""

    seq: int
    run_id: str | None
    verdict: str
    part_id: str | None
    frame_index: int | None
    calibration_version: int | None
    pixel_threshold: float | None
    image_score: float | None
    error: str | None
    frame_time: float | None
    publish_time: float | None


@dataclass
class CameraView:
    results: list[Seen] = field(default_factory=list)
    first_status: dict[str, Any] | None = None
    last_status: dict[str, Any] | None = None
    statuses: int = 0
    unhealthy: list[str] = field(default_factory=list)


class Collector(threading.Thread):
    """A SUB to everything, parsed with the client library's decoder. `sleep_s` > 0 makes it a slow subscriber."""

    def __init__(self, endpoint: str, name: str, rcvhwm: int = 0, rcvbuf: int = -1, sleep_s: float = 0.0):
        super().__init__(name=name, daemon=True)
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)  # 0: no limit, it never drops
        self.sock.setsockopt(zmq.RCVBUF, rcvbuf)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 10)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"linewatch/")
        self.sock.connect(endpoint)
        self.sleep_s = sleep_s
        self.cameras: dict[str, CameraView] = defaultdict(CameraView)
        self.invalid: list[str] = []
        self.last_message = time.monotonic()
        self._halt = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self._halt.is_set():
            if not self.sock.poll(100):
                continue
            frames = self.sock.recv_multipart()
            self.last_message = time.monotonic()
            self._take(frames)
            if self.sleep_s:
                time.sleep(self.sleep_s)
        self.sock.close(0)

    def _take(self, frames: list[bytes]) -> None:
        try:
            msg = decode_message(frames)
        except ProtocolError as exc:
            self.invalid.append(str(exc)[:200])
            return
        h = msg.header
        with self.lock:
            view = self.cameras[msg.camera]
            if msg.kind == "status":
                view.statuses += 1
                view.first_status = view.first_status or h
                view.last_status = h
                if h.get("healthy") is not True and len(view.unhealthy) < 20:
                    view.unhealthy.append(str(h.get("unhealthy_reason") or f"healthy: {h.get('healthy')}"))
                return
            view.results.append(
                Seen(
                    h["seq"],
                    h.get("run_id"),
                    h["verdict"],
                    h.get("part_id"),
                    h.get("frame_index"),
                    h.get("calibration_version"),
                    (h.get("thresholds") or {}).get("pixel"),
                    h.get("image_score"),
                    h.get("error"),
                    h.get("frame_time"),
                    h.get("publish_time"),
                )
            )

    def status(self, camera: str) -> dict[str, Any] | None:
        with self.lock:
            return self.cameras[camera].last_status if camera in self.cameras else None

    def stop_when_quiet(self, quiet_s: float, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end and time.monotonic() - self.last_message < quiet_s:
            time.sleep(0.1)
        self._halt.set()
        self.join(5)


# --- trigger clients ---------------------------------------------------------------------------------------------


def _odd(rid: str) -> list[tuple[str, dict[str, Any] | list[bytes]]]:
    """The flood's odd requests, by name: a dict goes out as one JSON frame (its request_id must be echoed),
    a list of frames as they are (nothing in them can be echoed)."""
    return [
        ("not_json", [b"not json"]),
        ("not_an_object", [b"[1, 2, 3]"]),
        ("no_part_id", {"camera": TRIGGERED, "request_id": rid}),
        ("unknown_camera", {"camera": "nope", "part_id": f"U-{rid}", "request_id": rid}),
        ("wrong_types", {"camera": 5, "part_id": [], "request_id": rid}),
        ("over_4_kib", [json.dumps({"camera": TRIGGERED, "part_id": "x" * 5000, "request_id": rid}).encode()]),
        ("nested_too_deep", [b"[" * 3000]),
        ("not_utf8", [b"\xff\xfe\xfd"]),
        ("two_frames", [b"{}", b"{}"]),
        ("control_chars", {"camera": TRIGGERED, "part_id": f"a\x00\x1b[2J-{rid}", "request_id": rid}),
        ("unicode", {"camera": TRIGGERED, "part_id": f"\u00e9\u6f22\U0001f600-{rid}", "request_id": rid}),
    ]


ODD_KINDS = len(_odd(""))


@dataclass
class Sent:
    camera: Any
    part_id: Any
    echoed: bool  # the daemon can read its request_id: the reply must carry it
    at: float


class TriggerPeer(threading.Thread):
    """One DEALER that never reconnects, so every reply to it is seen and counted against its request."""

    def __init__(self, endpoint: str, name: str, timeout_s: float, source: str):
        super().__init__(name=name, daemon=True)
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        # from its own loopback address, as two PLCs on a line network have two addresses
        self.sock.connect(endpoint.replace("tcp://", f"tcp://{source}:0;"))
        self.timeout_s = timeout_s
        self.sent: dict[str, Sent] = {}
        self.sent_total = 0
        self.replies: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.anonymous_replies: list[dict[str, Any]] = []
        self.unreadable_replies = 0
        self.codes: Counter[str] = Counter()
        self.latencies: list[float] = []  # request -> reply, of the requests waited for
        self.sending = threading.Event()
        self.sending.set()
        self._halt = threading.Event()
        self.n = 0

    def send(self, body: list[bytes], rid: str | None, info: Sent | None) -> None:
        self.sock.send_multipart([b"", *body])
        self.sent_total += 1
        if rid is not None and info is not None:
            self.sent[rid] = info

    def request(self, camera: str, part_id: str) -> str:
        self.n += 1
        rid = f"{self.name}-{self.n}"
        body = json.dumps({"camera": camera, "part_id": part_id, "request_id": rid}).encode()
        self.send([body], rid, Sent(camera, part_id, True, time.monotonic()))
        return rid

    def receive(self, wait_ms: int) -> None:
        while self.sock.poll(wait_ms):
            wait_ms = 0
            frames = self.sock.recv_multipart()
            try:
                reply = json.loads(frames[1])
            except (IndexError, ValueError):
                self.unreadable_replies += 1
                continue
            self.codes["ok" if reply.get("ok") else str(reply.get("code"))] += 1
            rid = reply.get("request_id")
            if isinstance(rid, str) and rid in self.sent:
                self.replies[rid].append(reply)
            else:
                self.anonymous_replies.append(reply)

    def outstanding(self) -> int:
        return self.sent_total - sum(len(r) for r in self.replies.values()) - len(self.anonymous_replies)

    def run(self) -> None:
        while not self._halt.is_set():
            if self.sending.is_set():
                self.step()
            self.receive(20)
        self.sock.close(0)

    def step(self) -> None:
        raise NotImplementedError

    def finish(self, timeout_s: float) -> None:
        """Stop sending; wait for the outstanding replies (every request gets one, within the trigger timeout)."""
        self.sending.clear()
        end = time.monotonic() + timeout_s
        while self.outstanding() > 0 and time.monotonic() < end:
            time.sleep(0.05)
        time.sleep(0.3)  # a duplicate reply would arrive now
        self._halt.set()
        self.join(5)


class PoliteClient(TriggerPeer):
    """A PLC: one request at a time, alternating the triggered camera and a continuous one."""

    def __init__(self, endpoint: str, timeout_s: float, every_s: float):
        super().__init__(endpoint, "polite", timeout_s, "127.0.0.2")
        self.every_s = every_s
        self.next_at = time.monotonic()
        self.waiting: str | None = None

    def step(self) -> None:
        now = time.monotonic()
        if self.waiting is not None:
            if self.replies.get(self.waiting):
                self.latencies.append(now - self.sent[self.waiting].at)
                self.waiting = None
            elif now - self.sent[self.waiting].at < self.timeout_s + 3:
                return
            else:
                self.waiting = None  # no reply: counted by the check; a late one is still counted
        if now >= self.next_at:
            self.next_at = now + self.every_s
            camera = TRIGGERED if self.n % 2 == 0 else "web"
            self.waiting = self.request(camera, f"P-{self.n + 1:06d}")


class FloodClient(TriggerPeer):
    """One client sending bursts of requests as fast as it can, every tenth of them malformed."""

    def __init__(self, endpoint: str, timeout_s: float, every_s: float, burst: int):
        super().__init__(endpoint, "flood", timeout_s, "127.0.0.3")
        self.every_s, self.burst = every_s, burst
        self.next_at = time.monotonic() + 1.0
        self.odd: Counter[str] = Counter()

    def step(self) -> None:
        if time.monotonic() < self.next_at:
            return
        self.next_at = time.monotonic() + self.every_s
        for _ in range(self.burst):
            if self.n % 10 == 9:
                self.send_odd()
            else:
                self.request(TRIGGERED, f"F-{self.n + 1:07d}")

    def send_odd(self) -> None:
        self.n += 1
        rid = f"{self.name}-{self.n}"
        kind, body = _odd(rid)[sum(self.odd.values()) % ODD_KINDS]
        self.odd[kind] += 1
        if isinstance(body, dict):
            self.send(
                [json.dumps(body).encode()], rid, Sent(body.get("camera"), body.get("part_id"), True, time.monotonic())
            )
        else:
            self.send(body, rid, Sent(None, None, False, time.monotonic()))


# --- faults: outages, reloads -------------------------------------------------------------------------------------


class Outages(threading.Thread):
    """Stops the flaky camera's server for `outage_s` every `every_s`: the camera drops out and must come back."""

    def __init__(self, server: MjpegServer, every_s: float, outage_s: float):
        super().__init__(name="outages", daemon=True)
        self.server, self.every_s, self.outage_s = server, every_s, outage_s
        self.windows: list[tuple[float, float]] = []  # wall-clock (down, up)
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.every_s):
            down = time.time()
            self.server.stop()
            self._halt.wait(self.outage_s)
            self.server.start()
            self.windows.append((down, time.time()))

    def finish(self) -> None:
        self._halt.set()
        self.join(self.outage_s + 5)


def corrupt_calibrations(good: dict[str, Any]) -> list[tuple[str, bytes]]:
    """Bad calibration files a reload must refuse, keeping the calibration in use."""
    text = json.dumps(good)
    return [
        ("truncated", text[: len(text) // 2].encode()),
        ("nested_too_deep", b"[" * 100_000 + b"]" * 100_000),
        ("wrong_type", json.dumps(good | {"pixel_threshold": "high"}).encode()),
        ("nan_threshold", text.replace(json.dumps(good["pixel_threshold"]), "NaN", 1).encode()),
        ("other_model", json.dumps(good | {"model_sha256": "0" * 64}).encode()),
        ("empty", b""),
        ("invalid_utf8", text.replace('"created": "', '"created": "\udcc3(', 1).encode("utf-8", "surrogateescape")),
        ("not_an_object", json.dumps([good]).encode()),
    ]


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".soak-tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def scrape(port: int) -> dict[str, float]:
    """The daemon's Prometheus counters we check against: reloads by outcome."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except (OSError, http.client.HTTPException):  # metrics server down: nothing counted (the checks then fail)
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "linewatch_reloads_total":
                out[sample.labels["outcome"]] = sample.value
    return out


@dataclass
class ReloadLog:
    good: list[dict[str, Any]] = field(default_factory=list)  # version, pixel, applied_s or None
    corrupt: list[dict[str, Any]] = field(default_factory=list)  # kind, refused (metric), kept (version)
    written: list[tuple[int, float]] = field(default_factory=list)  # (version, pixel threshold) of each good one


class Reloader:
    """SIGHUP every `every_s`, alternating a good new calibration (must take effect) and a corrupt file (must be
    refused, the calibration in use kept). The effect is read from the daemon's own outputs: the status topic's
    `calibration_version` and the `linewatch_reloads_total` metric."""

    def __init__(self, scene: Scene, sub: Collector, metrics_port: int, every_s: float):
        self.scene, self.sub, self.port, self.every_s = scene, sub, metrics_port, every_s
        self.proc: subprocess.Popen[bytes] | None = None  # set once the daemon runs
        self.log = ReloadLog()
        self.next_at = time.monotonic() + every_s
        self.cycle = 0
        self.current = self.calibrate(THRESHOLDS[0])  # before start: the daemon starts calibrated

    def calibrate(self, pixel: float) -> int:
        version = int(write_calibration(self.scene.bundle, pixel, min_defect_area=MIN_AREA).version)
        self.log.written.append((version, pixel))
        return version

    def wait_for(self, cond: Callable[[], bool], timeout_s: float) -> float | None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if cond():
                return time.monotonic() - t0
            if self.proc is None or self.proc.poll() is not None:
                return None
            time.sleep(0.05)
        return None

    def hup(self) -> None:
        if self.proc is None:
            raise RuntimeError("the daemon is not running")
        self.proc.send_signal(signal.SIGHUP)

    def in_use(self) -> set[Any]:
        return {(self.sub.status(c) or {}).get("calibration_version") for c in CAMERAS}

    def step(self) -> None:
        if time.monotonic() < self.next_at:
            return
        self.cycle += 1
        if self.cycle % 2:
            self.good()
        else:
            self.corrupt()
        self.next_at = time.monotonic() + self.every_s

    def good(self) -> None:
        pixel = THRESHOLDS[(len(self.log.good) + 1) % 2]
        version = self.calibrate(pixel)
        self.hup()
        applied = self.wait_for(lambda: self.in_use() == {version}, 20.0)
        if applied is not None:
            self.current = version
        self.log.good.append({"version": version, "pixel": pixel, "applied_s": applied})

    def corrupt(self) -> None:
        path = self.scene.bundle / bundle.CALIBRATION
        kinds = corrupt_calibrations(json.loads(path.read_text()))
        kind, data = kinds[len(self.log.corrupt) % len(kinds)]
        before = scrape(self.port).get("refused", 0.0)
        atomic_write(path, data)
        self.hup()
        refused = self.wait_for(lambda: scrape(self.port).get("refused", 0.0) > before, 20.0)
        time.sleep(0.6)  # one status interval: what the status says now is after the refusal
        self.log.corrupt.append(
            {
                "kind": kind,
                "refused_s": refused,
                "kept": self.in_use() == {self.current},
                "in_use": sorted(map(str, self.in_use())),
            }
        )


# --- RSS ----------------------------------------------------------------------------------------------------------


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every_s: float):
        super().__init__(name="rss", daemon=True)
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, float]] = []  # (monotonic s, MB)
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.every_s):
            rss = rss_mb(self.pid)
            if rss is not None:
                self.samples.append((time.monotonic(), rss))

    def finish(self) -> None:
        self._halt.set()
        self.join(5)


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def slope_mb_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) points, in MB per minute."""
    t = np.array([p[0] for p in points]) / 60.0
    if len(points) < 3 or np.ptp(t) == 0:
        return 0.0
    return float(np.polyfit(t, np.array([p[1] for p in points]), 1)[0])


def rss_summary(
    samples: list[tuple[float, float]], warmup_s: float, max_slope: float, min_window_s: float
) -> dict[str, Any]:
    """Slopes after warm-up and over the last half of that window; flat means the last half's slope is at most
    `max_slope` (a leak keeps its slope to the end, allocator warm-up flattens). Judged only over a long window."""
    if len(samples) < 3:
        return {"samples": len(samples), "judged": False, "ok": True}
    t0 = samples[0][0]
    points = [(t - t0, mb) for t, mb in samples]
    steady = [p for p in points if p[0] >= warmup_s] or points
    window_s = steady[-1][0] - steady[0][0]
    last_half = [p for p in steady if p[0] >= steady[0][0] + window_s / 2]
    judged = window_s >= min_window_s
    late = slope_mb_per_min(last_half)
    return {
        "samples": len(samples),
        "start_mb": round(samples[0][1], 1),
        "after_warmup_mb": round(steady[0][1], 1),
        "end_mb": round(samples[-1][1], 1),
        "max_mb": round(max(s[1] for s in samples), 1),
        "slope_mb_per_min": round(slope_mb_per_min(steady), 3),
        "last_half_slope_mb_per_min": round(late, 3),
        "window_s": round(window_s, 1),
        "judged": judged,
        "max_slope_mb_per_min": max_slope,
        "ok": (late <= max_slope) if judged else True,
        "series": [(round(t), round(mb, 1)) for t, mb in points[:: max(1, len(points) // 200)]],
    }


# --- checks -------------------------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: Any = None


def check_identity(final: dict[str, dict[str, Any]]) -> list[Check]:
    checks = []
    for cam, st in final.items():
        parts = {k: st[k] for k in ("results", "publish_dropped", "dropped", "skipped")}
        checks.append(
            Check(f"identity:{cam}", st["captured"] == sum(parts.values()), {"captured": st["captured"], **parts})
        )
        checks.append(
            Check(f"nothing_lost:{cam}", st["publish_dropped"] == 0, {"publish_dropped": st["publish_dropped"]})
        )
        verdicts = st["verdicts"]
        checks.append(Check(f"verdict_counts:{cam}", sum(verdicts.values()) == st["results"], verdicts))
    return checks


def check_keeping_up(sub: Collector, final: dict[str, dict[str, Any]]) -> list[Check]:
    """Every seq after the first status it saw (a result sent before the subscription reached the daemon is the
    slow joiner, not a loss; in practice the first status says 0 results) up to the final count, exactly once."""
    checks = [Check("keeping_up:all_messages_valid", not sub.invalid, sub.invalid[:5])]
    run_ids = {r.run_id for v in sub.cameras.values() for r in v.results}
    checks.append(Check("keeping_up:one_run_id", len(run_ids) == 1, sorted(map(str, run_ids))))
    for cam, st in final.items():
        view = sub.cameras[cam]
        before = int((view.first_status or {}).get("results", 0))
        seqs = [r.seq for r in view.results]
        want = list(range(min(seqs[:1] + [before + 1]), st["results"] + 1))
        counts = Counter(r.verdict for r in view.results)
        detail = {"received": len(seqs), "first_seq": seqs[0] if seqs else None, "final_results": st["results"]}
        ok = seqs == want and (before > 0 or dict(counts) == {k: v for k, v in st["verdicts"].items() if v})
        checks.append(Check(f"keeping_up:every_result:{cam}", ok, detail))
    return checks


def seq_gaps(seqs: list[int], final: int) -> tuple[int, bool]:
    """Results missed according to the seq numbers alone (gaps + what never came after the last one)."""
    gaps = sum(b - a - 1 for a, b in zip(seqs, seqs[1:]))
    increasing = all(b > a for a, b in zip(seqs, seqs[1:]))
    return gaps + (final - seqs[-1] if seqs else 0), increasing


def check_slow(slow: Collector, sub: Collector, final: dict[str, dict[str, Any]]) -> tuple[list[Check], dict[str, Any]]:
    checks, figures, total_lost = [], {}, 0
    for cam, st in final.items():
        got = slow.cameras[cam].results
        seqs = [r.seq for r in got]
        lost = (st["results"] - seqs[0] + 1 - len(seqs)) if seqs else 0
        gaps, increasing = seq_gaps(seqs, st["results"])
        total_lost += lost
        figures[cam] = {"received": len(seqs), "lost": lost, "seq_gaps": gaps}
        checks.append(Check(f"slow:losses_are_seq_gaps:{cam}", increasing and lost == gaps, figures[cam]))
        by_seq = {r.seq: r for r in sub.cameras[cam].results}
        differ = [r.seq for r in got if by_seq.get(r.seq) != r]
        checks.append(Check(f"slow:same_results_as_keeping_up:{cam}", not differ, differ[:5]))
    checks.append(Check("slow:was_congested", total_lost > 0, {"lost": total_lost}))
    checks.append(Check("slow:all_messages_valid", not slow.invalid, slow.invalid[:5]))
    return checks, figures


def check_triggers(peers: list[TriggerPeer], sub: Collector) -> list[Check]:
    published = {(cam, r.seq): r for cam, v in sub.cameras.items() for r in v.results}
    checks = []
    for peer in peers:
        checks += [check_one_reply_each(peer), check_ok_replies_published(peer, published)]
    return checks + [check_fairness(peers[0]), check_only_requested(peers, sub)]


def check_one_reply_each(peer: TriggerPeer) -> Check:
    """Every request got exactly one reply: none twice, none missing, as many replies as requests in all."""
    twice = [rid for rid, r in peer.replies.items() if len(r) > 1]
    unanswered = [rid for rid, s in peer.sent.items() if s.echoed and not peer.replies.get(rid)]
    total = sum(len(r) for r in peer.replies.values()) + len(peer.anonymous_replies) + peer.unreadable_replies
    detail = {"sent": peer.sent_total, "replies": total, "twice": twice[:5], "unanswered": unanswered[:5]}
    return Check(
        f"trigger:one_reply_each:{peer.name}", not twice and not unanswered and total == peer.sent_total, detail
    )


def check_ok_replies_published(peer: TriggerPeer, published: dict[tuple[Any, Any], Seen]) -> Check:
    """An ok reply's result is the one published under its seq, for the part asked for."""
    wrong = []
    for rid, replies in peer.replies.items():
        for res in (r.get("result") or {} for r in replies if r.get("ok")):
            seen = published.get((res.get("camera"), res.get("seq")))
            if seen is None or seen.part_id != peer.sent[rid].part_id or seen.verdict != res.get("verdict"):
                wrong.append(rid)
    return Check(f"trigger:ok_results_published:{peer.name}", not wrong, wrong[:5])


def check_only_requested(peers: list[TriggerPeer], sub: Collector) -> Check:
    """The triggered camera published frames asked for only, each part at most once."""
    sent = [s for p in peers for s in p.sent.values()]
    asked = {s.part_id for s in sent if s.camera == TRIGGERED and isinstance(s.part_id, str)}
    parts = [r.part_id for r in sub.cameras[TRIGGERED].results]
    unasked = [p for p in parts if p not in asked]
    repeated = [p for p, n in Counter(parts).items() if n > 1]
    detail = {"unasked": unasked[:5], "repeated": repeated[:5]}
    return Check("trigger:triggered_camera_only_inspects_requests", not unasked and not repeated, detail)


def check_fairness(polite: TriggerPeer) -> Check:
    """The flood (another client, another address) must not cost the polite client: never `busy` or `timeout`,
    and every answer within half the trigger timeout, i.e. it does not wait behind the flood's backlog."""
    slow = [round(t, 2) for t in polite.latencies if t > polite.timeout_s / 2]
    starved = {k: v for k, v in polite.codes.items() if k in ("busy", "timeout")}
    detail = {"codes": dict(polite.codes), "slower_than_half_the_timeout_s": slow[:10]}
    return Check("trigger:flood_never_starves_the_polite_client", not starved and not slow, detail)


def check_verdicts(
    sub: Collector, scene: Scene, final: dict[str, dict[str, Any]], written: list[tuple[int, float]]
) -> list[Check]:
    """No OK/NOK without a finite score, no error and a calibration written as good (its thresholds in the header);
    frames whose content is known got the verdict their pixels call for."""
    bad: list[tuple[Any, ...]] = []
    wrong: list[tuple[Any, ...]] = []
    for cam, view in sub.cameras.items():
        content = scene.expected.get(cam) if scene.known_content and final.get(cam, {}).get("reconnects") == 0 else None
        for r in view.results:
            if r.verdict != "ERROR":
                finite = r.image_score is not None and math.isfinite(r.image_score)
                known = (r.calibration_version, r.pixel_threshold) in written
                if not (finite and known and r.error is None):
                    bad.append(
                        (cam, r.seq, r.verdict, r.calibration_version, r.pixel_threshold, r.image_score, r.error)
                    )
            elif not r.error:
                bad.append((cam, r.seq, "ERROR without a reason"))
            if content is not None and r.frame_index is not None:
                want = content[(r.frame_index - 1) % len(content)]
                if r.verdict != want:
                    wrong.append((cam, r.seq, r.frame_index, r.verdict, want))
    return [
        Check("verdicts:no_ok_without_judgement", not bad, bad[:5]),
        Check("verdicts:follow_the_pixels", not wrong, {"wrong": wrong[:5], "checked": scene.known_content}),
    ]


def check_reloads(log: ReloadLog, metrics: dict[str, float], bundle_dir: Path) -> list[Check]:
    """Good reloads applied, corrupt ones refused with the old calibration kept; and the store's own promises under
    corrupt files: a version number names one calibration (never reused), the history stays loadable."""
    not_applied = [g for g in log.good if g["applied_s"] is None]
    not_refused = [c for c in log.corrupt if c["refused_s"] is None or not c["kept"]]
    versions = [v for v, _ in log.written]
    reused = sorted({v for v in versions if versions.count(v) > 1})
    broken = []
    for path in sorted(history_dir(bundle_dir).glob("calibration_v*.json")):
        try:
            read_calibration_file(path, None)
        except LinewatchError as exc:
            broken.append(f"{path.name}: {str(exc)[-120:]}")
    return [
        Check("calibration:versions_never_reused", not reused, {"reused": reused, "written": log.written[:20]}),
        Check("calibration:history_loadable", not broken, broken[:5]),
        Check("reload:good_ones_applied", bool(log.good) and not not_applied, not_applied[:5]),
        Check("reload:corrupt_ones_refused_old_kept", bool(log.corrupt) and not not_refused, not_refused[:5]),
        Check(
            "reload:metric_counts",
            metrics.get("ok") == len(log.good) and metrics.get("refused") == len(log.corrupt),
            {"metric": metrics, "good": len(log.good), "corrupt": len(log.corrupt)},
        ),
    ]


def check_outages(outages: Outages, sub: Collector, final: dict[str, dict[str, Any]]) -> list[Check]:
    """The flaky camera noticed every dropout (a reconnect each) and delivered frames after the last one."""
    st = final.get(FLAKY, {})
    last_up = outages.windows[-1][1] if outages.windows else math.inf
    after = sum(1 for r in sub.cameras[FLAKY].results if (r.frame_time or 0.0) > last_up)
    detail = {"outages": len(outages.windows), "reconnects": st.get("reconnects"), "results_after_last": after}
    return [
        Check("outage:every_dropout_noticed", st.get("reconnects", 0) >= len(outages.windows) > 0, detail),
        Check("outage:camera_came_back", after > 0, detail),
    ]


def check_health(sub: Collector) -> list[Check]:
    unhealthy = {cam: v.unhealthy for cam, v in sub.cameras.items() if v.unhealthy}
    return [Check("health:every_status_healthy", not unhealthy, unhealthy)]


# --- the run ------------------------------------------------------------------------------------------------------


def start_daemon(config: Path, workdir: Path) -> subprocess.Popen[bytes]:
    log = open(workdir / "daemon.log", "wb")
    return subprocess.Popen(  # the installed linewatch, as a line PC runs it
        [sys.executable, "-m", "linewatch.cli", "run", "--config", str(config)],
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def wait_ready(proc: subprocess.Popen[bytes], sub: Collector, timeout_s: float) -> None:
    """Every camera has a status, every continuous one a result: the load can start."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode} during start-up")
        with sub.lock:
            ready = all(sub.cameras[c].last_status for c in CAMERAS) and all(
                sub.cameras[c].results for c in CAMERAS if c != TRIGGERED
            )
        if ready:
            return
        time.sleep(0.1)
    raise RuntimeError(f"daemon not delivering from every camera within {timeout_s:g} s")


def came_back(sub: Collector, outages: Outages, timeout_s: float) -> None:
    """After the last outage, wait for the flaky camera's next result (so the check judges the camera, not us)."""
    if not outages.windows:
        return
    up = outages.windows[-1][1]
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        with sub.lock:
            results = sub.cameras[FLAKY].results
            if results and (results[-1].frame_time or 0.0) > up:
                return
        time.sleep(0.1)


def wait_final(sub: Collector, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if all((sub.status(c) or {}).get("stopping") for c in CAMERAS):
            return
        time.sleep(0.1)


@dataclass
class Load:
    polite: PoliteClient
    flood: FloodClient
    outages: Outages
    rss: RssSampler
    reloader: Reloader

    def start(self) -> None:
        for thread in (self.polite, self.flood, self.outages, self.rss):
            thread.start()

    def finish(self, trigger_timeout_s: float) -> None:
        self.outages.finish()
        for peer in (self.polite, self.flood):
            peer.finish(trigger_timeout_s + 5)
        self.rss.finish()


def hold(proc: subprocess.Popen[bytes], reloader: Reloader, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and proc.poll() is None:
        reloader.step()
        time.sleep(0.1)


def run_soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    scene = build_scene(workdir, args.bundle)
    ports = Endpoints(
        publish=f"ipc://{workdir / 'results.ipc'}" if args.ipc else f"tcp://127.0.0.1:{free_port()}",
        trigger=f"tcp://127.0.0.1:{free_port()}",
        metrics_port=free_port(),
    )
    trigger_timeout = ports.trigger_timeout_s
    config = write_config(scene, ports)
    sub = Collector(ports.publish, "keeping-up")
    slow = Collector(ports.publish, "slow", rcvhwm=10, rcvbuf=4096, sleep_s=args.slow_ms / 1000)
    sub.start()
    slow.start()
    reloader = Reloader(scene, sub, ports.metrics_port, args.hup_every)
    phases: dict[str, float] = {}
    t0 = time.monotonic()
    proc = start_daemon(config, workdir)
    reloader.proc = proc
    try:
        wait_ready(proc, sub, 90)
        phases["start_s"] = time.monotonic() - t0
        load = Load(
            PoliteClient(ports.trigger, trigger_timeout, args.polite_every),
            FloodClient(ports.trigger, trigger_timeout, args.flood_every, args.flood_burst),
            Outages(scene.flaky, args.outage_every, args.outage_s),
            RssSampler(proc.pid, args.rss_every),
            reloader,
        )
        load.start()
        hold(proc, reloader, args.minutes * 60)
        phases["load_s"] = time.monotonic() - t0 - phases["start_s"]
        load.finish(trigger_timeout)
        came_back(sub, load.outages, 20)
        metrics = scrape(ports.metrics_port) if proc.poll() is None else {}
        phases["wind_down_s"] = time.monotonic() - t0 - sum(phases.values())
        exit_code = stop_daemon(proc)
        wait_final(sub, 10)
        sub.stop_when_quiet(1.0, 15)
        slow.sleep_s = 0.0  # the daemon is gone: what is still buffered for it is not lost, read it at once
        slow.stop_when_quiet(1.0, 30)
        phases["stop_s"] = time.monotonic() - t0 - sum(phases.values())
    finally:
        if proc.poll() is None:
            proc.kill()
        scene.web.stop()
        scene.flaky.stop()
    summary = summarise(args, scene, sub, slow, load, metrics, exit_code)
    summary["phases_s"] = {k: round(v, 1) for k, v in phases.items()}
    return summary


def stop_daemon(proc: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM, then the daemon's exit code; None if it did not exit within a minute."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        return None


def summarise(
    args: argparse.Namespace,
    scene: Scene,
    sub: Collector,
    slow: Collector,
    load: Load,
    metrics: dict[str, float],
    exit_code: int | None,
) -> dict[str, Any]:
    final = {c: sub.cameras[c].last_status or {} for c in CAMERAS}
    complete = all(st.get("stopping") for st in final.values())
    checks = [
        Check("daemon:exit_0", exit_code == 0, exit_code),
        Check("daemon:final_status_of_every_camera", complete, {c: bool(s.get("stopping")) for c, s in final.items()}),
    ]
    slow_figures: dict[str, Any] = {}
    if complete:  # without the final counts there is nothing to account against
        checks += check_identity(final) + check_keeping_up(sub, final)
        slow_checks, slow_figures = check_slow(slow, sub, final)
        checks += slow_checks + check_verdicts(sub, scene, final, load.reloader.log.written)
        checks += check_outages(load.outages, sub, final)
    checks += check_triggers([load.polite, load.flood], sub) + check_reloads(load.reloader.log, metrics, scene.bundle)
    checks += check_health(sub)
    rss = rss_summary(load.rss.samples, args.rss_warmup_s, args.max_rss_slope, args.rss_min_window_s)
    checks.append(Check("rss:flat", rss["ok"], {k: v for k, v in rss.items() if k != "series"}))
    return {
        "ok": all(c.ok for c in checks),
        "command": " ".join(["python", "benchmarks/soak.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "cameras": camera_figures(final, sub, slow_figures),
        "triggers": {p.name: trigger_figures(p) for p in (load.polite, load.flood)},
        "reloads": reload_figures(load.reloader.log, metrics),
        "outages": {"count": len(load.outages.windows), "seconds_each": args.outage_s},
        "folder_inputs": sorted(p.name for p in (scene.workdir / "folder").iterdir()),
        "rss": rss,
        "checks": [vars(c) for c in checks],
        "failed": [c.name for c in checks if not c.ok],
        "workdir": str(scene.workdir),
    }


def camera_figures(final: dict[str, dict[str, Any]], sub: Collector, slow: dict[str, Any]) -> dict[str, Any]:
    keys = ("captured", "results", "dropped", "skipped", "publish_dropped", "frame_errors", "reconnects", "verdicts")
    return {
        c: {k: st.get(k) for k in keys}
        | {"latency_ms": latency_ms(sub.cameras[c].results), "slow_subscriber": slow.get(c)}
        for c, st in final.items()
    }


def trigger_figures(peer: TriggerPeer) -> dict[str, Any]:
    lat = peer.latencies
    figures = {"sent": peer.sent_total, "codes": dict(peer.codes), "odd_sent": dict(getattr(peer, "odd", {}))}
    if lat:
        figures["reply_s"] = {"p50": round(float(np.median(lat)), 3), "max": round(max(lat), 3)}
    return figures


def reload_figures(log: ReloadLog, metrics: dict[str, float]) -> dict[str, Any]:
    applied = [g["applied_s"] for g in log.good if g["applied_s"] is not None]
    return {
        "good": len(log.good),
        "good_not_applied": len(log.good) - len(applied),
        "corrupt": len(log.corrupt),
        "corrupt_kinds": dict(Counter(c["kind"] for c in log.corrupt)),
        "max_apply_s": round(max(applied), 2) if applied else None,
        "metric": metrics,
    }


def latency_ms(results: list[Seen]) -> dict[str, float | None]:
    """Capture to hand-over, from every header received (the status's figure covers only the last 2000)."""
    lat = [r.publish_time - r.frame_time for r in results if r.publish_time and r.frame_time]
    if not lat:
        return {"p50": None, "p99": None, "max": None}
    p50, p99 = np.percentile(lat, [50, 99]) * 1000
    return {"p50": round(float(p50), 1), "p99": round(float(p99), 1), "max": round(max(lat) * 1000, 1)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="how long the load is held (default 30)")
    p.add_argument("--json", help="write the summary here too")
    p.add_argument("--workdir", help="keep sources, config, bundle and daemon.log here (default: a temp dir)")
    p.add_argument("--bundle", help="an exported bundle instead of the built-in one (verdicts then not checked)")
    p.add_argument("--hup-every", type=float, default=10.0, help="seconds between SIGHUPs (good/corrupt alternate)")
    p.add_argument("--outage-every", type=float, default=60.0, help="seconds between the flaky camera's outages")
    p.add_argument("--outage-s", type=float, default=5.0, help="length of an outage")
    p.add_argument("--flood-every", type=float, default=10.0, help="seconds between trigger floods")
    p.add_argument("--flood-burst", type=int, default=2000, help="requests per flood (every tenth malformed)")
    p.add_argument("--polite-every", type=float, default=0.5, help="seconds between the polite client's requests")
    p.add_argument("--slow-ms", type=float, default=50.0, help="the slow subscriber's sleep per message")
    p.add_argument(
        "--ipc",
        action="store_true",
        help="results over ipc:// instead of TCP on 127.0.0.1: kernel buffers of ~200 KB instead of ~4 MB, so the slow "
        "subscriber is congested within seconds (the short CI run)",
    )
    p.add_argument("--rss-every", type=float, default=2.0, help="seconds between RSS samples")
    p.add_argument("--rss-warmup-s", type=float, default=60.0, help="RSS samples ignored at the start")
    p.add_argument("--rss-min-window-s", type=float, default=180.0, help="shorter steady windows: slope not judged")
    p.add_argument("--max-rss-slope", type=float, default=0.5, help="MB/min above which RSS is not flat")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keep = args.workdir is not None
    workdir = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="linewatch_soak_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        summary = run_soak(args, workdir)
    except RuntimeError as exc:  # the daemon did not start, or died before the load began
        print(f"soak aborted: {exc}", file=sys.stderr)
        print((workdir / "daemon.log").read_text(errors="replace")[-4000:], file=sys.stderr)
        return 1
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    for check in summary["checks"]:
        if not check["ok"]:
            print(f"FAILED {check['name']}: {json.dumps(check['detail'], default=str)[:500]}", file=sys.stderr)
    if not summary["ok"]:
        print((workdir / "daemon.log").read_text(errors="replace")[-4000:], file=sys.stderr)
    elif not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
