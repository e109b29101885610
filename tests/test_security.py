"""CURVE on real sockets: the allowed client gets results and trigger replies; a client with another key, with the
wrong server key, or without CURVE gets nothing. Plus the loopback rule, key files and `linewatch keygen`."""

from __future__ import annotations

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
from linewatch.protocol.client import Subscriber, TriggerClient, TriggerTimeout
from linewatch.protocol.curve import (
    CurveConfig,
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
    zmq.auth.create_certificates(root / "stranger", "stranger")
    (root / "allowed" / "plc1.key").write_bytes((root / "clients" / "plc1.key").read_bytes())
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
