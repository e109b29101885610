"""The trigger server over real ROUTER/DEALER/REQ sockets. The handler stands in for the daemon: it answers
futures from a thread after a per-camera delay, like the inference worker does."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest
import zmq

from linewatch.errors import LinewatchError
from linewatch.line.trigger import TriggerServer
from linewatch.protocol.client import TriggerClient, TriggerError, TriggerTimeout
from linewatch.protocol.wire import decode_mask_png, encode_mask_png
from tests.helpers import result_header

pytestmark = pytest.mark.integration

MASK = np.zeros((24, 32), bool)
MASK[5:9, 10:20] = True


class LineStandIn:
    """handler(camera, part_id) -> Future, resolved later from another thread, as the daemon does."""

    def __init__(self, delays: dict[str, float | None]):
        self.delays = delays  # camera -> seconds until the result; None: never
        self.calls: list[tuple[str, str]] = []
        self.seq = 0
        self.fail_with: Exception | None = None
        self.wrong_part = False

    def __call__(self, camera: str, part_id: str) -> Future:
        if camera not in self.delays:
            raise LinewatchError(f"unknown camera {camera!r} (known: {', '.join(self.delays)})")
        self.calls.append((camera, part_id))
        future: Future = Future()
        delay = self.delays[camera]
        if delay is not None:
            threading.Timer(delay, self._finish, (future, camera, part_id)).start()
        return future

    def _finish(self, future: Future, camera: str, part_id: str) -> None:
        if self.fail_with is not None:
            future.set_exception(self.fail_with)
            return
        self.seq += 1
        header = result_header(
            camera,
            self.seq,
            "NOK",
            0.8,
            part_id="someone-else" if self.wrong_part else part_id,
            regions=[{"bbox": [10, 5, 10, 4], "area": 40, "peak": 0.8}],
            mask={"width": 32, "height": 24},
        )
        published = header.model_dump(mode="json") | {"publish_time": time.time(), "run_id": "0123456789ab"}
        future.set_result({"header": published, "mask": encode_mask_png(MASK)})


@pytest.fixture
def line():
    return LineStandIn({"cam1": 0.01, "slow": 0.6, "never": None})


@pytest.fixture
def server(line):
    srv = TriggerServer("tcp://127.0.0.1:*", line, timeout_s=1.0).start()
    yield srv
    srv.close()


def raw_dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def reply_of(sock: zmq.Socket, timeout_s: float = 2.0) -> tuple[dict, list[bytes]]:
    assert sock.poll(int(timeout_s * 1000)), "no reply"
    frames = sock.recv_multipart()
    return json.loads(frames[-2]), frames


def test_the_reply_carries_the_same_part_id_and_the_result(server, line):
    with TriggerClient(server.endpoint) as client:
        for part in ("A-0001", "A-0002", "Ü-3 with spaces"):
            msg = client.inspect("cam1", part, timeout_s=2)
            assert msg.part_id == part and msg.camera == "cam1" and msg.verdict == "NOK"
            assert msg.header["regions"][0]["bbox"] == [10, 5, 10, 4]
            np.testing.assert_array_equal(msg.mask_array() > 0, MASK)
    assert line.calls == [("cam1", "A-0001"), ("cam1", "A-0002"), ("cam1", "Ü-3 with spaces")]


def test_garbage_gets_error_replies_and_the_server_keeps_serving(server, line):
    ctx = zmq.Context()
    sock = raw_dealer(ctx, server.endpoint)
    cases = [
        ([b"", b"not json"], "bad_request"),
        ([b"", b"\xff\xfe\x00\x01binary junk"], "bad_request"),
        ([b"", b"[1, 2, 3]"], "bad_request"),
        ([b"", b""], "bad_request"),
        ([b"", b'{"camera": "cam1"}'], "bad_request"),
        ([b"", b'{"camera": "cam1", "part_id": 5}'], "bad_request"),
        ([b"", b'{"camera": "cam1", "part_id": ""}'], "bad_request"),
        ([b"", b'{"camera": "cam1", "part_id": "P", "request_id": {"x": 1}}'], "bad_request"),
        ([b"", b'{"camera": "cam1", "part_id": "P1"}', b'{"camera": "cam1", "part_id": "P2"}'], "bad_request"),
        ([b"", b"x" * 5000], "bad_request"),
        ([b"", b'{"camera": "cam9", "part_id": "P7", "request_id": 12}'], "unknown_camera"),
    ]
    try:
        for frames, code in cases:
            sock.send_multipart(frames)
            reply, got = reply_of(sock)
            assert got[0] == b"" and len(got) == 3 and got[2] == b"", got
            assert reply["ok"] is False and reply["code"] == code and reply["error"], (frames, reply)
        assert reply["part_id"] == "P7" and reply["request_id"] == 12 and "cam9" in reply["error"]
        # a DEALER without the empty delimiter, and ten frames of noise
        sock.send_multipart([b"{bad"])
        reply, got = reply_of(sock)
        assert len(got) == 2 and reply["code"] == "bad_request"
        sock.send_multipart([bytes(np.random.default_rng(1).integers(0, 256, 50, dtype=np.uint8))] * 10)
        assert reply_of(sock)[0]["code"] == "bad_request"
        # over the transport's size limit: libzmq drops that connection; the server goes on
        sock.send_multipart([b"", b"y" * 200_000])
        assert not sock.poll(300)
        # a REQ client (delimiter added by the socket) is served like any other
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(server.endpoint)
        req.send(b'{"camera": "cam1", "part_id": "REQ-1"}')
        assert req.poll(2000)
        frames = req.recv_multipart()
        assert len(frames) == 2 and json.loads(frames[0])["result"]["part_id"] == "REQ-1"
        req.close()
    finally:
        sock.close()
        ctx.term()
    with TriggerClient(server.endpoint) as client:
        assert client.inspect("cam1", "after-garbage").part_id == "after-garbage"
    assert server.errors["bad_request"] >= 12 and line.calls[-1] == ("cam1", "after-garbage")


def test_json_nested_too_deeply_is_a_bad_request_and_the_server_keeps_serving(server, line):
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(server.endpoint)
    try:
        for body in (b"[" * 3000, b'{"":' * 1000):  # both under the 4 KiB limit
            req.send(body)
            assert req.poll(2000), "no reply: the trigger thread died"
            reply = json.loads(req.recv_multipart()[0])
            assert reply["ok"] is False and reply["code"] == "bad_request" and "nested" in reply["error"], reply
        req.send(b'{"camera": "cam1", "part_id": "after-nesting", "request_id": "r1"}')
        assert req.poll(2000)
        reply = json.loads(req.recv_multipart()[0])
        assert reply["ok"] is True and reply["request_id"] == "r1" and reply["result"]["part_id"] == "after-nesting"
    finally:
        req.close()
        ctx.term()
    assert line.calls == [("cam1", "after-nesting")]


def test_two_clients_are_answered_independently(server):
    ctx = zmq.Context()
    a, b = raw_dealer(ctx, server.endpoint), raw_dealer(ctx, server.endpoint)
    try:
        t0 = time.monotonic()
        a.send_multipart([b"", b'{"camera": "slow", "part_id": "A"}'])
        b.send_multipart([b"", b'{"camera": "cam1", "part_id": "B"}'])
        reply_b, _ = reply_of(b, 2)
        t_b = time.monotonic() - t0
        assert not a.poll(0)  # A is still being inspected
        reply_a, frames_a = reply_of(a, 3)
        t_a = time.monotonic() - t0
    finally:
        a.close()
        b.close()
        ctx.term()
    assert reply_b["ok"] and reply_b["result"]["part_id"] == "B" and reply_b["result"]["camera"] == "cam1"
    assert reply_a["ok"] and reply_a["result"]["part_id"] == "A" and reply_a["result"]["camera"] == "slow"
    assert decode_mask_png(frames_a[2]).shape == (24, 32)
    # B is answered while A's 0.6 s inspection still runs; A only after it (generous upper bound: a loaded CI
    # machine once took 2.4 s)
    assert t_b < 0.6 <= t_a < 10.0, (t_b, t_a)


def test_timeouts_failures_and_wrong_results_are_error_replies(line):
    with (
        TriggerServer("tcp://127.0.0.1:*", line, timeout_s=0.3).start() as server,
        TriggerClient(server.endpoint) as client,
    ):
        t0 = time.monotonic()
        with pytest.raises(TriggerError) as err:
            client.inspect("never", "T-1", timeout_s=3)
        assert err.value.code == "timeout" and err.value.part_id == "T-1"
        assert 0.3 <= time.monotonic() - t0 < 2.9 and server.pending == 0  # the server's 0.3 s, not the client's 3 s
        line.fail_with = LinewatchError("frame dropped before inspection: inference fell behind")
        with pytest.raises(TriggerError, match="inference fell behind") as err:
            client.inspect("cam1", "F-1", timeout_s=3)
        assert err.value.code == "failed"
        line.fail_with, line.wrong_part = None, True
        with pytest.raises(TriggerError) as err:  # a result for another part is never handed out
            client.inspect("cam1", "W-1", timeout_s=3)
        assert err.value.code == "internal"
        line.wrong_part = False
        assert client.inspect("cam1", "OK-1", timeout_s=3).part_id == "OK-1"


def test_outstanding_requests_are_answered_when_the_server_stops(line):
    server = TriggerServer("tcp://127.0.0.1:*", line, timeout_s=30).start()
    ctx = zmq.Context()
    sock = raw_dealer(ctx, server.endpoint)
    try:
        sock.send_multipart([b"", b'{"camera": "never", "part_id": "S-1"}'])
        deadline = time.monotonic() + 2
        while server.pending == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.close()
        reply, _ = reply_of(sock, 2)
        assert reply == {
            "schema_version": 1,
            "kind": "trigger_reply",
            "ok": False,
            "code": "failed",
            "error": "server stopping",
            "request_id": None,
            "camera": "never",
            "part_id": "S-1",
        }
    finally:
        sock.close()
        ctx.term()


def test_lazy_pirate_client_times_out_cleanly_and_recovers(line):
    server = TriggerServer("tcp://127.0.0.1:*", line).start()
    endpoint = server.endpoint
    server.close()  # nobody listens now
    with TriggerClient(endpoint) as client:
        t0 = time.monotonic()
        with pytest.raises(TriggerTimeout, match="no reply"):
            client.inspect("cam1", "L-1", timeout_s=0.3, retries=1)
        assert 0.6 <= time.monotonic() - t0 < 5.0  # two 0.3 s tries, then give up (no hang)
        # the daemon is back: the same client works again
        with TriggerServer(endpoint, line).start():
            assert client.inspect("cam1", "L-2", timeout_s=3).part_id == "L-2"
    assert ("cam1", "L-1") not in line.calls


# --- a bug on one request, a dead thread, one client's flood, printable part ids --------------------------------


def test_a_bug_while_handling_one_request_costs_that_request_not_the_server(server, line, monkeypatch):
    import linewatch.line.trigger as trigger

    real_parse = trigger.parse_request
    calls = {"n": 0}

    def parse_with_a_bug(body):  # stands in for any bug on the request path: raises once, a plain RuntimeError
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug")
        return real_parse(body)

    monkeypatch.setattr(trigger, "parse_request", parse_with_a_bug)
    with TriggerClient(server.endpoint) as client:
        with pytest.raises(TriggerError) as err:  # the reply echoes the request_id, so the client takes it
            client.inspect("cam1", "BUG-1", timeout_s=2)
        assert err.value.code == "internal" and "a bug" in err.value.message and err.value.part_id == "BUG-1"
        assert client.inspect("cam1", "AFTER-BUG", timeout_s=2).part_id == "AFTER-BUG"
    assert server.health() is None and line.calls == [("cam1", "AFTER-BUG")]


def test_a_result_that_cannot_be_sent_is_an_internal_reply_and_the_other_results_still_go_out(line):
    def handler(camera, part_id):
        if camera != "broken":
            return line(camera, part_id)
        header = result_header("cam1", 1, part_id=part_id).model_dump(mode="json")
        header["extra"] = header  # a daemon bug: a header that contains itself cannot become JSON
        future: Future = Future()
        threading.Timer(0.05, future.set_result, ((header, None),)).start()
        return future

    with TriggerServer("tcp://127.0.0.1:*", handler, timeout_s=2).start() as server:
        ctx = zmq.Context()
        broken, good = raw_dealer(ctx, server.endpoint), raw_dealer(ctx, server.endpoint)
        try:
            line.delays["cam1"] = 0.05  # both results are ready in the same round of the server's loop
            broken.send_multipart([b"", b'{"camera": "broken", "part_id": "B-1"}'])
            good.send_multipart([b"", b'{"camera": "cam1", "part_id": "G-1"}'])
            reply_good, _ = reply_of(good)
            reply_broken, frames = reply_of(broken)
            assert reply_good["ok"] and reply_good["result"]["part_id"] == "G-1"
            assert reply_broken["ok"] is False and reply_broken["code"] == "internal" and frames[-1] == b""
            assert reply_broken["part_id"] == "B-1"
            good.send_multipart([b"", b'{"camera": "cam1", "part_id": "G-2"}'])
            assert reply_of(good)[0]["result"]["part_id"] == "G-2"
        finally:
            broken.close()
            good.close()
            ctx.term()
        assert server.health() is None


def test_health_reports_a_dead_server_thread(line):
    server = TriggerServer("tcp://127.0.0.1:*", line, timeout_s=1.0)
    assert server.health() == "trigger server thread not started"
    server.start()
    try:
        assert server.health() is None

        def broken_loop():  # a failure outside any one request: the loop itself cannot go on
            raise RuntimeError("the poll loop broke")

        server._next_deadline_ms = broken_loop
        deadline = time.monotonic() + 5
        while server.health() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.health() == "trigger server thread has died"
    finally:
        server.close()
    assert server.health() is None  # closed on purpose


def test_one_flooding_client_gets_busy_and_another_client_is_still_served(line):
    """The flooder (127.0.0.1) fills its own share of the pending slots; a PLC on another address (127.0.0.2,
    also loopback: the server stays bound to 127.0.0.1) still gets its result."""
    with TriggerServer("tcp://127.0.0.1:*", line, timeout_s=30).start() as server:
        port = server.endpoint.rsplit(":", 1)[1]
        ctx = zmq.Context()
        flooder = raw_dealer(ctx, server.endpoint)
        plc = raw_dealer(ctx, f"tcp://127.0.0.2:0;127.0.0.1:{port}")  # source address ; destination
        n = 1024 + 100  # more than every slot there is
        try:
            for i in range(n):
                flooder.send_multipart([b"", b'{"camera": "never", "part_id": "F-%d"}' % i])
            busy = []
            while flooder.poll(500):
                reply, _ = reply_of(flooder)
                assert reply["ok"] is False and reply["code"] == "busy", reply
                busy.append(reply["part_id"])
            plc.send_multipart([b"", b'{"camera": "cam1", "part_id": "PLC-1"}'])
            reply, _ = reply_of(plc, 3)
            assert reply["ok"] is True and reply["result"]["part_id"] == "PLC-1", reply
            cap = server.max_pending_per_client
            assert busy == [f"F-{i}" for i in range(cap, n)]  # the flooder's first requests wait, the rest: busy
            assert server.pending == cap and server.errors == {"busy": n - cap}
        finally:
            flooder.close()
            plc.close()
            ctx.term()


@pytest.mark.parametrize("part_id", ["A-1\nOK", "A-1\x1b[2J", "A-1\u202e1-B", "A-1\x00", "A\t1"])
def test_part_ids_with_control_characters_are_bad_requests(server, line, part_id):
    with TriggerClient(server.endpoint) as client:
        with pytest.raises(TriggerError, match="printable") as err:
            client.inspect("cam1", part_id, timeout_s=2)
        assert err.value.code == "bad_request"
        assert client.inspect("cam1", "Ü-3 with spaces", timeout_s=2).verdict == "NOK"  # printable unicode is fine
    assert line.calls == [("cam1", "Ü-3 with spaces")]
