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
