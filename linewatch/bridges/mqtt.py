"""`linewatch bridge mqtt`: the daemon's results and status, republished on an MQTT broker for plant dashboards and
historians (docs/MQTT.md).

One process, two threads: the main thread reads ZeroMQ (`linewatch.protocol.client.Subscriber`, which counts seq
gaps) and never waits for the broker; paho-mqtt's network thread talks to the broker, reconnecting with backoff.
While the broker is unreachable results wait in a bounded queue (the oldest dropped beyond it, counted) and only
each camera's latest status is kept, since a retained status is a state, not an event.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import logging
import os
import re
import signal
import socket
import ssl
import stat
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from linewatch.errors import ConfigError
from linewatch.protocol.client import Subscriber
from linewatch.protocol.curve import client_keys_from_args
from linewatch.protocol.wire import RESULT, Message, encode_json

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

log = logging.getLogger("linewatch.bridges.mqtt")

STATUS_QOS = 1
MISSED_STATUSES = 3  # PROTOCOL.md's liveness rule: no status for 3 intervals means the daemon is gone
TICK_S = 0.02  # longest the main loop waits for ZeroMQ before looking at the broker and the clocks
QUIET_AFTER_S = 5.0
_CLIENT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_PREFIX_LEVEL = re.compile(r"[A-Za-z0-9_.:-]+")


def _paho() -> Any:
    try:
        import paho.mqtt.client as client
    except ImportError:
        raise ConfigError("the MQTT bridge needs paho-mqtt: pip install 'linewatch[mqtt]'") from None
    return client


# --- settings ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    connect: str
    camera: str | None
    host: str
    port: int
    tls: bool
    cafile: str | None
    certfile: str | None
    keyfile: str | None
    username: str | None
    password: str | None
    client_id: str
    prefix: str
    qos_result: int
    with_mask: bool
    queue_size: int
    status_interval: float
    state_interval: float
    keepalive: int
    reconnect_max: float
    server_key: bytes | None = None
    client_keys: tuple[bytes, bytes] | None = None

    @property
    def state_topic(self) -> str:
        return f"{self.prefix}/bridge/{self.client_id}/state"

    def topic(self, camera: str, kind: str) -> str:
        return f"{self.prefix}/{camera}/{kind}"


def parse_broker(url: str) -> tuple[str, int, bool]:
    """`mqtt://HOST[:PORT]` or `mqtts://HOST[:PORT]` -> (host, port, tls). Credentials in the URL are refused: they
    would show in `ps` and in the unit file."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ConfigError(f"--broker {url!r}: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    if "@" in parts.netloc:
        raise ConfigError("--broker: no credentials in the URL (they show in `ps`); use --username and --password-file")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"--broker {url!r}: only scheme, host and port are used")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"--broker {url!r}: the port is not a number from 1 to 65535") from None
    if not parts.hostname:
        raise ConfigError(f"--broker {url!r}: no host")
    tls = parts.scheme == "mqtts"
    return parts.hostname, port or (8883 if tls else 1883), tls


def read_password(path: str) -> str:
    """The first line of a file only its owner can read; ConfigError naming the file otherwise."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--password-file {file}: not found")
    mode = stat.S_IMODE(file.stat().st_mode)
    if os.name == "posix" and mode & 0o077:
        raise ConfigError(
            f"--password-file {file}: readable by group or others (mode {mode:04o}); make it private: chmod 600 {file}"
        )
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--password-file {file}: cannot read it: {exc}") from None
    if not lines or not lines[0]:
        raise ConfigError(f"--password-file {file}: empty; the password is its first line")
    return lines[0]


def _readable(option: str, path: str | None) -> str | None:
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"{option} {path}: not found")
    return path


def _check_prefix(prefix: str) -> str:
    levels = prefix.split("/")
    if not all(_PREFIX_LEVEL.fullmatch(level) for level in levels):
        raise ConfigError(
            f"--topic-prefix {prefix!r}: topic levels of letters, digits, '_', '.', ':' and '-' separated by '/' "
            "(no wildcards '+' '#', no empty level, no leading '$')"
        )
    return prefix


def settings_from_args(args: argparse.Namespace) -> Settings:
    host, port, tls = parse_broker(args.broker)
    tls = tls or args.tls
    for option in ("cafile", "certfile", "keyfile"):
        if getattr(args, option) and not tls:
            raise ConfigError(f"--{option} needs --tls (or an mqtts:// broker)")
    if args.keyfile and not args.certfile:
        raise ConfigError("--keyfile needs --certfile")
    if args.password_file and not args.username:
        raise ConfigError("--password-file needs --username")
    client_id = args.client_id or "linewatch-mqtt-" + re.sub(r"[^A-Za-z0-9_.:-]", "-", socket.gethostname())[:64]
    if not _CLIENT_ID.fullmatch(client_id):
        raise ConfigError(f"--client-id {client_id!r}: 1 to 128 letters, digits, '_', '.', ':' or '-'")
    for name, value, low in (
        ("--status-interval", args.status_interval, 0.01),
        ("--state-interval", args.state_interval, 0.1),
        ("--reconnect-max", args.reconnect_max, 1.0),
    ):
        if not value >= low:
            raise ConfigError(f"{name} must be at least {low:g} s, got {value}")
    if args.queue_size < 1:
        raise ConfigError(f"--queue-size must be at least 1, got {args.queue_size}")
    if args.keepalive < 5:
        raise ConfigError(f"--keepalive must be at least 5 s, got {args.keepalive}")
    server_key, client_keys = client_keys_from_args(args)
    return Settings(
        connect=args.connect,
        camera=args.camera,
        host=host,
        port=port,
        tls=tls,
        cafile=_readable("--cafile", args.cafile),
        certfile=_readable("--certfile", args.certfile),
        keyfile=_readable("--keyfile", args.keyfile),
        username=args.username,
        password=read_password(args.password_file) if args.password_file else None,
        client_id=client_id,
        prefix=_check_prefix(args.topic_prefix),
        qos_result=args.qos_result,
        with_mask=args.with_mask,
        queue_size=args.queue_size,
        status_interval=args.status_interval,
        state_interval=args.state_interval,
        keepalive=args.keepalive,
        reconnect_max=args.reconnect_max,
        server_key=server_key,
        client_keys=client_keys,
    )


# --- what the bridge knows --------------------------------------------------------------------------------------


@dataclass
class Counters:
    """Published in the state topic. At any moment results_received = results_forwarded + results_in_flight +
    results_queued + results_dropped."""

    results_received: int = 0
    results_forwarded: int = 0  # acknowledged by the broker (QoS 1/2) or written to its socket (QoS 0)
    results_in_flight: int = 0  # handed to the MQTT client, not yet acknowledged
    results_queued: int = 0  # waiting for the broker to come back
    results_dropped: int = 0  # the oldest, beyond --queue-size while the broker was away
    statuses_received: int = 0
    statuses_published: int = 0
    daemon_offline_published: int = 0
    zmq_missed: int = 0  # results the daemon sent that never reached the bridge (seq gaps)
    zmq_invalid: int = 0  # malformed ZeroMQ messages, skipped
    broker_connects: int = 0
    broker_disconnects: int = 0


@dataclass
class CameraLiveness:
    """When the daemon last spoke for a camera, and at what interval (measured from the statuses' publish_time,
    which a burst after a ZeroMQ reconnect cannot shrink)."""

    run_id: str | None = None
    last_heard: float = 0.0  # monotonic
    publish_times: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=11))
    offline: bool = False

    def heard(self, status: dict[str, Any]) -> None:
        if status.get("run_id") != self.run_id:
            self.run_id = status.get("run_id")
            self.publish_times.clear()
        stamp = status.get("publish_time")
        if isinstance(stamp, (int, float)) and not isinstance(stamp, bool):
            self.publish_times.append(float(stamp))
        self.last_heard = time.monotonic()
        self.offline = False

    def interval(self, default: float) -> float:
        times = list(self.publish_times)
        gaps = [b - a for a, b in zip(times, times[1:]) if b > a]
        return min(max(statistics.median(gaps), 0.01), 3600.0) if len(gaps) >= 2 else default


class MqttBridge:
    """ZeroMQ in, MQTT out. `run()` blocks until `stop()`; see the module docstring for the threads."""

    def __init__(self, settings: Settings):
        self.s = settings
        self.counters = Counters()
        self.cameras: dict[str, CameraLiveness] = {}
        self._stop = threading.Event()
        self._queue: collections.deque[tuple[str, bytes]] = collections.deque()
        self._pending_status: dict[str, bytes] = {}  # camera -> latest status payload while the broker is away
        self._in_flight: list[Any] = []  # MQTTMessageInfo of results handed to paho
        self._connect_gen = 0  # bumped by paho's thread on every accepted connection
        self._flushed_gen = 0  # the connection the main thread has caught up with
        self._connected = False  # paho's thread: a connection was accepted and has not been lost since
        self._next_state = 0.0
        self._started = time.time()
        self._missed: dict[str, int] = {}  # the Subscriber's seq gaps per camera
        self.client = self._make_client()

    # --- paho -------------------------------------------------------------------------------------------------
    def _make_client(self) -> "mqtt.Client":
        paho = _paho()
        s = self.s
        client: mqtt.Client = paho.Client(
            callback_api_version=paho.CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            clean_session=True,
            protocol=paho.MQTTv311,
        )
        will = {"state": "offline", "client_id": s.client_id, "connect": s.connect, "started": self._started}
        will["reason"] = "connection to the bridge lost (Last Will, sent by the broker)"
        client.will_set(s.state_topic, encode_json(will), 1, True)
        if s.username:
            client.username_pw_set(s.username, s.password)
        if s.tls:
            try:
                client.tls_set(ca_certs=s.cafile, certfile=s.certfile, keyfile=s.keyfile)
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise ConfigError(f"TLS files (--cafile/--certfile/--keyfile) not usable: {exc}") from None
        client.reconnect_delay_set(1, max(1, int(s.reconnect_max)))
        # paho's own queue (QoS > 0 messages handed over but not yet acknowledged) is bounded too
        client.max_queued_messages_set(s.queue_size + 100)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        return client

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.error("broker %s:%d refused the connection: %s", self.s.host, self.s.port, reason)
            return
        log.info("connected to the broker %s:%d as %s", self.s.host, self.s.port, self.s.client_id)
        self.counters.broker_connects += 1
        self._connected = True
        self._connect_gen += 1

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if self._stop.is_set() or not self._connected:  # a refused attempt is logged by _on_connect
            return
        self._connected = False
        self.counters.broker_disconnects += 1
        log.warning("lost the broker %s:%d (%s); reconnecting with backoff", self.s.host, self.s.port, reason)

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        log.warning("cannot reach the broker %s:%d; retrying with backoff", self.s.host, self.s.port)

    def _ready(self) -> bool:
        """The broker is connected and everything held back during the outage went out first."""
        return bool(self.client.is_connected()) and self._flushed_gen == self._connect_gen

    # --- ZeroMQ side ------------------------------------------------------------------------------------------
    def handle(self, msg: Message) -> None:
        if msg.kind == RESULT:
            self.counters.results_received += 1
            payload = dict(msg.header)
            if self.s.with_mask and msg.mask:
                payload["mask_png_base64"] = base64.b64encode(msg.mask).decode("ascii")
            self._result(self.s.topic(msg.camera, "result"), encode_json(payload))
        else:
            self.counters.statuses_received += 1
            self.cameras.setdefault(msg.camera, CameraLiveness()).heard(msg.header)
            self._status(msg.camera, encode_json(msg.header))

    def _result(self, topic: str, payload: bytes) -> None:
        if self._ready() and self._publish_result(topic, payload):
            return
        if len(self._queue) >= self.s.queue_size:
            self._queue.popleft()
            self.counters.results_dropped += 1
        self._queue.append((topic, payload))

    def _publish_result(self, topic: str, payload: bytes) -> bool:
        """Hand one result to paho; False when it must wait in our queue (QoS 0 while disconnected)."""
        paho = _paho()
        info = self.client.publish(topic, payload, self.s.qos_result, False)
        if info.rc == paho.MQTT_ERR_SUCCESS or (info.rc == paho.MQTT_ERR_NO_CONN and self.s.qos_result > 0):
            self._in_flight.append(info)  # QoS > 0 without a connection: paho holds it and sends it on reconnect
            return True
        if info.rc == paho.MQTT_ERR_NO_CONN:
            return False
        self.counters.results_dropped += 1  # paho's bounded queue is full: the broker takes nothing
        log.warning("result on %s dropped: %s", topic, paho.error_string(info.rc))
        return True

    def _status(self, camera: str, payload: bytes) -> None:
        if self._ready() and self._publish_retained(self.s.topic(camera, "status"), payload):
            self.counters.statuses_published += 1
            return
        self._pending_status[camera] = payload

    def _publish_retained(self, topic: str, payload: bytes) -> bool:
        paho = _paho()
        info = self.client.publish(topic, payload, STATUS_QOS, True)
        return info.rc in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN)  # QoS 1: held by paho until reconnected

    # --- housekeeping on the main thread ----------------------------------------------------------------------
    def _flush(self) -> None:
        """After a (re)connect: our state, the statuses kept during the outage, then the queued results in order."""
        generation = self._connect_gen
        self._publish_state()
        for camera in list(self._pending_status):
            if not self._publish_retained(self.s.topic(camera, "status"), self._pending_status[camera]):
                return
            del self._pending_status[camera]
            self.counters.statuses_published += 1
        while self._queue:
            topic, payload = self._queue[0]
            if not self._publish_result(topic, payload):
                return
            self._queue.popleft()
        self._flushed_gen = generation
        log.info("broker caught up: state, statuses and queued results published")

    def _check_liveness(self) -> None:
        now = time.monotonic()
        for camera, live in self.cameras.items():
            limit = MISSED_STATUSES * live.interval(self.s.status_interval)
            silent = now - live.last_heard
            if live.offline or silent <= limit:
                continue
            live.offline = True
            self.counters.daemon_offline_published += 1
            reason = (
                f"no status from the daemon for {silent:.1f} s "
                f"({MISSED_STATUSES} status intervals of {limit / MISSED_STATUSES:.3g} s)"
            )
            log.warning("camera %s: %s; publishing its offline status", camera, reason)
            status = {
                "schema_version": 1,
                "kind": "status",
                "camera": camera,
                "state": "offline",
                "reason": reason,
                "source": "bridge",
                "bridge": self.s.client_id,
                "run_id": live.run_id,
                "last_status_time": live.publish_times[-1] if live.publish_times else None,
                "publish_time": time.time(),
            }
            self._status(camera, encode_json(status))

    def _settle_in_flight(self) -> None:
        still = []
        for info in self._in_flight:
            try:
                done = info.is_published()
            except (ValueError, RuntimeError):  # refused by paho after all
                self.counters.results_dropped += 1
                continue
            if done:
                self.counters.results_forwarded += 1
            else:
                still.append(info)
        self._in_flight = still

    def snapshot(self) -> dict[str, Any]:
        self._settle_in_flight()
        self.counters.results_in_flight = len(self._in_flight)
        self.counters.results_queued = len(self._queue)
        return asdict(self.counters)

    def _state_payload(self, state: str, reason: str | None = None) -> bytes:
        body: dict[str, Any] = {
            "state": state,
            "client_id": self.s.client_id,
            "connect": self.s.connect,
            "publish_time": time.time(),
            "started": self._started,
        }
        if reason:
            body["reason"] = reason
        if state == "online" or reason == "bridge stopped":
            now = time.monotonic()
            body["counters"] = self.snapshot()
            body["cameras"] = {
                name: {
                    "daemon": "offline" if live.offline else "online",
                    "run_id": live.run_id,
                    "last_status_age_s": round(now - live.last_heard, 3),
                    "status_interval_s": round(live.interval(self.s.status_interval), 4),
                    "zmq_missed": self._missed.get(name, 0),
                }
                for name, live in self.cameras.items()
            }
        return encode_json(body)

    def _publish_state(self) -> None:
        self._publish_retained(self.s.state_topic, self._state_payload("online"))
        self._next_state = time.monotonic() + self.s.state_interval

    def _housekeeping(self) -> None:
        if len(self._in_flight) > 256:
            self._settle_in_flight()
        if self.client.is_connected() and self._flushed_gen != self._connect_gen:
            self._flush()
        self._check_liveness()
        if self._ready() and time.monotonic() >= self._next_state:
            self._publish_state()

    # --- the loop ---------------------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        s = self.s
        log.info(
            "bridging %s%s to mqtt%s://%s:%d under %s/ (results QoS %d%s)",
            s.connect,
            f" camera {s.camera}" if s.camera else "",
            "s" if s.tls else "",
            s.host,
            s.port,
            s.prefix,
            s.qos_result,
            ", with masks" if s.with_mask else "",
        )
        self.client.connect_async(s.host, s.port, s.keepalive)
        self.client.loop_start()
        started, hinted = time.monotonic(), False
        with Subscriber(s.connect, s.camera, server_key=s.server_key, client_keys=s.client_keys) as sub:
            try:
                while not self._stop.is_set():
                    msg = sub.recv(TICK_S)
                    if msg is not None:
                        self.handle(msg)
                    self._missed = sub.missed
                    self.counters.zmq_missed = sum(self._missed.values())
                    self.counters.zmq_invalid = sub.invalid
                    self._housekeeping()
                    if not hinted and not sub.tracks and time.monotonic() - started >= QUIET_AFTER_S:
                        hinted = True
                        log.warning(
                            "nothing from the daemon at %s in %g s: is it running, is this its publish.endpoint, "
                            "and (with CURVE) are the keys right?",
                            s.connect,
                            QUIET_AFTER_S,
                        )
            finally:
                self._shutdown()

    def _shutdown(self) -> None:
        """Say goodbye on the state topic (a clean disconnect does not fire the Last Will), then disconnect."""
        counters = self.snapshot()
        lost = counters["results_queued"] + counters["results_in_flight"]
        if self.client.is_connected():
            info = self.client.publish(self.s.state_topic, self._state_payload("offline", "bridge stopped"), 1, True)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and not (info.is_published() and not self._unsettled()):
                time.sleep(0.02)
            lost = len(self._queue) + len(self._in_flight)
        self.client.disconnect()
        self.client.loop_stop()
        if lost:
            log.warning("stopped with %d result(s) not delivered to the broker", lost)
        log.info("bridge stopped: %s", json.dumps(self.snapshot()))

    def _unsettled(self) -> bool:
        self._settle_in_flight()
        return bool(self._in_flight)


def cli_bridge_mqtt(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    bridge = MqttBridge(settings)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        bridge.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    bridge.run()
    return 0
