"""`linewatch bridge opcua`: an OPC UA server (asyncua) that mirrors the daemon's results and status for PLCs and
maps each camera's `Inspect(PartId)` method onto the daemon's trigger endpoint. The address space is the contract
in docs/PLC.md.

It is an ordinary ZeroMQ subscriber in a process of its own: the daemon's PUB socket drops for it if it falls
behind (never the other way round), and the bridge counts what it missed (`SeqGaps`). ZeroMQ is read on a thread,
trigger requests wait on worker threads, so the asyncio loop that serves OPC UA never blocks on the daemon."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import math
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from asyncua import ua
from asyncua.common.node import Node
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.server import Server
from asyncua.server.user_managers import UserManager
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds

from linewatch import __version__
from linewatch.bridges import opcua_security as security
from linewatch.bridges.opcua_options import DAEMON_STATUS_INTERVAL_S, DAEMON_TRIGGER_TIMEOUT_S
from linewatch.errors import ConfigError, LinewatchError
from linewatch.protocol.client import Subscriber, TriggerClient, TriggerError, TriggerTimeout
from linewatch.protocol.curve import client_keys_from_args
from linewatch.protocol.wire import RESULT, Message, ProtocolError

log = logging.getLogger("linewatch.bridges.opcua")

NAMESPACE_URI = "urn:linewatch:inspection"
VERDICT_CODES = {"OK": 0, "NOK": 1, "ERROR": 2}
NO_RESULT = -1  # VerdictCode before the first result: only 0 is OK
INSPECT_MARGIN_S = 1.0  # on top of the daemon's trigger.timeout_s: its error reply must win over our timeout
STALE_AFTER = 2.5  # status intervals of silence before DaemonAlive drops: one lost status is tolerated
TICK = 0.25  # status intervals between checks: a stopped daemon shows within STALE_AFTER + TICK < 3 intervals
_UNSET = object()
NULL_TIME = datetime(1601, 1, 1, tzinfo=timezone.utc)  # OPC UA's null DateTime (encoded as 0): "never"
QUEUE_SIZE = 10_000  # messages waiting for the OPC UA loop; more are dropped and counted (BridgeDropped)

V = ua.VariantType
# (browse name, type, initial value, description): the per-camera variables, in docs/PLC.md's order
CAMERA_VARIABLES: list[tuple[str, ua.VariantType, Any, str]] = [
    ("Verdict", V.String, "", "OK, NOK or ERROR of the latest result ('' before the first)"),
    ("VerdictCode", V.Int32, NO_RESULT, "0 OK, 1 NOK, 2 ERROR, -1 no result yet: only 0 is a good part"),
    ("ImageScore", V.Double, math.nan, "anomaly score of the latest result; NaN with ERROR"),
    ("PartId", V.String, "", "part id of the trigger request ('' in continuous mode)"),
    ("RunId", V.String, "", "the daemon's run id: a new one means Seq started again at 1"),
    ("FrameTime", V.DateTime, NULL_TIME, "when the camera delivered the frame"),
    ("PublishTime", V.DateTime, NULL_TIME, "when the daemon published the result"),
    ("DefectCount", V.Int32, 0, "regions that failed the part (0 with OK and ERROR)"),
    ("LargestDefectArea", V.Int32, 0, "area of the largest region that failed the part, model-input pixels"),
    ("CalibrationVersion", V.Int32, -1, "calibration.json version in use (-1: uncalibrated, every verdict ERROR)"),
    ("ModelId", V.String, "", "first 12 hex digits of the ONNX graph's sha256"),
    ("Error", V.String, "", "why the latest result is ERROR ('' otherwise)"),
    ("CameraState", V.String, "unknown", "online, offline, reconnecting, finished; stale when no status arrives"),
    ("Alive", V.Boolean, False, "this camera's status arrived within 2.5 status intervals"),
    ("Healthy", V.Boolean, False, "the daemon's own health (false: it stopped its watchdog and will restart)"),
    ("DriftState", V.String, "", "drift watch: ok, warn, alarm or unavailable"),
    ("OkCount", V.UInt64, 0, "OK results since the daemon started"),
    ("NokCount", V.UInt64, 0, "NOK results since the daemon started"),
    ("ErrorCount", V.UInt64, 0, "ERROR results since the daemon started"),
    ("SeqGaps", V.UInt64, 0, "results the bridge never received (ZeroMQ seq gaps)"),
    ("LastResultAge", V.Double, -1.0, "seconds since the latest result arrived (-1: none yet)"),
    ("Seq", V.UInt64, 0, "the latest result's sequence number; written last, after the fields above"),
]
BRIDGE_VARIABLES: list[tuple[str, ua.VariantType, Any, str]] = [
    ("Heartbeat", V.UInt32, 0, "counts up every quarter status interval while the daemon is alive"),
    ("LifeBit", V.Boolean, False, "toggles with every Heartbeat step"),
    ("DaemonAlive", V.Boolean, False, "a status from the daemon arrived within 2.5 status intervals"),
    ("BridgeState", V.String, "waiting", "waiting (nothing heard yet), running, daemon_lost"),
    ("LastStatusTime", V.DateTime, NULL_TIME, "when the latest status message arrived"),
    ("SeqGaps", V.UInt64, 0, "results missed over all cameras (ZeroMQ seq gaps)"),
    ("BridgeDropped", V.UInt64, 0, "messages received but dropped because the OPC UA side fell behind"),
    ("InvalidMessages", V.UInt64, 0, "malformed ZeroMQ messages skipped"),
    ("DaemonRestarts", V.UInt64, 0, "new run ids seen after the first (the daemon restarted)"),
    ("Cameras", V.String, "", "names of the cameras seen, comma-separated"),
    ("StatusInterval", V.Double, DAEMON_STATUS_INTERVAL_S, "the daemon's status interval the bridge assumes, s"),
    ("Endpoint", V.String, "", "the ZeroMQ endpoint subscribed to"),
    ("Version", V.String, __version__, "linewatch version of the bridge"),
]
# UNECE codes per OPC UA Part 8: UnitId = the code's ASCII bytes; -1 = no code (pixels have none)
UNECE_URI = "http://www.opcfoundation.org/UA/units/un/cefact"
UNITS = {
    "LargestDefectArea": (-1, "px", "pixels of the model input"),
    "LastResultAge": (int.from_bytes(b"SEC", "big"), "s", "second"),
    "StatusInterval": (int.from_bytes(b"SEC", "big"), "s", "second"),
}


def _utc(t: float | None) -> datetime:
    return NULL_TIME if t is None else datetime.fromtimestamp(t, timezone.utc)


def _dv(value: Any, kind: ua.VariantType, source_time: datetime | None = None) -> ua.DataValue:
    stamp = source_time or datetime.now(timezone.utc)
    return ua.DataValue(ua.Variant(value, kind), SourceTimestamp=stamp)  # type: ignore[arg-type]


def result_values(h: dict[str, Any]) -> dict[str, Any]:
    """A result header -> the camera variables it sets (without Seq, written last)."""
    verdict = str(h.get("verdict")) if h.get("verdict") in VERDICT_CODES else "ERROR"
    score = h.get("image_score")
    regions = [r for r in h.get("regions") or [] if isinstance(r, dict) and r.get("defect")]
    count = h.get("defect_regions")
    if not isinstance(count, int) or isinstance(count, bool):
        count = len(regions)
    calibration = h.get("calibration_version")
    return {
        "Verdict": verdict,
        "VerdictCode": VERDICT_CODES[verdict],
        "ImageScore": float(score) if verdict != "ERROR" and isinstance(score, (int, float)) else math.nan,
        "PartId": h.get("part_id") or "",
        "RunId": h.get("run_id") or "",
        "FrameTime": _utc(h.get("frame_time")),
        "PublishTime": _utc(h.get("publish_time")),
        "DefectCount": 0 if verdict == "ERROR" else count,
        "LargestDefectArea": max((int(r.get("area") or 0) for r in regions), default=0),
        "CalibrationVersion": calibration if isinstance(calibration, int) else -1,
        "ModelId": h.get("model_id") or "",
        "Error": (h.get("error") or "not inspected") if verdict == "ERROR" else "",
    }


@dataclass
class CameraView:
    """One camera object and what the bridge knows about it."""

    name: str
    nodes: dict[str, Node]
    run_id: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VERDICT_CODES, 0))
    last_status: float | None = None  # monotonic
    last_result: float | None = None  # monotonic


class UserFile(UserManager):
    """Users of the users file (PBKDF2 hashes); anonymous and unknown users are refused."""

    def __init__(self, users: dict[str, str]):
        self.users = users

    def get_user(
        self, iserver: Any, username: str | None = None, password: Any = None, certificate: Any = None
    ) -> User | None:
        stored = self.users.get(username or "")
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        if stored is None or not isinstance(password, str) or not security.verify_password(password, stored):
            log.warning("OPC UA login refused for user %r", username)
            return None
        return User(role=UserRole.User, name=username)


class ZmqReader(threading.Thread):
    """Receives the daemon's messages on its own thread and hands them to the OPC UA loop through a bounded queue:
    a stalled loop costs dropped (counted) messages here, never a slower daemon."""

    def __init__(self, args: argparse.Namespace, loop: asyncio.AbstractEventLoop, wake: asyncio.Event):
        super().__init__(name="zmq-reader", daemon=True)
        self.args, self.loop, self.wake = args, loop, wake
        self.queue: queue.Queue[tuple[Message, int, int]] = queue.Queue(QUEUE_SIZE)
        self.dropped = 0
        self.invalid = 0
        self.signalled = threading.Event()
        self.stopping = threading.Event()
        self.failed: BaseException | None = None

    def run(self) -> None:
        try:
            server_key, client_keys = client_keys_from_args(self.args)
            with Subscriber(self.args.connect, server_key=server_key, client_keys=client_keys) as sub:
                while not self.stopping.is_set():
                    msg = sub.recv(timeout_s=0.2)
                    self.invalid = sub.invalid
                    if msg is None:
                        continue
                    track = sub.tracks[msg.camera]
                    try:
                        self.queue.put_nowait((msg, track.missed, track.restarts))
                    except queue.Full:
                        self.dropped += 1
                        continue
                    if not self.signalled.is_set():
                        self.signalled.set()
                        self.loop.call_soon_threadsafe(self.wake.set)
        except BaseException as exc:  # reported by the loop, which exits non-zero
            self.failed = exc
            self.loop.call_soon_threadsafe(self.wake.set)


class Bridge:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.interval = float(args.status_interval)
        self.inspect_timeout = float(args.trigger_timeout) + INSPECT_MARGIN_S
        self.server = Server(user_manager=UserFile(security.load_users(args.users)) if args.users else None)
        self.cameras: dict[str, CameraView] = {}
        self.bridge_nodes: dict[str, Node] = {}
        self.restarts: dict[str, int] = {}
        self.missed: dict[str, int] = {}
        self.heartbeat = 0
        self.last_status: float | None = None  # monotonic, any camera
        self._clients: list[TriggerClient] = []
        self._clients_lock = threading.Lock()
        self.idx = 0
        self._written: dict[ua.NodeId, Any] = {}

    # --- set-up --------------------------------------------------------------------------------------------
    async def setup(self) -> None:
        args = self.args
        await self.server.init()
        self.server.set_endpoint(args.listen)
        self.server.set_server_name("linewatch OPC UA bridge")
        self.server.product_uri = "urn:linewatch"
        if args.security == "sign-encrypt":
            uri = security.certificate_uri(args.cert) or security.application_uri()
            await self.server.set_application_uri(uri)
            await self.server.load_certificate(str(args.cert))
            await self.server.load_private_key(str(args.key))
            self.server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
            self.server.set_identity_tokens([ua.UserNameIdentityToken])
        else:
            await self.server.set_application_uri(security.application_uri())
            self.server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
            self.server.set_identity_tokens([ua.AnonymousIdentityToken])
        self.idx = await self.server.register_namespace(NAMESPACE_URI)
        root = await self.server.nodes.objects.add_object(
            self._id("Linewatch"), ua.QualifiedName("Linewatch", self.idx)
        )
        await self._describe(root, "the linewatch inspection daemon, as this bridge sees it")
        self.bridge_nodes = await self._add_variables(root, "Linewatch", BRIDGE_VARIABLES)
        self.root = root
        await self._write_bridge("StatusInterval", self.interval)
        await self._write_bridge("Endpoint", args.connect)

    def _id(self, path: str) -> ua.NodeId:
        """String node ids (`ns=<idx>;s=cam1.Verdict`): stable across restarts, so a PLC can map them once."""
        return ua.NodeId(path, self.idx, ua.NodeIdType.String)  # type: ignore[arg-type]

    async def _describe(self, node: Node, text: str) -> None:
        await node.write_attribute(AttributeIds.Description, ua.DataValue(ua.Variant(ua.LocalizedText(text))))

    async def _add_variables(
        self, parent: Node, prefix: str, spec: list[tuple[str, ua.VariantType, Any, str]]
    ) -> dict[str, Node]:
        nodes: dict[str, Node] = {}
        for name, kind, initial, text in spec:
            node = await parent.add_variable(
                self._id(f"{prefix}.{name}"), ua.QualifiedName(name, self.idx), initial, kind
            )
            await self._describe(node, text)  # read-only: asyncua grants CurrentRead only unless set_writable()
            if name in UNITS:
                unit_id, shown, long = UNITS[name]
                eu = ua.EUInformation(UNECE_URI, unit_id, ua.LocalizedText(shown), ua.LocalizedText(long))
                await node.add_property(
                    self._id(f"{prefix}.{name}.EngineeringUnits"), ua.QualifiedName("EngineeringUnits", 0), eu
                )
            if name == "VerdictCode":
                await node.add_property(
                    self._id(f"{prefix}.{name}.EnumStrings"),
                    ua.QualifiedName("EnumStrings", 0),
                    [ua.LocalizedText(v) for v in VERDICT_CODES],
                    V.LocalizedText,
                )
            nodes[name] = node
        return nodes

    async def camera(self, name: str) -> CameraView:
        """The camera's object, created the first time a result or status names it."""
        view = self.cameras.get(name)
        if view is not None:
            return view
        obj = await self.root.add_object(self._id(name), ua.QualifiedName(name, self.idx))
        await self._describe(obj, f"camera {name}")
        view = CameraView(name, await self._add_variables(obj, name, CAMERA_VARIABLES))
        self.cameras[name] = view
        if self.args.trigger:
            await self._add_inspect(obj, name)
        await self._write_bridge("Cameras", ",".join(sorted(self.cameras)))
        log.info("camera %s added to the address space", name)
        return view

    async def _add_inspect(self, obj: Node, camera: str) -> None:
        def arg(name: str, kind: int, text: str) -> ua.Argument:
            a = ua.Argument()
            a.Name, a.DataType, a.ValueRank = name, ua.NodeId(kind), -1  # type: ignore[arg-type]
            a.Description = ua.LocalizedText(text)
            return a

        async def inspect(parent: ua.NodeId, *inputs: ua.Variant) -> list[ua.Variant]:
            part = inputs[0].Value if len(inputs) == 1 else None
            if not isinstance(part, str):
                out = ("ERROR", math.nan, 0, "Inspect takes one argument, PartId (String)")
            else:
                out = await asyncio.to_thread(self._inspect, camera, part)
            return [ua.Variant(out[0], V.String), ua.Variant(out[1], V.Double), ua.Variant(out[2], V.UInt64),
                    ua.Variant(out[3], V.String)]  # fmt: skip

        await obj.add_method(
            self._id(f"{camera}.Inspect"),
            ua.QualifiedName("Inspect", self.idx),
            inspect,
            [arg("PartId", ObjectIds.String, "the part's id, echoed in the result (printable, <= 200 characters)")],
            [
                arg("Verdict", ObjectIds.String, "OK, NOK or ERROR (not inspected: reject or re-inspect)"),
                arg("ImageScore", ObjectIds.Double, "anomaly score; NaN with ERROR"),
                arg("Seq", ObjectIds.UInt64, "the result's sequence number; 0 when there is no result"),
                arg("Error", ObjectIds.String, "why the verdict is ERROR; '' otherwise"),
            ],
        )

    # --- Inspect -------------------------------------------------------------------------------------------
    def _inspect(self, camera: str, part_id: str) -> tuple[str, float, int, str]:
        """Blocking, on a worker thread: one trigger request. Every failure is an ERROR output, never OK."""
        with self._clients_lock:
            client = self._clients.pop() if self._clients else None
        try:
            if client is None:
                server_key, client_keys = client_keys_from_args(self.args)
                client = TriggerClient(self.args.trigger, server_key=server_key, client_keys=client_keys)
            msg = client.inspect(camera, part_id, timeout_s=self.inspect_timeout)
        except TriggerError as exc:
            return "ERROR", math.nan, 0, f"{exc.code}: {exc.message}"[:1000]
        except TriggerTimeout:
            return (
                "ERROR",
                math.nan,
                0,
                (f"no reply from the daemon's trigger endpoint {self.args.trigger} within {self.inspect_timeout:g} s"),
            )
        except (ProtocolError, LinewatchError) as exc:
            return "ERROR", math.nan, 0, str(exc)[:1000]
        finally:
            if client is not None:
                with self._clients_lock:
                    self._clients.append(client)
        values = result_values(msg.header)
        return values["Verdict"], values["ImageScore"], int(msg.header["seq"]), values["Error"]

    # --- updates -------------------------------------------------------------------------------------------
    async def _write(self, node: Node, kind: ua.VariantType, value: Any, source_time: datetime | None = None) -> None:
        self._written[node.nodeid] = value
        await self.server.write_attribute_value(node.nodeid, _dv(value, kind, source_time))

    async def _write_bridge(self, name: str, value: Any) -> None:
        kind = next(k for n, k, _, _ in BRIDGE_VARIABLES if n == name)
        await self._change(self.bridge_nodes[name], kind, value)

    async def _change(self, node: Node, kind: ua.VariantType, value: Any) -> None:
        """Write only a new value, so a state variable's SourceTimestamp says when it last changed."""
        if self._written.get(node.nodeid, _UNSET) != value:
            await self._write(node, kind, value)

    async def on_message(self, msg: Message, missed: int, restarts: int) -> None:
        view = await self.camera(msg.camera)
        now = time.monotonic()
        h = msg.header
        if h.get("run_id") != view.run_id:  # a new daemon run: counters start again
            view.run_id, view.counts = h.get("run_id"), dict.fromkeys(VERDICT_CODES, 0)
        kinds = {n: k for n, k, _, _ in CAMERA_VARIABLES}
        if msg.kind == RESULT:
            view.last_result = now
            values = result_values(h)
            view.counts[values["Verdict"]] += 1
            stamp = _utc(h.get("publish_time"))
            for name, value in values.items():
                await self._write(view.nodes[name], kinds[name], value, stamp)
            await self._write_counts(view)
            await self._write(view.nodes["LastResultAge"], V.Double, 0.0)
            await self._write(view.nodes["Seq"], V.UInt64, int(h["seq"]), stamp)
        else:
            view.last_status = self.last_status = now
            await self._on_status(view, h)
        if self.missed.get(msg.camera) != missed:
            self.missed[msg.camera] = missed
            await self._write(view.nodes["SeqGaps"], V.UInt64, missed)
            await self._write_bridge("SeqGaps", sum(self.missed.values()))
        if self.restarts.get(msg.camera, 0) != restarts:
            self.restarts[msg.camera] = restarts
            await self._write_bridge("DaemonRestarts", max(self.restarts.values()))

    async def _on_status(self, view: CameraView, h: dict[str, Any]) -> None:
        verdicts = h.get("verdicts")
        if isinstance(verdicts, dict):  # authoritative: also counts results this bridge missed
            for verdict in VERDICT_CODES:
                n = verdicts.get(verdict)
                if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
                    view.counts[verdict] = n
        await self._write_counts(view)
        state = h.get("state")
        await self._change(view.nodes["CameraState"], V.String, state if isinstance(state, str) else "unknown")
        await self._change(view.nodes["Alive"], V.Boolean, True)
        await self._change(view.nodes["Healthy"], V.Boolean, h.get("healthy") is not False)
        drift = h.get("drift")
        drift_state = drift.get("state") if isinstance(drift, dict) else None
        await self._change(view.nodes["DriftState"], V.String, drift_state if isinstance(drift_state, str) else "")
        if isinstance(h.get("calibration_version"), int):
            await self._change(view.nodes["CalibrationVersion"], V.Int32, h["calibration_version"])
        if isinstance(h.get("model_id"), str):
            await self._change(view.nodes["ModelId"], V.String, h["model_id"])
        await self._write_bridge("LastStatusTime", datetime.now(timezone.utc))

    async def _write_counts(self, view: CameraView) -> None:
        for verdict, name in (("OK", "OkCount"), ("NOK", "NokCount"), ("ERROR", "ErrorCount")):
            await self._change(view.nodes[name], V.UInt64, view.counts[verdict])

    async def tick(self, reader: ZmqReader) -> None:
        """Liveness, every quarter status interval: the heartbeat moves only while the daemon is heard."""
        now = time.monotonic()
        stale = STALE_AFTER * self.interval
        alive = self.last_status is not None and now - self.last_status <= stale
        if alive:
            self.heartbeat = (self.heartbeat + 1) % 2**32
            await self._write_bridge("Heartbeat", self.heartbeat)
            await self._write_bridge("LifeBit", self.heartbeat % 2 == 1)
        await self._write_bridge("DaemonAlive", alive)
        state = "waiting" if self.last_status is None else "running" if alive else "daemon_lost"
        await self._write_bridge("BridgeState", state)
        await self._write_bridge("BridgeDropped", reader.dropped)
        await self._write_bridge("InvalidMessages", reader.invalid)
        for view in self.cameras.values():
            if view.last_status is not None and now - view.last_status > stale:
                await self._change(view.nodes["Alive"], V.Boolean, False)
                await self._change(view.nodes["CameraState"], V.String, "stale")
            if view.last_result is not None:
                await self._write(view.nodes["LastResultAge"], V.Double, round(now - view.last_result, 3))

    # --- running -------------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        await self.setup()
        try:
            await self.server.start()
        except OSError as exc:
            raise LinewatchError(f"cannot listen on {self.args.listen}: {exc}") from None
        wake = asyncio.Event()
        reader = ZmqReader(self.args, asyncio.get_running_loop(), wake)
        reader.start()
        log.info(
            "OPC UA bridge on %s (security %s), subscribed to %s%s",
            self.args.listen,
            self.args.security,
            self.args.connect,
            f", Inspect via {self.args.trigger}" if self.args.trigger else "",
        )
        _notify("READY=1")
        ticker = asyncio.create_task(self._tick_loop(reader, stop))
        try:
            while not stop.is_set():
                waiter = asyncio.create_task(wake.wait())
                stopper = asyncio.create_task(stop.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopper.cancel()
                wake.clear()
                reader.signalled.clear()
                if reader.failed is not None:
                    raise LinewatchError(f"ZeroMQ subscriber failed: {reader.failed}")
                while True:
                    try:
                        item = reader.queue.get_nowait()
                    except queue.Empty:
                        break
                    await self.on_message(*item)
        finally:
            _notify("STOPPING=1")
            ticker.cancel()
            reader.stopping.set()
            await self.server.stop()
            reader.join(2.0)
            with self._clients_lock:
                for client in self._clients:
                    client.close()

    async def _tick_loop(self, reader: ZmqReader, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.tick(reader)
            except Exception:  # the loop must go on: a dead heartbeat would read as a dead daemon
                log.exception("liveness update failed")
            await asyncio.sleep(TICK * self.interval)


def _notify(state: str) -> None:
    from linewatch.line.systemd_notify import SystemdNotifier

    notifier = SystemdNotifier()
    if notifier.enabled:
        notifier.notify(state)
    notifier.close()


def _check_args(args: argparse.Namespace) -> None:
    security.check_listen_security(args.listen, args.security)
    if not args.status_interval > 0 or not math.isfinite(args.status_interval):
        raise ConfigError(f"--status-interval must be a positive number of seconds, got {args.status_interval}")
    if not args.trigger_timeout > 0 or not math.isfinite(args.trigger_timeout):
        raise ConfigError(f"--trigger-timeout must be a positive number of seconds, got {args.trigger_timeout}")
    if args.security == "sign-encrypt":
        missing = [flag for flag in ("cert", "key", "users") if not getattr(args, flag)]
        if missing:
            raise ConfigError(
                "--security sign-encrypt needs " + ", ".join(f"--{m}" for m in missing)
                + " (linewatch bridge opcua --make-cert DIR; --users FILE --add-user NAME)"
            )  # fmt: skip
        for flag in ("cert", "key"):
            if not Path(getattr(args, flag)).is_file():
                raise ConfigError(f"--{flag} {getattr(args, flag)}: no such file")
    elif args.users:
        raise ConfigError("--users needs --security sign-encrypt (security none has no user login)")
    if bool(args.server_key) != bool(args.client_key_file):
        raise ConfigError("CURVE needs both --server-key and --client-key-file")


def _add_user(args: argparse.Namespace) -> int:
    if not args.users:
        raise ConfigError("--add-user needs --users FILE")
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.add_user}: ")
        if getpass.getpass("again: ") != password:
            raise ConfigError("the passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    new = security.add_user(args.users, args.add_user, password)
    print(f"{'added' if new else 'changed the password of'} user {args.add_user} in {args.users}", file=sys.stderr)
    return 0


def cli_bridge_opcua(args: argparse.Namespace) -> int:
    if args.add_user:
        return _add_user(args)
    if args.make_cert:
        cert, key = security.make_certificate(args.make_cert, args.listen)
        print(f"wrote {cert} and {key} (give clients {cert} to trust)", file=sys.stderr)
        return 0
    _check_args(args)
    logging.getLogger("asyncua").setLevel(logging.WARNING)
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await Bridge(args).run(stop)
    return 0


__all__ = ["Bridge", "cli_bridge_opcua", "NAMESPACE_URI", "DAEMON_TRIGGER_TIMEOUT_S", "result_values"]
