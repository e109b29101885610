"""The MQTT bridge (issue 17): the daemon as a subprocess on a looped video, the bridge as a subprocess, a real
broker (Debian's mosquitto, started and stopped by the test on a free port) and a real paho-mqtt subscriber."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
import pytest

from linewatch.cli import main
from linewatch.protocol.client import Subscriber
from tests.helpers import free_port, write_video
from tests.test_daemon import (
    daemon_log,
    expected_verdict,
    start_daemon,
    stop,
    video_frames,
    write_config,
)

ROOT = Path(__file__).resolve().parents[1]
MOSQUITTO = "/usr/sbin/mosquitto"
STATUS_INTERVAL = 0.2  # write_config's publish.status_interval_s


# --- real parts ---------------------------------------------------------------------------------------------------


class Broker:
    """mosquitto on 127.0.0.1:`port`, persistence off; stop() and start() again on the same port is an outage."""

    def __init__(self, folder: Path, port: int | None = None, extra: str = ""):
        self.port = port or free_port()
        self.folder = folder
        self.conf = folder / f"mosquitto-{self.port}.conf"
        lines = [f"listener {self.port} 127.0.0.1", "persistence false", extra or "allow_anonymous true"]
        if os.geteuid() == 0:
            lines.append("user root")  # as root mosquitto would switch to `mosquitto`, who cannot read tmp_path
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Broker":
        log = open(self.folder / f"mosquitto-{self.port}.log", "ab")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError("mosquitto did not open its port:\n" + self.log())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def log(self) -> str:
        return (self.folder / f"mosquitto-{self.port}.log").read_text(errors="replace")


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    at: float  # monotonic

    def json(self) -> dict[str, Any]:
        return json.loads(self.payload)


class Listener:
    """A paho-mqtt subscriber (not our code) that keeps every message; resubscribes after the broker restarts."""

    def __init__(self, port: int, topic: str = "#", tls_ca: Path | None = None, auth: tuple[str, str] | None = None):
        self.messages: list[Received] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex[:8]}")
        if tls_ca is not None:
            self.client.tls_set(ca_certs=str(tls_ca))
        if auth is not None:
            self.client.username_pw_set(*auth)
        self.subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, codes, p: self.subscribed.set()
        self.client.on_message = lambda c, u, m: self.messages.append(
            Received(m.topic, bytes(m.payload), bool(m.retain), time.monotonic())
        )
        self.client.reconnect_delay_set(1, 1)
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()

    def on(self, topic: str, since: int = 0) -> list[Received]:
        return [m for m in list(self.messages)[since:] if m.topic == topic]

    def wait_for(
        self, topic: str, pred: Callable[[Received], bool] = lambda m: True, timeout: float = 10.0, since: int = 0
    ) -> Received:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.on(topic, since):
                if pred(m):
                    return m
            time.sleep(0.02)
        seen = [(m.topic, m.payload[:200]) for m in self.messages[-5:]]
        raise AssertionError(f"nothing on {topic} matching within {timeout} s; last messages: {seen}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class ZmqRecorder:
    """The daemon's results as a plain protocol subscriber sees them, by seq: what the bridge must republish."""

    def __init__(self, endpoint: str):
        self.headers: dict[int, dict] = {}
        self.masks: dict[int, bytes | None] = {}
        self._stop = threading.Event()
        self._sub = Subscriber(endpoint, "cam1")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self._sub.recv(0.05)
            if msg is not None and msg.kind == "result":
                self.headers[msg.seq] = msg.header
                self.masks[msg.seq] = msg.mask

    def header(self, seq: int, timeout: float = 2.0) -> dict:
        """The header of `seq` (the recorder's thread may be a moment behind the MQTT path)."""
        deadline = time.monotonic() + timeout
        while seq not in self.headers and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.headers[seq]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sub.close()


def start_bridge(tmp_path: Path, endpoint: str, broker: str, client_id: str, *extra: str) -> subprocess.Popen:
    log = open(tmp_path / f"{client_id}.log", "wb")
    cmd = [sys.executable, "-m", "linewatch.cli", "bridge", "mqtt", "--connect", endpoint, "--broker", broker]
    cmd += ["--client-id", client_id, "--status-interval", str(STATUS_INTERVAL), "--state-interval", "0.5", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def start_docs_example(tmp_path: Path, port: int) -> subprocess.Popen:
    """The paho subscriber printed in docs/MQTT.md, run as written (only the broker's port changed)."""
    text = (ROOT / "docs" / "MQTT.md").read_text()
    match = re.search(r"<!-- example: mqtt subscriber -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/MQTT.md lost its subscriber example"
    code = match.group(1).replace('client.connect("127.0.0.1", 1883)', f'client.connect("127.0.0.1", {port})')
    assert str(port) in code
    out = open(tmp_path / "example.out", "wb")
    return subprocess.Popen([sys.executable, "-u", "-c", code], stdout=out, stderr=subprocess.STDOUT)


def bridge_log(tmp_path: Path, client_id: str) -> str:
    return (tmp_path / f"{client_id}.log").read_text(errors="replace")


def conserved(counters: dict[str, int]) -> bool:
    """Every result the bridge received is forwarded, in flight, queued or counted as dropped."""
    parts = ("results_forwarded", "results_in_flight", "results_queued", "results_dropped")
    return counters["results_received"] == sum(counters[p] for p in parts)


def kill(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(10)


# --- the whole path -----------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_results_status_outage_daemon_offline_and_last_will(calibrated, tmp_path):
    video = write_video(tmp_path / "line.avi", video_frames(8))
    camera = {"name": "cam1", "kind": "video", "source": str(video), "loop": True, "fps": 40, "queue_size": 16}
    config, endpoint = write_config(tmp_path, calibrated, [camera])
    broker = Broker(tmp_path).start()
    url = f"mqtt://127.0.0.1:{broker.port}"
    listener = Listener(broker.port)
    recorder = ZmqRecorder(endpoint)
    daemon = start_daemon(config, tmp_path)
    main_bridge = start_bridge(tmp_path, endpoint, url, "main", "--queue-size", "10")
    mask_bridge = start_bridge(tmp_path, endpoint, url, "masks", "--topic-prefix", "lw/masks", "--with-mask")
    example = start_docs_example(tmp_path, broker.port)
    late: list[Listener] = []
    try:
        # 1. results arrive as the daemon published them (not retained), with the mask only where asked for
        listener.wait_for("linewatch/cam1/result", lambda m: m.json()["seq"] > 0, timeout=20)
        listener.wait_for("lw/masks/cam1/result", lambda m: m.json()["verdict"] == "NOK", timeout=10)
        time.sleep(1.0)
        results = [m for m in listener.on("linewatch/cam1/result")]
        assert len(results) >= 20, len(results)
        compared = 0
        for m in results:
            header = m.json()
            assert not m.retain and "mask_png_base64" not in header
            assert header["verdict"] == expected_verdict(header["frame_index"])
            if header["seq"] in recorder.headers:
                assert header == recorder.headers[header["seq"]]
                compared += 1
        assert compared >= 20 and {m.json()["verdict"] for m in results} == {"OK", "NOK"}
        masked = [m.json() for m in listener.on("lw/masks/cam1/result")]
        nok = [h for h in masked if h["verdict"] == "NOK" and h["seq"] in recorder.masks]
        assert nok, masked[:3]
        for header in nok:
            png = base64.b64decode(header.pop("mask_png_base64"))
            assert png.startswith(b"\x89PNG") and png == recorder.masks[header["seq"]]
            assert header == recorder.headers[header["seq"]]

        # docs/MQTT.md's subscriber prints the same parts
        example.terminate()
        example.wait(5)
        printed = (tmp_path / "example.out").read_text().splitlines()
        first = min(recorder.headers)  # the recorder may have joined a few results late (slow joiner)
        parts = [line.split() for line in printed if line.startswith("cam1 ") and int(line.split()[1]) >= first]
        assert len(parts) >= 10, printed[-10:]
        for camera, seq, part_id, verdict, score, error in parts:
            header = recorder.header(int(seq))
            assert (verdict, part_id, error) == (header["verdict"], "None", "None")
            assert float(score) == header["image_score"]
        assert any(line.startswith("linewatch/cam1/status online") for line in printed), printed[-10:]

        # 2. status is retained: a subscriber that connects now gets the last one at once
        late.append(Listener(broker.port, "linewatch/cam1/status"))
        status = late[-1].wait_for("linewatch/cam1/status", timeout=5)
        assert status.retain and status.json()["kind"] == "status" and status.json()["state"] == "online"
        late.append(Listener(broker.port, "linewatch/bridge/main/state"))  # live messages carry no retain flag
        online = late[-1].wait_for("linewatch/bridge/main/state", timeout=5)
        assert online.retain and online.json()["state"] == "online" and online.json()["cameras"]["cam1"]

        # a clean stop says goodbye itself (a clean disconnect fires no Last Will), every result accounted for
        mask_bridge.send_signal(signal.SIGTERM)
        assert mask_bridge.wait(15) == 0, bridge_log(tmp_path, "masks")
        bye = listener.wait_for("lw/masks/bridge/masks/state", lambda m: m.json()["state"] == "offline").json()
        assert bye["reason"] == "bridge stopped" and conserved(bye["counters"]), bye
        assert bye["counters"]["results_forwarded"] >= 20 and bye["counters"]["results_dropped"] == 0, bye

        # 3. the broker goes away and comes back on the same port: the bridge lives on, keeps reading the daemon,
        #    reconnects, and delivers the newest --queue-size results it kept; the oldest are dropped and counted
        broker.stop()
        last_seq = max(m.json()["seq"] for m in listener.on("linewatch/cam1/result"))
        time.sleep(1.3)  # the bridge retries 1 s after the loss (refused), then 2 s later: after the restart
        assert main_bridge.poll() is None, bridge_log(tmp_path, "main")
        broker.start()
        witness = Listener(broker.port)  # subscribed before the bridge is back, so it sees what was kept
        late.append(witness)
        assert witness.subscribed.wait(1.5)
        state = witness.wait_for(
            "linewatch/bridge/main/state", lambda m: m.json()["counters"]["broker_connects"] >= 2, timeout=15
        ).json()
        counters = state["counters"]
        assert conserved(counters), counters
        assert counters["broker_disconnects"] >= 1 and counters["zmq_missed"] == 0, counters
        assert counters["results_dropped"] >= 10, counters  # about 3 s x 40/s, 10 of them kept
        assert state["cameras"]["cam1"]["daemon"] == "online"
        dropped = counters["results_dropped"]
        witness.wait_for("linewatch/cam1/result", lambda m: m.json()["seq"] > last_seq + dropped + 40)
        seqs = sorted({m.json()["seq"] for m in witness.on("linewatch/cam1/result")} - set(range(last_seq + 1)))
        holes = [b - a - 1 for a, b in zip([last_seq, *seqs], seqs)]
        at = holes.index(max(holes))
        # one hole: the dropped results (plus at most a few the dying broker took but never delivered), before it
        # only the few paho re-sent after the reconnect, after it the kept ones and the live stream without a gap
        assert dropped <= holes[at] <= dropped + 3, (dropped, holes[at], seqs[:20])
        assert at <= 5 and not any(holes[at + 1 :]), (at, holes)
        assert recorder.header(seqs[-1]) == next(
            m.json() for m in witness.on("linewatch/cam1/result") if m.json()["seq"] == seqs[-1]
        )
        assert "lost the broker" in bridge_log(tmp_path, "main")
        mark = len(listener.messages)

        # 4. the daemon stops: within 3 status intervals the bridge publishes a retained offline status
        assert stop(daemon) == 0, daemon_log(tmp_path)[-3000:]
        offline = listener.wait_for(
            "linewatch/cam1/status", lambda m: m.json().get("source") == "bridge", timeout=10, since=mark
        )
        last_daemon_status = [m for m in listener.on("linewatch/cam1/status") if "source" not in m.json()][-1]
        body = offline.json()
        assert body["state"] == "offline" and body["camera"] == "cam1" and "no status from the daemon" in body["reason"]
        silent = body["publish_time"] - body["last_status_time"]
        assert 3 * STATUS_INTERVAL - 0.05 <= silent <= 3 * STATUS_INTERVAL + 0.5, body
        assert offline.at - last_daemon_status.at <= 3 * STATUS_INTERVAL + 0.5
        late.append(Listener(broker.port, "linewatch/cam1/status"))
        kept = late[-1].wait_for("linewatch/cam1/status", timeout=5)
        assert kept.retain and kept.json()["state"] == "offline" and kept.json()["source"] == "bridge"

        # 5. the bridge dies without a word: the broker publishes its Last Will, retained
        main_bridge.kill()
        main_bridge.wait(5)
        will = listener.wait_for(
            "linewatch/bridge/main/state", lambda m: m.json()["state"] == "offline", timeout=5, since=mark
        )
        assert "Last Will" in will.json()["reason"]
        late.append(Listener(broker.port, "linewatch/bridge/main/state"))
        assert late[-1].wait_for("linewatch/bridge/main/state", timeout=5).json()["state"] == "offline"
    finally:
        for proc in (main_bridge, mask_bridge, daemon, example):
            kill(proc)
        for sub in (listener, *late):
            sub.close()
        recorder.close()
        broker.stop()


# --- TLS and a password ---------------------------------------------------------------------------------------


def make_tls(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 (EC P-256, one day), made with the openssl command."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=linewatch test CA")
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "1", "-extfile", "san.ext")  # fmt: skip
    return folder / "ca.crt", folder / "server.crt", folder / "server.key"


@pytest.mark.integration
def test_tls_broker_with_a_password_file_and_a_refused_password_that_does_not_stop_the_bridge(tmp_path):
    ca, cert, key = make_tls(tmp_path)
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(tmp_path / "users"), "lw", "s3cret pass"], check=True)
    extra = f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\nallow_anonymous false\npassword_file {tmp_path / 'users'}"
    broker = Broker(tmp_path, extra=extra).start()
    good, bad = tmp_path / "good.pw", tmp_path / "bad.pw"
    for path, text in ((good, "s3cret pass\n"), (bad, "wrong\n")):
        path.write_text(text)
        path.chmod(0o600)
    nobody = f"tcp://127.0.0.1:{free_port()}"  # no daemon: the bridge's own state is what goes out
    url = f"mqtts://127.0.0.1:{broker.port}"
    auth = ["--cafile", str(ca), "--username", "lw"]
    bridges = [
        start_bridge(tmp_path, nobody, url, "tls-good", *auth, "--password-file", str(good)),
        start_bridge(tmp_path, nobody, url, "tls-bad", *auth, "--password-file", str(bad)),
    ]
    listener = Listener(broker.port, tls_ca=ca, auth=("lw", "s3cret pass"))
    try:
        state = listener.wait_for("linewatch/bridge/tls-good/state", timeout=15)
        assert state.json()["state"] == "online" and state.json()["counters"]["broker_connects"] == 1
        time.sleep(1.5)
        assert bridges[1].poll() is None, bridge_log(tmp_path, "tls-bad")  # refused, still trying, still alive
        assert "refused the connection" in bridge_log(tmp_path, "tls-bad")
        assert not listener.on("linewatch/bridge/tls-bad/state")
        assert "s3cret" not in bridge_log(tmp_path, "tls-good") + bridge_log(tmp_path, "tls-bad")
    finally:
        for proc in bridges:
            kill(proc)
        listener.close()
        broker.stop()


# --- what is refused before anything starts ---------------------------------------------------------------------


@pytest.mark.unit
def test_bad_options_are_refused_with_a_reason_and_no_password_is_echoed(tmp_path, capsys, caplog):
    open_file = tmp_path / "pw"
    open_file.write_text("hunter2\n")
    open_file.chmod(0o644)
    cases = [
        (["--broker", "mqtt://lw:hunter2@127.0.0.1:1883"], "no credentials in the URL"),
        (["--broker", "http://127.0.0.1:1883"], "expected mqtt://"),
        (["--broker", "mqtt://127.0.0.1:99999"], "port"),
        (["--username", "lw", "--password-file", str(open_file)], "chmod 600"),
        (["--password-file", str(open_file)], "needs --username"),
        (["--topic-prefix", "line/#"], "--topic-prefix"),
        (["--topic-prefix", "line//a"], "--topic-prefix"),
        (["--client-id", "a/b"], "--client-id"),
        (["--cafile", str(open_file)], "needs --tls"),
        (["--tls", "--cafile", str(tmp_path / "missing.crt")], "not found"),
        (["--queue-size", "0"], "--queue-size"),
        (["--server-key", "x" * 40], "both --server-key and --client-key-file"),
    ]
    for args, reason in cases:
        caplog.clear()
        assert main(["bridge", "mqtt", *args]) == 2, args
        err = capsys.readouterr().err + caplog.text  # the CLI logs the error (pytest holds the log handler)
        assert reason in err and "hunter2" not in err, (args, err)
    with pytest.raises(SystemExit) as exit_info:
        main(["bridge", "mqtt", "--password", "hunter2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--password-file" in err and "hunter2" not in err


@pytest.mark.integration
def test_the_systemd_unit_example_is_hardened_and_takes_no_password_on_its_command_line(tmp_path):
    source = (ROOT / "systemd" / "linewatch-mqtt@.service").read_text()
    exec_start = [line for line in source.splitlines() if line.startswith("ExecStart=")]
    assert exec_start == ["ExecStart=/opt/linewatch/venv/bin/linewatch bridge mqtt $MQTT_ARGS"]
    assert "--password " not in source and "--password-file" in source
    unit = tmp_path / "linewatch-mqtt@line1.service"  # an instance name, as systemd would load it
    unit.write_text(source)
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is part of the CI image (systemd package)"
    out = subprocess.run([analyze, "security", "--offline=true", str(unit)], capture_output=True, text=True)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
    assert match and float(match.group(1)) <= 2.0, out.stdout[-3000:] + out.stderr[-2000:]
