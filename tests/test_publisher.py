"""The result publisher over real sockets: it never blocks on a stalled subscriber, losses are counted by sequence
number, status is the life bit, restarts are told apart from losses, and keyless binds stay on loopback."""

from __future__ import annotations

import os
import socket
import struct
import time

import numpy as np
import pytest
import zmq

from linewatch.errors import ConfigError
from linewatch.line.publisher import ResultPublisher
from linewatch.protocol.client import Subscriber
from linewatch.protocol.wire import ResultHeader, encode_mask_png
from tests.helpers import result_header

pytestmark = pytest.mark.integration


def make_header(camera: str, seq: int, mask_size=None) -> ResultHeader:
    return result_header(
        camera,
        seq,
        "NOK",
        0.9,
        regions=[{"bbox": [1, 2, 3, 4], "area": 12, "peak": 0.9}],
        mask=None if mask_size is None else {"width": mask_size[0], "height": mask_size[1]},
    )


def connect(pub: ResultPublisher, sub: Subscriber, camera: str = "cam1") -> None:
    """Slow joiner: publish status until the subscriber hears it."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        pub.publish_status(camera, {"state": "online"})
        if sub.recv(0.05) is not None:
            return
    raise AssertionError("subscriber never connected")


def test_publishing_never_blocks_on_a_stalled_subscriber_and_losses_are_counted():
    n = 3000
    mask = np.random.default_rng(0).random((96, 96)) > 0.5  # noise: a PNG of ~1.5 KB that does not compress away
    png = encode_mask_png(mask)
    ctx = zmq.Context()
    with ResultPublisher("tcp://127.0.0.1:*", hwm=20) as pub:
        stalled = ctx.socket(zmq.SUB)  # subscribes and never reads
        stalled.setsockopt(zmq.RCVHWM, 1)
        stalled.setsockopt(zmq.RCVBUF, 4096)
        stalled.setsockopt(zmq.LINGER, 0)
        stalled.setsockopt(zmq.SUBSCRIBE, b"")
        stalled.connect(pub.endpoint)
        with Subscriber(pub.endpoint, "cam1", rcvhwm=50) as late_reader:
            connect(pub, late_reader)
            while late_reader.recv(0.1) is not None:
                pass
            durations = np.empty(n)
            for seq in range(1, n + 1):
                header = make_header("cam1", seq, (96, 96))
                t0 = time.perf_counter()
                assert pub.publish_result(header, png)
                durations[seq - 1] = time.perf_counter() - t0
            # nobody read during the burst: most of it was dropped for both subscribers, none of it waited
            assert durations.max() < 0.05, durations.max()
            assert np.median(durations) < 0.001, np.median(durations)
            assert pub.sent == n and pub.dropped == 0
            got = []
            while (msg := late_reader.recv(0.3)) is not None:
                got.append(msg.seq)
            assert 0 < len(got) < n and got == sorted(got)
            for _ in range(2):  # trailing losses are counted once a status has passed after the burst
                pub.publish_status("cam1", {"state": "online", "results": n})
                assert late_reader.recv(2.0) is not None
            track = late_reader.tracks["cam1"]
            assert track.received == len(got)
            assert track.missed == n - len(got) and track.last_seq == n
        stalled.close()
    ctx.term()


def test_status_is_the_life_bit():
    with ResultPublisher("tcp://127.0.0.1:*") as pub, Subscriber(pub.endpoint) as sub:
        assert not sub.alive("cam1", 10.0)
        connect(pub, sub)
        assert pub.publish_status("cam2", {"state": "offline", "fps": float("nan"), "latency_ms": {"p50": 1.5}})
        msg = sub.recv(2.0)
        assert msg.kind == "status" and msg.camera == "cam2" and msg.topic == "linewatch/cam2/status"
        assert msg.header["state"] == "offline" and msg.header["fps"] is None
        assert msg.header["latency_ms"] == {"p50": 1.5} and msg.header["run_id"] == pub.run_id
        assert sub.last_status("cam2")["state"] == "offline"
        assert sub.alive("cam1", 0.5) and sub.alive("cam2", 0.5) and not sub.alive("cam3", 0.5)
        time.sleep(0.3)
        assert not sub.alive("cam2", 0.2)
        with pytest.raises(ValueError, match="reserved"):
            pub.publish_status("cam1", {"camera": "other"})


def test_a_restart_is_not_counted_as_lost_results():
    pub = ResultPublisher("tcp://127.0.0.1:*")
    endpoint = pub.endpoint
    with Subscriber(endpoint, "cam1") as sub:
        connect(pub, sub)
        for seq in (1, 2, 4):  # seq 3 is lost
            pub.publish_result(make_header("cam1", seq), None)
        assert [sub.recv(2).seq for _ in range(3)] == [1, 2, 4]
        assert sub.missed == {"cam1": 1}
        pub.close()
        pub = ResultPublisher(endpoint)  # the daemon restarted: new run_id, seq from 1
        connect(pub, sub)
        pub.publish_result(make_header("cam1", 1), None)
        msg = sub.recv(2)
        while msg.kind != "result":
            msg = sub.recv(2)
        assert msg.seq == 1 and msg.header["run_id"] == pub.run_id
        assert sub.missed == {"cam1": 1} and sub.tracks["cam1"].restarts == 1
    pub.close()


def test_close_is_bounded_and_later_publishes_are_counted_as_dropped():
    pub = ResultPublisher("tcp://127.0.0.1:*", linger_ms=200)
    ctx = zmq.Context()
    stalled = ctx.socket(zmq.SUB)
    stalled.setsockopt(zmq.SUBSCRIBE, b"")
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.connect(pub.endpoint)
    time.sleep(0.2)
    for seq in range(1, 200):
        pub.publish_result(make_header("cam1", seq), b"")
    t0 = time.monotonic()
    pub.close()
    assert time.monotonic() - t0 < 5.0  # linger is bounded: close never hangs on a stalled subscriber
    assert pub.publish_result(make_header("cam1", 500), None) is None
    counters = pub.counters()
    assert {k: counters[k] for k in ("sent", "status_sent", "dropped")} == {"sent": 199, "status_sent": 0, "dropped": 1}
    assert counters["subscriptions_refused"] == 0
    stalled.close(linger=0)
    ctx.term()


def test_binding_rules():
    with pytest.raises(ConfigError, match="CURVE"):
        ResultPublisher("tcp://0.0.0.0:5599")
    with ResultPublisher("tcp://127.0.0.1:*") as first:
        with pytest.raises(ConfigError, match="cannot bind"):
            ResultPublisher(first.endpoint)


# --- what subscribers can make the daemon hold ------------------------------------------------------------------


class BareSubscriber:
    """A ZMTP 3.0 SUB peer on a plain TCP socket, as a hostile client would write one: it sends subscriptions as raw
    frames and keeps no copy of them (a real SUB socket stores each topic it subscribes to; for a 10 MiB topic that
    costs its own process about half a GiB)."""

    def __init__(self, endpoint: str):
        host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        greeting = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" + bytes(31)
        self.sock.sendall(greeting)
        theirs = b""
        while len(theirs) < len(greeting):  # libzmq may misread a READY that arrives before it has greeted
            theirs += self.sock.recv(len(greeting) - len(theirs))
        ready = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 3) + b"SUB"
        self.sock.sendall(b"\x04" + bytes([len(ready)]) + ready)

    @staticmethod
    def subscription_frame(topic: bytes) -> bytes:
        body = b"\x01" + topic
        head = b"\x00" + bytes([len(body)]) if len(body) < 256 else b"\x02" + struct.pack(">Q", len(body))
        return head + body

    def subscribe(self, topic: bytes) -> None:
        self.send(self.subscription_frame(topic))

    def send(self, frame: bytes) -> None:
        self.sock.sendall(frame)

    def close(self) -> None:
        self.sock.close()


def rss_mib() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def publish_until(pub: ResultPublisher, done, timeout_s: float = 10.0) -> None:
    """Keep the socket busy (as the daemon's status does) until `done()` or the timeout."""
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        pub.publish_status("cam1", {"state": "online"})
        time.sleep(0.02)


def test_a_10_mib_subscription_never_reaches_the_daemon():
    # built before measuring: this process's own 10 MiB buffers must not count as the daemon's growth
    frame = BareSubscriber.subscription_frame(b"linewatch/" + b"x" * (10 * 2**20))
    with ResultPublisher("tcp://127.0.0.1:*") as pub:
        before = rss_mib()
        attacker = BareSubscriber(pub.endpoint)
        try:
            attacker.send(frame)
        except OSError:
            pass  # the daemon may cut the connection before all of it is sent
        publish_until(pub, lambda: False, 1.5)
        grown = rss_mib() - before
        attacker.close()
        assert grown < 8, f"the daemon's memory grew by {grown:.0f} MiB"
        with Subscriber(pub.endpoint, "cam1") as sub:  # and the socket still serves
            connect(pub, sub)
            pub.publish_result(make_header("cam1", 1), None)
            assert sub.recv(2).seq == 1


def test_junk_subscriptions_are_refused_and_counted_while_a_subscriber_still_gets_results():
    with ResultPublisher("tcp://127.0.0.1:*", cameras=["cam1"]) as pub, Subscriber(pub.endpoint, "cam1") as sub:
        connect(pub, sub)
        junk = BareSubscriber(pub.endpoint)
        for i in range(5000):  # outside the topic root, and inside it for cameras this daemon does not have
            junk.subscribe(b"junk-%d" % i if i % 2 else b"linewatch/ghost%d/" % i)
        publish_until(pub, lambda: pub.counters()["subscriptions_refused"] >= 5000)
        counters = pub.counters()
        assert counters["subscriptions_refused"] == 5000 and counters["subscriptions"] == 1, counters
        for seq in (1, 2, 3):
            pub.publish_result(make_header("cam1", seq), None)
        assert [m.seq for m in sub.results(timeout_s=1)] == [1, 2, 3] and sub.missed == {"cam1": 0}
        # the everything-subscription and camera prefixes are taken, as a PUB socket would
        junk.subscribe(b"")
        junk.subscribe(b"linewatch/cam1/res")
        publish_until(pub, lambda: pub.counters()["subscriptions"] == 3)
        assert pub.counters()["subscriptions"] == 3
        junk.close()  # libzmq reports the leaver's topics as unsubscribed: only the real subscriber's remains
        publish_until(pub, lambda: pub.counters()["subscriptions"] == 1)
        assert pub.counters() | {"status_sent": 0} == {
            "sent": 3,
            "status_sent": 0,
            "dropped": 0,
            "subscriptions": 1,
            "subscriptions_refused": 5000,
        }
        assert pub.health() is None


def test_distinct_subscriptions_are_capped_when_the_cameras_are_not_known():
    with ResultPublisher("tcp://127.0.0.1:*", max_subscriptions=50) as pub:
        junk = BareSubscriber(pub.endpoint)
        for i in range(200):  # topics of the right shape, for cameras nobody has
            junk.subscribe(b"linewatch/cam%d/" % i)
        junk.subscribe(b"linewatch/cam1/resultX")  # can never match: refused even below the cap
        publish_until(pub, lambda: pub.counters()["subscriptions_refused"] >= 151)
        assert pub.counters()["subscriptions"] == 50 and pub.counters()["subscriptions_refused"] == 151
        junk.close()
