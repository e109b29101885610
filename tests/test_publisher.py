"""The result publisher over real sockets: it never blocks on a stalled subscriber, losses are counted by sequence
number, status is the life bit, restarts are told apart from losses, and keyless binds stay on loopback."""

from __future__ import annotations

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
    assert pub.counters() == {"sent": 199, "status_sent": 0, "dropped": 1}
    stalled.close(linger=0)
    ctx.term()


def test_binding_rules():
    with pytest.raises(ConfigError, match="CURVE"):
        ResultPublisher("tcp://0.0.0.0:5599")
    with ResultPublisher("tcp://127.0.0.1:*") as first:
        with pytest.raises(ConfigError, match="cannot bind"):
            ResultPublisher(first.endpoint)
