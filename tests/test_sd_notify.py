"""sd_notify over a real datagram socket: delivered while read, dropped (not blocking) when the queue is full."""

from __future__ import annotations

import socket
import time

import pytest

from linewatch.line.systemd_notify import SystemdNotifier
from tests.helpers import fill_queue

pytestmark = pytest.mark.integration


def test_messages_arrive_and_a_full_queue_drops_instead_of_blocking(tmp_path):
    path = str(tmp_path / "notify.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    notifier = SystemdNotifier(path)
    assert notifier.notify("READY=1")
    assert receiver.recv(100) == b"READY=1"
    queued = fill_queue(path)
    t0 = time.monotonic()
    assert not notifier.notify("STATUS=lost") and not notifier.notify("STATUS=lost")
    assert time.monotonic() - t0 < 1.0 and notifier.dropped == 2
    assert [receiver.recv(100) for _ in range(queued)] == [b"FILL"] * queued  # the queue is intact
    assert notifier.notify("WATCHDOG=1") and receiver.recv(100) == b"WATCHDOG=1"


def test_abstract_socket_address(tmp_path):
    name = f"linewatch-test-{time.monotonic_ns()}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + name)
    assert SystemdNotifier("@" + name).notify("WATCHDOG=1")
    assert receiver.recv(100) == b"WATCHDOG=1"


def test_without_notify_socket_it_is_off(monkeypatch, tmp_path):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not SystemdNotifier().enabled and not SystemdNotifier().notify("READY=1")
    gone = SystemdNotifier(str(tmp_path / "missing.sock"))  # a path nobody listens on: off, with a warning
    assert not gone.enabled


def test_startup_extender_asks_for_more_time_while_the_step_runs_and_stops_after(tmp_path):
    from linewatch.line.systemd_notify import StartupExtender

    path = str(tmp_path / "notify.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(0.05)
    notifier = SystemdNotifier(path)
    with StartupExtender(notifier, step_s=0.1, limit_s=10):
        time.sleep(0.35)  # a slow load: asked at once, then every step
    time.sleep(0.3)
    got = []
    while True:
        try:
            got.append(receiver.recv(100))
        except socket.timeout:
            break
    assert got and set(got) == {b"EXTEND_TIMEOUT_USEC=200000"}  # each time for 2 steps from now
    assert 3 <= len(got) <= 5
    with StartupExtender(notifier, step_s=0.05, limit_s=0.12) as capped:  # a hung load is not extended forever
        time.sleep(0.5)
    assert 2 <= capped.sent <= 4
