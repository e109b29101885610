"""The OPC UA bridge as a subprocess between the daemon (a subprocess on a video camera and two triggered MJPEG
cameras) and real OPC UA clients: asyncua's Client and, independently, Node's node-opcua client. Everything on
127.0.0.1 with ports picked at run time."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from cryptography.x509.oid import ExtendedKeyUsageOID

from linewatch.bridges import opcua as bridge
from linewatch.bridges import opcua_security as sec
from linewatch.errors import ConfigError
from tests.helpers import MjpegServer, free_port, grey, with_white_square, write_video
from tests.test_daemon import daemon_log, start_daemon, stop, video_frames, write_calibration, write_config

ROOT = Path(__file__).resolve().parents[1]
NS = "urn:linewatch:inspection"
INTERVAL = 0.25  # the daemon's publish.status_interval_s, and the bridge's --status-interval
TRIGGER_TIMEOUT = 2.0  # the daemon's trigger.timeout_s, and the bridge's --trigger-timeout
NODE_MODULES = Path(os.environ.get("LINEWATCH_NODE_OPCUA", Path.home() / ".cache/linewatch-ci/node/node_modules"))
V = ua.VariantType
# the contract of docs/PLC.md: every camera variable and its type
CAMERA_TYPES = {
    "Verdict": V.String, "VerdictCode": V.Int32, "ImageScore": V.Double, "PartId": V.String, "RunId": V.String,
    "FrameTime": V.DateTime, "PublishTime": V.DateTime, "DefectCount": V.Int32, "LargestDefectArea": V.Int32,
    "CalibrationVersion": V.Int32, "ModelId": V.String, "Error": V.String, "CameraState": V.String,
    "Alive": V.Boolean, "Healthy": V.Boolean, "DriftState": V.String, "OkCount": V.UInt64, "NokCount": V.UInt64,
    "ErrorCount": V.UInt64, "SeqGaps": V.UInt64, "LastResultAge": V.Double, "Seq": V.UInt64,
}  # fmt: skip
BRIDGE_TYPES = {
    "Heartbeat": V.UInt32, "LifeBit": V.Boolean, "DaemonAlive": V.Boolean, "BridgeState": V.String,
    "LastStatusTime": V.DateTime, "SeqGaps": V.UInt64, "BridgeDropped": V.UInt64, "InvalidMessages": V.UInt64,
    "DaemonRestarts": V.UInt64, "Cameras": V.String, "StatusInterval": V.Double, "Endpoint": V.String,
    "Version": V.String,
}  # fmt: skip


# --- helpers ---------------------------------------------------------------------------------------------------


def start_bridge(tmp_path: Path, *args: str, name: str = "bridge") -> tuple[subprocess.Popen, str]:
    url = f"opc.tcp://127.0.0.1:{free_port()}"
    log = open(tmp_path / f"{name}.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "linewatch.cli", "bridge", "opcua", "--listen", url, *args],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return proc, url


def bridge_log(tmp_path: Path, name: str = "bridge") -> str:
    return (tmp_path / f"{name}.log").read_text(errors="replace")


async def connected(client: Client, proc: subprocess.Popen, log: Path, timeout: float = 40.0) -> None:
    """Connect once the bridge listens (it loads the standard address space first)."""
    end = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            await client.connect()
            return
        except (OSError, asyncio.TimeoutError):
            assert time.monotonic() < end, "the bridge never listened:\n" + log.read_text(errors="replace")[-3000:]
            await asyncio.sleep(0.3)


async def until(read, cond, timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = await read()
        if cond(value):
            return value
        assert time.monotonic() < end, f"timed out waiting for {what} (last value {value!r})"
        await asyncio.sleep(0.05)


class Changes:
    """asyncua subscription handler: every data change, with its node's browse path."""

    def __init__(self, names: dict[ua.NodeId, str]):
        self.names = names
        self.seen: list[tuple[str, Any, float]] = []

    def datachange_notification(self, node, val, data) -> None:
        self.seen.append((self.names[node.nodeid], val, time.monotonic()))

    def values(self, name: str) -> list[Any]:
        return [v for n, v, _ in self.seen if n == name]


def node(client: Client, idx: int, path: str):
    return client.get_node(ua.NodeId(path, idx, ua.NodeIdType.String))


async def call_inspect(client: Client, idx: int, camera: str, part: str) -> list[Any]:
    return await node(client, idx, camera).call_method(
        node(client, idx, f"{camera}.Inspect"), ua.Variant(part, V.String)
    )


# --- the line: daemon + bridge, shared by the tests that need them (the last one stops the daemon) ---------------


@pytest.fixture(scope="module")
def line(deviation_bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("opcua_line")
    bundle_dir = tmp / "bundle"
    shutil.copytree(deviation_bundle, bundle_dir)
    write_calibration(bundle_dir, 0.5)
    scene = {"frame": grey()}
    camera = MjpegServer(free_port(), lambda i: scene["frame"], fps=40).start()
    video = write_video(tmp / "line.avi", video_frames(8))
    trigger = f"tcp://127.0.0.1:{free_port()}"
    config, endpoint = write_config(
        tmp,
        bundle_dir,
        [
            {"name": "line", "kind": "video", "source": str(video), "loop": True, "fps": 8, "queue_size": 16},
            {"name": "trig", "kind": "url", "source": camera.url, "mode": "triggered"},
            # a region of interest outside the 64x64 frame: every frame of `bad` is ERROR, never judged
            {"name": "bad", "kind": "url", "source": camera.url, "mode": "triggered", "roi": [200, 200, 8, 8]},
        ],
        publish={"status_interval_s": INTERVAL},
        trigger={"enabled": True, "endpoint": trigger, "timeout_s": TRIGGER_TIMEOUT},
    )
    daemon = start_daemon(config, tmp)
    proc, url = start_bridge(
        tmp,
        "--connect", endpoint, "--trigger", trigger, "--status-interval", str(INTERVAL),
        "--trigger-timeout", str(TRIGGER_TIMEOUT),
    )  # fmt: skip
    try:
        yield {"tmp": tmp, "daemon": daemon, "bridge": proc, "url": url, "scene": scene}
        assert proc.poll() is None, bridge_log(tmp)[-3000:]  # the bridge outlives the daemon
        assert stop(proc) == 0, bridge_log(tmp)[-3000:]  # SIGTERM: a clean stop
        assert "Traceback" not in bridge_log(tmp), bridge_log(tmp)[-3000:]
    finally:
        stop(proc)
        stop(daemon)
        camera.stop()


def run(coro) -> Any:
    return asyncio.run(coro)


@pytest.mark.e2e
def test_address_space_typed_read_only_with_units_and_cameras_as_seen(line):
    async def body():
        client = Client(line["url"], timeout=10)
        await connected(client, line["bridge"], line["tmp"] / "bridge.log")
        try:
            idx = await client.get_namespace_index(NS)
            root = await client.nodes.objects.get_child(f"{idx}:Linewatch")
            alive = node(client, idx, "Linewatch.DaemonAlive")
            await until(alive.read_value, bool, 30, "DaemonAlive")
            cams = node(client, idx, "Linewatch.Cameras")
            await until(cams.read_value, lambda v: v == "bad,line,trig", 10, "all three cameras")
            children = {(await c.read_browse_name()).Name: c for c in await root.get_children()}
            assert set(children) == set(BRIDGE_TYPES) | {"line", "trig", "bad"}
            for name, kind in BRIDGE_TYPES.items():
                assert await children[name].read_data_type_as_variant_type() == kind, name
            for cam in ("line", "trig", "bad"):
                obj = children[cam]
                assert await obj.read_node_class() == ua.NodeClass.Object
                vars_ = {(await c.read_browse_name()).Name: c for c in await obj.get_children()}
                assert set(vars_) == set(CAMERA_TYPES) | {"Inspect"}, cam
                for name, kind in CAMERA_TYPES.items():
                    assert await vars_[name].read_data_type_as_variant_type() == kind, (cam, name)
                    level = await vars_[name].read_attribute(ua.AttributeIds.AccessLevel)
                    assert level.Value.Value & ua.AccessLevel.CurrentWrite.mask == 0, (cam, name)
            area = node(client, idx, "line.LargestDefectArea")
            eu = await (await area.get_child("0:EngineeringUnits")).read_value()
            assert eu.DisplayName.Text == "px" and eu.UnitId == -1
            codes = await (await node(client, idx, "line.VerdictCode").get_child("0:EnumStrings")).read_value()
            assert [t.Text for t in codes] == ["OK", "NOK", "ERROR"]
            # clients cannot write: the PLC reads the daemon's verdicts, it never sets them
            for path, variant in (
                ("trig.Verdict", ua.Variant("OK", V.String)),
                ("Linewatch.Heartbeat", ua.Variant(7, V.UInt32)),
            ):
                with pytest.raises(ua.UaStatusCodeError):
                    await node(client, idx, path).write_value(ua.DataValue(variant))
            assert await node(client, idx, "trig.Verdict").read_value() != "OK"
            args = await (await node(client, idx, "trig.Inspect").get_child("0:OutputArguments")).read_value()
            assert [a.Name for a in args] == ["Verdict", "ImageScore", "Seq", "Error"]
        finally:
            await client.disconnect()

    run(body())


@pytest.mark.e2e
def test_data_changes_follow_the_video_camera_result_by_result(line):
    async def body():
        client = Client(line["url"], timeout=10)
        await connected(client, line["bridge"], line["tmp"] / "bridge.log")
        try:
            idx = await client.get_namespace_index(NS)
            names = ("Seq", "Verdict", "VerdictCode", "ImageScore", "DefectCount")
            nodes = {name: node(client, idx, f"line.{name}") for name in names}
            handler = Changes({n.nodeid: name for name, n in nodes.items()})
            sub = await client.create_subscription(20, handler)
            await sub.subscribe_data_change(list(nodes.values()), queuesize=100)
            start = await nodes["Seq"].read_value()
            await until(lambda: asyncio.sleep(0, handler.values("Seq")), lambda s: len(s) >= 8, 20, "8 results")
            await sub.delete()
            seqs = [s for s in handler.values("Seq") if s > start]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs  # one change per result, no gaps
            verdicts = handler.values("Verdict")
            assert {"OK", "NOK"} <= set(verdicts) and "ERROR" not in verdicts, verdicts
            # read back consistently: the code and score agree with the verdict of the same result
            values = [await nodes[n].read_value() for n in names]
            seq, verdict, code, score, defects = values
            assert (verdict, code) in (("OK", 0), ("NOK", 1)) and (score > 0.5) == (verdict == "NOK"), values
            assert (defects > 0) == (verdict == "NOK")
            counts = [await node(client, idx, f"line.{n}").read_value() for n in ("OkCount", "NokCount", "ErrorCount")]
            assert counts[2] == 0 and counts[0] > 0 and counts[1] > 0
            assert await node(client, idx, "line.SeqGaps").read_value() == 0
            assert await node(client, idx, "line.CameraState").read_value() == "online"
            assert await node(client, idx, "line.CalibrationVersion").read_value() >= 1
            assert len(await node(client, idx, "line.ModelId").read_value()) == 12
            frame_time = await node(client, idx, "line.FrameTime").read_value()
            assert abs(frame_time.timestamp() - time.time()) < 10
        finally:
            await client.disconnect()

    run(body())


@pytest.mark.e2e
def test_inspect_returns_the_verdict_and_error_when_the_part_cannot_be_inspected(line):
    async def body():
        client = Client(line["url"], timeout=10)  # longer than --trigger-timeout + the bridge's 1 s margin
        await connected(client, line["bridge"], line["tmp"] / "bridge.log")
        try:
            idx = await client.get_namespace_index(NS)
            line["scene"]["frame"] = grey()
            verdict, score, seq, error = await call_inspect(client, idx, "trig", "P-001")
            assert (verdict, error) == ("OK", "") and 0 <= score < 0.5 and seq >= 1
            line["scene"]["frame"] = with_white_square()
            await asyncio.sleep(0.3)
            verdict, score, seq2, error = await call_inspect(client, idx, "trig", "P-002")
            assert (verdict, error) == ("NOK", "") and score > 0.5 and seq2 == seq + 1
            # the published result reaches the variables too
            part = node(client, idx, "trig.PartId")
            await until(part.read_value, lambda v: v == "P-002", 5, "trig.PartId")
            assert await node(client, idx, "trig.VerdictCode").read_value() == 1
            # a frame that cannot be judged: ERROR with the reason, no score; never OK
            verdict, score, seq, error = await call_inspect(client, idx, "bad", "P-003")
            assert verdict == "ERROR" and math.isnan(score) and seq >= 1 and "roi" in error, (verdict, error)
            code = node(client, idx, "bad.VerdictCode")
            await until(code.read_value, lambda v: v == 2, 5, "bad.VerdictCode ERROR")
            assert "roi" in await node(client, idx, "bad.Error").read_value()
            assert math.isnan(await node(client, idx, "bad.ImageScore").read_value())
            # a part id the daemon refuses: ERROR with its code, no result
            verdict, score, seq, error = await call_inspect(client, idx, "trig", "bad\npart")
            assert (verdict, seq) == ("ERROR", 0) and error.startswith("bad_request") and math.isnan(score)
        finally:
            await client.disconnect()

    run(body())


@pytest.mark.e2e
def test_node_opcua_client_reads_a_variable_and_calls_inspect(line):
    assert shutil.which("node"), "node is not installed (apt-get install nodejs npm)"
    assert (NODE_MODULES / "node-opcua-client").is_dir(), (
        f"node-opcua-client not found in {NODE_MODULES}: npm install --prefix {NODE_MODULES.parent} "
        "node-opcua-client@2.186.4 (or set LINEWATCH_NODE_OPCUA to its node_modules)"
    )
    script = line["tmp"] / "client.js"
    script.write_text(
        """
const { OPCUAClient, AttributeIds, DataType } = require("node-opcua-client");
(async () => {
  const client = OPCUAClient.create({ endpointMustExist: false, connectionStrategy: { maxRetry: 3 } });
  await client.connect(process.argv[2]);
  const session = await client.createSession();
  const ns = (await session.readNamespaceArray()).indexOf("urn:linewatch:inspection");
  const alive = await session.read({ nodeId: `ns=${ns};s=Linewatch.DaemonAlive`, attributeId: AttributeIds.Value });
  const res = await session.call({ objectId: `ns=${ns};s=trig`, methodId: `ns=${ns};s=trig.Inspect`,
    inputArguments: [{ dataType: DataType.String, value: "NODE-1" }] });
  console.log("RESULT " + JSON.stringify({ ns, alive: alive.value.value, status: res.statusCode.name,
    out: res.outputArguments.map((v) => v.value) }));
  await session.close();
  await client.disconnect();
})().catch((e) => { console.error(e); process.exit(1); });
"""
    )
    line["scene"]["frame"] = grey()
    env = dict(os.environ, NODE_PATH=str(NODE_MODULES))
    done = subprocess.run(["node", str(script), line["url"]], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    got = json.loads(next(ln[7:] for ln in done.stdout.splitlines() if ln.startswith("RESULT ")))
    verdict, score, seq, error = got["out"]
    assert got["alive"] is True and got["status"] == "Good" and got["ns"] >= 2, got
    assert (verdict, error) == ("OK", "") and 0 <= score < 0.5, got
    assert seq[1] >= 1 if isinstance(seq, list) else seq >= 1  # node-opcua gives a UInt64 as [high, low]


@pytest.mark.e2e
def test_the_python_client_in_plc_md_runs_as_written(line):
    import re

    text = (ROOT / "docs" / "PLC.md").read_text()
    match = re.search(r"<!-- example: opcua client -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/PLC.md lost its marked client example"
    code = match.group(1)
    for old, new in (("asyncio.run(main())", f"asyncio.run(main({line['url']!r}, 'trig'))"), ("sleep(10)", "sleep(1)")):
        assert old in code, old
        code = code.replace(old, new)
    assert sum(1 for text_line in code.splitlines() if text_line.strip()) <= 22  # the "20-line client"
    script = line["tmp"] / "plc_example.py"
    script.write_text(code)

    async def ready():  # the example expects a running line: the bridge listening, the daemon and `trig` seen
        client = Client(line["url"], timeout=10)
        await connected(client, line["bridge"], line["tmp"] / "bridge.log")
        try:
            idx = await client.get_namespace_index(NS)
            await until(node(client, idx, "Linewatch.DaemonAlive").read_value, bool, 30, "DaemonAlive")
            await until(node(client, idx, "Linewatch.Cameras").read_value, lambda v: "trig" in v, 10, "camera trig")
        finally:
            await client.disconnect()

    asyncio.run(ready())
    line["scene"]["frame"] = grey()
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "daemon alive: True" in done.stdout and "PART-0001: OK " in done.stdout, done.stdout
    assert "trig.Seq" in done.stdout and "Linewatch.DaemonAlive True" in done.stdout, done.stdout


@pytest.mark.e2e
def test_a_stopped_daemon_shows_within_three_status_intervals_and_inspect_answers_error(line):
    async def body():
        client = Client(line["url"], timeout=10)
        await connected(client, line["bridge"], line["tmp"] / "bridge.log")
        try:
            idx = await client.get_namespace_index(NS)
            names = ("DaemonAlive", "Heartbeat", "LastStatusTime", "BridgeState")
            nodes = {n: node(client, idx, f"Linewatch.{n}") for n in names}
            handler = Changes({n.nodeid: name for name, n in nodes.items()})
            sub = await client.create_subscription(20, handler)
            await sub.subscribe_data_change(list(nodes.values()), queuesize=1000)
            await until(lambda: asyncio.sleep(0, handler.values("Heartbeat")), lambda v: len(v) >= 4, 10, "beats")
            assert await nodes["DaemonAlive"].read_value() is True
            stopping = time.monotonic()
            assert await asyncio.to_thread(stop, line["daemon"]) == 0, daemon_log(line["tmp"])[-3000:]
            gone = time.monotonic()

            def flips_seen():
                return asyncio.sleep(
                    0, [t for n, v, t in handler.seen if n == "DaemonAlive" and not v and t > stopping]
                )

            flips = await until(flips_seen, bool, 10, "a data change DaemonAlive false")
            seen = flips[0]
            last_status = await nodes["LastStatusTime"].read_value()
            flipped = (await nodes["DaemonAlive"].read_data_value()).SourceTimestamp
            # the bridge's own clock: the flip came within 3 status intervals of the last status it heard
            assert 0 < (flipped - last_status).total_seconds() <= 3 * INTERVAL, (flipped, last_status)
            assert seen - gone <= 3 * INTERVAL + 1.0  # and the client saw it promptly (1 s for a loaded CI box)
            assert await nodes["BridgeState"].read_value() == "daemon_lost"
            beats = await nodes["Heartbeat"].read_value()
            await asyncio.sleep(4 * INTERVAL)
            assert await nodes["Heartbeat"].read_value() == beats  # stale heartbeat
            assert await node(client, idx, "line.Alive").read_value() is False
            assert await node(client, idx, "line.CameraState").read_value() == "stale"
            t0 = time.monotonic()
            verdict, score, seq, error = await call_inspect(client, idx, "trig", "P-after-stop")
            assert (verdict, seq) == ("ERROR", 0) and "no reply" in error and math.isnan(score), error
            assert time.monotonic() - t0 < TRIGGER_TIMEOUT + bridge.INSPECT_MARGIN_S + 2
            await sub.delete()
        finally:
            await client.disconnect()

    run(body())


# --- security --------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_sign_encrypt_with_certificate_and_users_refuses_wrong_passwords_and_plain_clients(tmp_path):
    certs, users = tmp_path / "pki", tmp_path / "users"
    cli = [sys.executable, "-m", "linewatch.cli", "bridge", "opcua"]
    made = subprocess.run([*cli, "--make-cert", str(certs)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert (certs / sec.KEY_FILE).stat().st_mode & 0o077 == 0
    for name, password in (("plc1", "correct horse battery"), ("scada", "another-secret-9")):
        added = subprocess.run(
            [*cli, "--users", str(users), "--add-user", name], input=password + "\n",
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
    text = users.read_text()
    assert "correct horse" not in text and text.count(":pbkdf2-sha256$") == 2 and users.stat().st_mode & 0o077 == 0
    proc, url = start_bridge(
        tmp_path,
        "--connect", f"tcp://127.0.0.1:{free_port()}", "--security", "sign-encrypt",
        "--cert", str(certs / sec.CERT_FILE), "--key", str(certs / sec.KEY_FILE), "--users", str(users),
    )  # fmt: skip

    async def secure_client(user: str | None, password: str | None) -> Client:
        client = Client(url, timeout=10)
        key, cert = tmp_path / "client_key.pem", tmp_path / "client_cert.der"
        await setup_self_signed_certificate(
            key, cert, "urn:linewatch:test-client", "localhost", [ExtendedKeyUsageOID.CLIENT_AUTH], {}
        )
        client.application_uri = "urn:linewatch:test-client"
        await client.set_security(
            SecurityPolicyBasic256Sha256, str(cert), str(key),
            server_certificate=str(certs / sec.CERT_FILE), mode=ua.MessageSecurityMode.SignAndEncrypt,
        )  # fmt: skip
        if user is not None:
            client.set_user(user)
            client.set_password(password or "")
        return client

    async def body():
        good = await secure_client("plc1", "correct horse battery")
        await connected(good, proc, tmp_path / "bridge.log")
        try:
            idx = await good.get_namespace_index(NS)
            assert await node(good, idx, "Linewatch.BridgeState").read_value() == "waiting"  # no daemon here
            assert await node(good, idx, "Linewatch.DaemonAlive").read_value() is False
            with pytest.raises(ua.UaStatusCodeError):  # logged in, still read-only
                await node(good, idx, "Linewatch.DaemonAlive").write_value(ua.DataValue(ua.Variant(True, V.Boolean)))
            endpoints = await good.get_endpoints()
            assert {(e.SecurityPolicyUri.rsplit("#", 1)[-1], e.SecurityMode) for e in endpoints} == {
                ("Basic256Sha256", ua.MessageSecurityMode.SignAndEncrypt)
            }
        finally:
            await good.disconnect()
        for user, password in (("plc1", "wrong password"), ("nobody", "correct horse battery"), (None, None)):
            bad = await secure_client(user, password)
            with pytest.raises(ua.UaStatusCodeError) as err:  # BadUserAccessDenied / BadIdentityTokenRejected
                await bad.connect()
            assert err.value.code in (ua.StatusCodes.BadUserAccessDenied, ua.StatusCodes.BadIdentityTokenRejected)
            await bad.disconnect()
        plain = Client(url, timeout=5)  # no encryption at all: no endpoint serves it
        with pytest.raises(Exception):
            await plain.connect()
        await plain.disconnect()

    try:
        run(body())
        assert proc.poll() is None, bridge_log(tmp_path)[-3000:]
        assert "login refused for user 'plc1'" in bridge_log(tmp_path)
        assert stop(proc) == 0, bridge_log(tmp_path)[-3000:]
    finally:
        stop(proc)


@pytest.mark.e2e
def test_security_none_beyond_loopback_and_incomplete_security_exit_2_with_a_clear_message(tmp_path):
    cli = [sys.executable, "-m", "linewatch.cli", "bridge", "opcua"]
    cases = [
        (["--listen", "opc.tcp://0.0.0.0:4840"], "loopback only"),
        (["--listen", "opc.tcp://192.168.10.5:4840", "--security", "none"], "loopback only"),
        (["--listen", "opc.tcp://0.0.0.0:4840", "--security", "sign-encrypt"], "needs --cert, --key, --users"),
        (["--listen", "http://127.0.0.1:4840"], "expected opc.tcp://HOST:PORT"),
        (["--users", str(tmp_path / "u")], "--users needs --security sign-encrypt"),
    ]
    for args, message in cases:
        done = subprocess.run([*cli, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and message in done.stderr, (args, done.returncode, done.stderr)


@pytest.mark.unit
def test_users_file_holds_hashes_only_and_refuses_plain_text(tmp_path):
    path = tmp_path / "users"
    assert sec.add_user(path, "plc1", "s3cret-pass") is True
    assert sec.add_user(path, "plc1", "new-pass-123") is False  # replaced, not duplicated
    users = sec.load_users(path)
    assert list(users) == ["plc1"] and sec.verify_password("new-pass-123", users["plc1"])
    assert not sec.verify_password("s3cret-pass", users["plc1"]) and not sec.verify_password("", users["plc1"])
    assert not sec.verify_password("x", "pbkdf2-sha256$notanumber$$")
    path.write_text("plc2:hunter2hunter2\n")
    with pytest.raises(ConfigError, match="plain-text passwords are refused"):
        sec.load_users(path)
    with pytest.raises(ConfigError, match="at least 8"):
        sec.add_user(tmp_path / "other", "plc3", "short")
    with pytest.raises(ConfigError, match="no users"):
        (tmp_path / "empty").write_text("# nobody yet\n")
        sec.load_users(tmp_path / "empty")


@pytest.mark.unit
def test_an_error_result_maps_to_error_never_ok_and_without_a_score():
    header = {"verdict": "ERROR", "image_score": None, "error": "camera read failed", "regions": [], "seq": 3}
    values = bridge.result_values(header)
    assert (values["Verdict"], values["VerdictCode"], values["Error"]) == ("ERROR", 2, "camera read failed")
    assert math.isnan(values["ImageScore"]) and values["DefectCount"] == 0
    assert bridge.result_values({"verdict": "maybe"})["VerdictCode"] == 2  # an unknown verdict is not a pass
    nok = bridge.result_values(
        {"verdict": "NOK", "image_score": 0.9, "defect_regions": 1,
         "regions": [{"area": 30, "defect": True}, {"area": 50, "defect": False}]}
    )  # fmt: skip
    assert (nok["VerdictCode"], nok["DefectCount"], nok["LargestDefectArea"], nok["Error"]) == (1, 1, 30, "")
