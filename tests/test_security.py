"""CURVE on real sockets: the allowed client gets results and trigger replies; a client with another key, with the
wrong server key, or without CURVE gets nothing. Plus the loopback rule, key files and `linewatch keygen`."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import zmq
import zmq.auth

from linewatch.errors import ConfigError
from linewatch.line.publisher import ResultPublisher
from linewatch.line.trigger import TriggerServer
from linewatch.protocol.client import Subscriber, TriggerClient, TriggerError, TriggerTimeout
from linewatch.protocol.curve import (
    CurveConfig,
    apply_client_curve,
    check_bind_security,
    is_loopback_endpoint,
    load_key_pair,
    load_public_key,
)
from linewatch.protocol.wire import ResultHeader
from tests.helpers import result_header

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    for sub in ("server", "allowed", "clients", "stranger"):
        (root / sub).mkdir()
    zmq.auth.create_certificates(root / "server", "server")
    zmq.auth.create_certificates(root / "clients", "plc1")
    zmq.auth.create_certificates(root / "clients", "plc2")
    zmq.auth.create_certificates(root / "stranger", "stranger")
    for name in ("plc1", "plc2"):
        (root / "allowed" / f"{name}.key").write_bytes((root / "clients" / f"{name}.key").read_bytes())
    for secret in root.glob("*/*.key_secret"):  # zmq writes them with the umask's mode; ours are private
        secret.chmod(0o600)
    return root


def ok_header(camera: str, seq: int, part_id: str | None = None) -> ResultHeader:
    return result_header(camera, seq, "OK", 0.1, part_id=part_id, model_id="m")


def pairs(keys: Path):
    curve = CurveConfig.from_files(keys / "server" / "server.key_secret", keys / "allowed")
    return (
        curve,
        load_key_pair(keys / "clients" / "plc1.key_secret"),
        load_key_pair(keys / "stranger" / "stranger.key_secret"),
    )


@pytest.mark.integration
def test_only_the_allowed_key_receives_results(keys):
    curve, plc1, stranger = pairs(keys)
    wrong_server = load_key_pair(keys / "stranger" / "stranger.key_secret")[0]
    with ResultPublisher("tcp://127.0.0.1:*", curve=curve) as pub:
        subs = {
            "allowed": Subscriber(pub.endpoint, server_key=curve.server_public, client_keys=plc1),
            "other key": Subscriber(pub.endpoint, server_key=curve.server_public, client_keys=stranger),
            "wrong server key": Subscriber(pub.endpoint, server_key=wrong_server, client_keys=plc1),
            "plain": Subscriber(pub.endpoint),
        }
        counts = dict.fromkeys(subs, 0)
        deadline, seq = time.monotonic() + 1.5, 0
        while time.monotonic() < deadline:
            seq += 1
            pub.publish_result(ok_header("cam1", seq), None)
            pub.publish_status("cam1", {"state": "online"})
            for name, sub in subs.items():
                while sub.recv(0) is not None:
                    counts[name] += 1
            time.sleep(0.02)
        for sub in subs.values():
            sub.close()
    assert counts["allowed"] > 10
    assert counts["other key"] == counts["wrong server key"] == counts["plain"] == 0, counts


@pytest.mark.integration
def test_only_the_allowed_key_can_trigger(keys):
    curve, plc1, stranger = pairs(keys)
    calls = []

    def handler(camera, part_id):
        calls.append(part_id)
        future = Future()
        sent = ok_header(camera, len(calls), part_id).model_dump(mode="json")
        future.set_result((sent | {"publish_time": time.time(), "run_id": "0123456789ab"}, None))
        return future

    with TriggerServer("tcp://127.0.0.1:*", handler, curve).start() as server:
        with TriggerClient(server.endpoint, server_key=curve.server_public, client_keys=plc1) as ok:
            assert ok.inspect("cam1", "SECURE-1", timeout_s=3).part_id == "SECURE-1"
        with TriggerClient(server.endpoint, server_key=curve.server_public, client_keys=stranger) as bad:
            with pytest.raises(TriggerTimeout):
                bad.inspect("cam1", "INTRUDER", timeout_s=0.5)
        with TriggerClient(server.endpoint) as plain:
            with pytest.raises(TriggerTimeout):
                plain.inspect("cam1", "PLAIN", timeout_s=0.5)
    assert calls == ["SECURE-1"]


@pytest.mark.unit
@pytest.mark.parametrize(
    "endpoint, loopback",
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.0.0.1:*", True),
        ("tcp://127.1.2.3:5555", True),
        ("tcp://localhost:5555", True),
        ("tcp://[::1]:5555", True),
        ("tcp://lo:5555", True),
        ("ipc:///run/linewatch/results", True),
        ("inproc://results", True),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://*:5555", False),
        ("tcp://eth0:5555", False),
        ("tcp://192.168.10.5:5555", False),
        ("tcp://[::]:5555", False),
        ("tcp://line-pc.local:5555", False),
        ("127.0.0.1:5555", False),
    ],
)
def test_keyless_binds_stay_on_loopback(endpoint, loopback):
    assert is_loopback_endpoint(endpoint) is loopback
    check_bind_security(endpoint, curve_enabled=True, allow_insecure=False)
    check_bind_security(endpoint, curve_enabled=False, allow_insecure=True)
    if loopback:
        check_bind_security(endpoint, curve_enabled=False, allow_insecure=False)
    else:
        with pytest.raises(ConfigError, match="publish.endpoint"):
            check_bind_security(endpoint, False, False, key="publish.endpoint")


@pytest.mark.integration
def test_key_file_errors_name_the_file(keys, tmp_path):
    with pytest.raises(ConfigError, match="missing.key_secret"):
        CurveConfig.from_files(tmp_path / "missing.key_secret", keys / "allowed")
    with pytest.raises(ConfigError, match="only a public key"):
        CurveConfig.from_files(keys / "server" / "server.key", keys / "allowed")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no client public keys"):
        CurveConfig.from_files(keys / "server" / "server.key_secret", tmp_path / "empty")
    (tmp_path / "junk.key_secret").write_text("not a certificate")
    with pytest.raises(ConfigError, match="junk.key_secret"):
        load_key_pair(tmp_path / "junk.key_secret")
    public, _ = zmq.auth.load_certificate(keys / "server" / "server.key")
    assert load_public_key(keys / "server" / "server.key") == public
    assert load_public_key(public.decode()) == public
    for bad in ("not-a-key", '"' * 40):
        with pytest.raises(ConfigError, match="key"):
            load_public_key(bad)


@pytest.mark.e2e
def test_keygen_command(tmp_path):
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "linewatch.cli", "keygen", str(tmp_path / "k"), "--name", "plc7"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    public, secret = zmq.auth.load_certificate(tmp_path / "k" / "plc7.key_secret")
    assert secret and public.decode() in first.stdout
    assert zmq.auth.load_certificate(tmp_path / "k" / "plc7.key")[0] == public
    assert stat.S_IMODE((tmp_path / "k" / "plc7.key_secret").stat().st_mode) == 0o600
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "already exist" in again.stderr
    assert zmq.auth.load_certificate(tmp_path / "k" / "plc7.key_secret")[0] == public  # not overwritten


# --- fail closed: the ZAP handler gone, secret keys others can read, metrics beyond loopback ---------------------


def curve_trigger_server(curve: CurveConfig, **kwargs) -> TriggerServer:
    """Answers at once, except for camera "never" (the request stays outstanding)."""

    def handler(camera, part_id):
        future = Future()
        if camera != "never":
            sent = ok_header(camera, 1, part_id).model_dump(mode="json")
            future.set_result((sent | {"publish_time": time.time(), "run_id": "0123456789ab"}, None))
        return future

    return TriggerServer("tcp://127.0.0.1:*", handler, curve, **kwargs).start()


@pytest.mark.integration
def test_with_curve_the_pending_cap_is_per_client_key(keys):
    """Two PLCs on one host (same address): with CURVE each key has its own share of the pending slots."""
    curve, plc1, _ = pairs(keys)
    plc2 = load_key_pair(keys / "clients" / "plc2.key_secret")
    ctx = zmq.Context()
    with curve_trigger_server(curve, timeout_s=30) as server:
        flooder = ctx.socket(zmq.DEALER)
        flooder.setsockopt(zmq.LINGER, 0)
        apply_client_curve(flooder, curve.server_public, plc1)
        flooder.connect(server.endpoint)
        try:
            n = 1024 + 10  # more than every slot there is
            for i in range(n):
                flooder.send_multipart([b"", b'{"camera": "never", "part_id": "F-%d"}' % i])
            busy = 0
            while flooder.poll(500):
                assert json.loads(flooder.recv_multipart()[1])["code"] == "busy"
                busy += 1
            with TriggerClient(server.endpoint, server_key=curve.server_public, client_keys=plc2) as other:
                assert other.inspect("cam1", "PLC2-1", timeout_s=3).part_id == "PLC2-1"
            assert busy == n - server.max_pending_per_client and server.pending == server.max_pending_per_client
            with TriggerClient(server.endpoint, server_key=curve.server_public, client_keys=plc1) as again:
                with pytest.raises(TriggerError, match="busy"):  # a new connection is still the same client
                    again.inspect("cam1", "PLC1-NEW", timeout_s=3)
        finally:
            flooder.close()
            ctx.term()


@pytest.mark.integration
def test_curve_fails_closed_when_the_zap_handler_is_gone(keys):
    """Without a ZAP handler libzmq would admit any CURVE key; with zap_enforce_domain it admits none."""
    curve, plc1, stranger = pairs(keys)
    with curve_trigger_server(curve) as server, ResultPublisher("tcp://127.0.0.1:*", curve=curve) as pub:
        with TriggerClient(server.endpoint, server_key=curve.server_public, client_keys=plc1) as ok:
            assert ok.inspect("cam1", "BEFORE", timeout_s=3).part_id == "BEFORE"
        server._auth.stop()  # the handler goes away (its thread ended, its socket closed)
        pub._auth.stop()
        for keys_ in (stranger, plc1):
            with TriggerClient(server.endpoint, server_key=curve.server_public, client_keys=keys_) as client:
                with pytest.raises(TriggerTimeout):
                    client.inspect("cam1", "NO-ZAP", timeout_s=0.5)
        with Subscriber(pub.endpoint, server_key=curve.server_public, client_keys=stranger) as sub:
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                pub.publish_status("cam1", {"state": "online"})
                assert sub.recv(0.02) is None
        assert server.health() == pub.health() == "CURVE authenticator (ZAP) thread has died"


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_zap_thread_that_dies_shows_in_health(keys):
    curve, plc1, _ = pairs(keys)
    with curve_trigger_server(curve) as server:

        async def broken(msg):  # a bug in the handler: its thread ends with the exception
            raise RuntimeError("ZAP handler bug")

        server._auth.handle_zap_message = broken
        with TriggerClient(server.endpoint, server_key=curve.server_public, client_keys=plc1) as client:
            with pytest.raises(TriggerTimeout):  # nobody answers the handshake: no request gets through
                client.inspect("cam1", "DEAD-ZAP", timeout_s=0.5)
        assert server.health() == "CURVE authenticator (ZAP) thread has died"


@pytest.mark.integration
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660], ids=oct)
def test_a_secret_key_others_can_read_is_refused(keys, tmp_path, mode):
    secret = tmp_path / "server.key_secret"
    secret.write_bytes((keys / "server" / "server.key_secret").read_bytes())
    secret.chmod(mode)
    with pytest.raises(ConfigError, match=f"{secret}.*mode {mode:04o}.*chmod 600 {secret}"):
        CurveConfig.from_files(secret, keys / "allowed")
    with pytest.raises(ConfigError, match="chmod 600"):
        load_key_pair(secret)  # the client side (`linewatch watch --client-key-file`) too
    secret.chmod(0o600)
    assert CurveConfig.from_files(secret, keys / "allowed").server_secret == load_key_pair(secret)[1]


@pytest.mark.integration
def test_keygen_creates_the_secret_private_not_fixed_afterwards(tmp_path, monkeypatch):
    """The secret file is born 0600 (umask 0077), not written with the umask's 0644 and chmod-ed later: a chmod
    that does nothing here shows the mode the file was created with."""
    from argparse import Namespace

    from linewatch.protocol.curve import cli_keygen

    monkeypatch.setattr(os, "chmod", lambda *args, **kwargs: None)
    previous = os.umask(0o022)
    try:
        assert cli_keygen(Namespace(dir=str(tmp_path / "k"), name="plc8", force=False)) == 0
        assert os.umask(0o022) == 0o022  # the process umask is restored
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "k" / "plc8.key_secret").stat().st_mode) == 0o600
    monkeypatch.undo()
    secret = tmp_path / "k" / "plc8.key_secret"
    secret.chmod(0o644)  # --force replaces a leaked key with a private one, not with the old file's mode
    previous = os.umask(0o022)
    try:
        assert cli_keygen(Namespace(dir=str(tmp_path / "k"), name="plc8", force=True)) == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "k" / "plc8.key").stat().st_mode) == 0o644  # the public one is for sharing


@pytest.mark.integration
def test_metrics_follow_the_loopback_rule_and_report_their_thread():
    from urllib.request import urlopen

    from linewatch.line.prometheus import DaemonMetrics

    with pytest.raises(ConfigError, match="metrics.host '0.0.0.0'.*allow_insecure_bind"):
        DaemonMetrics().serve("0.0.0.0", 0)
    with pytest.raises(ConfigError, match="metrics.host"):
        DaemonMetrics().serve("", 0)  # every interface
    metrics = DaemonMetrics()
    assert metrics.health() is None  # not serving is not a failure
    port = metrics.serve("127.0.0.1", 0)
    try:
        metrics.reloads.labels("ok").inc()
        assert "linewatch_reloads_total" in urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert metrics.health() is None
        metrics._server.shutdown()  # the HTTP thread ends
        deadline = time.monotonic() + 5
        while metrics.health() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert metrics.health() == "metrics HTTP thread has died"
    finally:
        metrics.close()
    opened = DaemonMetrics(allow_insecure_bind=True)  # the operator's explicit choice
    port = opened.serve("0.0.0.0", 0)
    try:
        assert urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).status == 200
    finally:
        opened.close()
