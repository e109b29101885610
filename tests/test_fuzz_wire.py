"""Fuzzing the parsers that read bytes from the network: trigger requests (the daemon's side), result and status
messages and trigger replies (the client's side). Any input gives a valid value or a typed error (RequestError,
ProtocolError, TriggerError), never another exception or a hang; and a live trigger socket, fed random frames,
nesting, unicode and a flood, still answers a valid request afterwards with its health intact.

Bounded for CI: each property runs a few hundred examples in seconds (Hypothesis `max_examples`, `deadline`).
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import Future
from datetime import timedelta

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from linewatch.line.trigger import MAX_REQUEST_BYTES, RequestError, TriggerRequest, TriggerServer, parse_request
from linewatch.protocol.client import CameraTrack, TriggerClient, TriggerError, _parse_reply, reply_message
from linewatch.protocol.wire import ProtocolError, Verdict, decode_message, encode_mask_png
from tests.helpers import result_header
from tests.test_trigger import LineStandIn

FUZZ = settings(max_examples=1000, deadline=timedelta(seconds=2), suppress_health_check=[HealthCheck.too_slow])

# --- strategies ----------------------------------------------------------------------------------------------
TEXT = st.text(max_size=40) | st.sampled_from(["", "cam1", "A-1\n", "\u202e", "\x00", "Ü", "\ud800", "x" * 201])
NUMBERS = (
    st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0, -1, 2**63, 1e308, -0.0])
)
SCALARS = st.none() | st.booleans() | NUMBERS | TEXT
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4), max_leaves=20
)


def dumps(value: object, ascii_only: bool) -> bytes:
    """JSON as a sender might write it: NaN/Infinity allowed (not strict JSON), non-ASCII raw or escaped."""
    return json.dumps(value, allow_nan=True, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def nested(depth: int, opener: str) -> bytes:
    return (opener * depth).encode()


NESTING = st.builds(nested, st.integers(1, 60_000), st.sampled_from(["[", '{"a":', '{"camera":', "[{"]))


def with_deep_field(document: bytes, key: str, depth: int) -> bytes:
    """A JSON object with one more field holding a closed, `depth`-deep list: valid JSON, if the parser can nest."""
    return document[:-1] + b', "%s": ' % key.encode() + b"[" * depth + b"]" * depth + b"}"


REQUESTS = st.fixed_dictionaries(
    {},
    optional={
        "camera": st.sampled_from(["cam1", "never", "cam9", "boom"]) | JSON_VALUES,
        "part_id": TEXT | JSON_VALUES,
        "request_id": TEXT | NUMBERS | JSON_VALUES,
        "extra": JSON_VALUES,
    },
)
REQUEST_BYTES = st.builds(dumps, REQUESTS, st.booleans()) | st.builds(
    with_deep_field,
    st.just(b'{"camera": "cam1"}'),
    st.sampled_from(["part_id", "request_id", "x"]),
    st.integers(1, 2000),
)


# --- the trigger request parser ------------------------------------------------------------------------------
def check_request(body: list[bytes]) -> None:
    try:
        request = parse_request(body)
    except RequestError as exc:
        assert str(exc) and isinstance(exc.request, dict)
        json.dumps(exc.request)  # the ids it echoes can always be sent back
        event("request error")
        return
    event("valid request")
    assert isinstance(request, TriggerRequest) and len(body) == 1 and len(body[0]) <= MAX_REQUEST_BYTES
    assert isinstance(request.camera, str) and 1 <= len(request.camera) <= 200
    assert isinstance(request.part_id, str) and 1 <= len(request.part_id) <= 200 and request.part_id.isprintable()


@pytest.mark.unit
@FUZZ
@given(st.lists(st.binary(max_size=6000), max_size=4) | (REQUEST_BYTES | NESTING).map(lambda data: [data]))
def test_any_request_body_is_a_request_or_a_request_error(body):
    check_request(body)


# --- result and status messages as a client reads them ---------------------------------------------------------
VALID_RESULT = result_header(
    "cam1",
    7,
    "NOK",
    0.8,
    part_id="P-1",
    regions=[{"bbox": [1, 2, 3, 4], "area": 12, "peak": 0.8}],
    mask={"width": 8, "height": 8},
).model_dump(mode="json") | {"publish_time": 1_700_000_000.5, "run_id": "0123456789ab"}
VALID_STATUS = {
    "schema_version": 1,
    "kind": "status",
    "camera": "cam1",
    "publish_time": 1_700_000_000.5,
    "run_id": "0123456789ab",
    "results": 7,
}
MASK = encode_mask_png((np.arange(64).reshape(8, 8) % 2).astype(bool))
TOPICS = st.sampled_from([b"linewatch/cam1/result", b"linewatch/cam1/status", b"linewatch/cam2/result"]) | st.binary(
    max_size=40
)


PLAUSIBLE = NUMBERS | TEXT | st.none() | st.booleans() | JSON_VALUES
HEADERS = st.builds(dumps, JSON_VALUES, st.booleans()) | NESTING
MASKS = st.sampled_from([b"", MASK, MASK[:20], b"\x89PNG\r\n\x1a\n"]) | st.binary(max_size=100)


@st.composite
def mutated(draw: st.DrawFn, valid: dict) -> dict:
    """A valid header with a few fields replaced, removed or added (often none: the valid paths are fuzzed too,
    through the mask frame and the topic)."""
    header = json.loads(json.dumps(valid))
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 4]))):
        key = draw(st.sampled_from(sorted(header)) | TEXT)
        if draw(st.integers(0, 3)):
            header[key] = draw(PLAUSIBLE)
        else:
            header.pop(key, None)
    return header


@st.composite
def messages(draw: st.DrawFn) -> list[bytes]:
    """[topic, header, (mask)]: mostly a topic that fits the header's kind, so the checks behind it are reached."""
    kind = draw(st.sampled_from(["result", "status"]))
    valid = VALID_RESULT if kind == "result" else VALID_STATUS
    topic = draw(st.just(b"linewatch/cam1/" + kind.encode()) | TOPICS)
    header = draw(st.builds(dumps, mutated(valid), st.booleans()) | HEADERS)
    if header.endswith(b"}") and draw(st.integers(0, 9)) == 0:
        header = with_deep_field(header, draw(st.sampled_from(sorted(valid))), draw(st.integers(1, 3000)))
    rest = [MASK] if kind == "result" else []
    return [topic, header, *draw(st.just(rest) | st.lists(MASKS, max_size=2))]


def check_message(frames: list[bytes]) -> None:
    try:
        msg = decode_message(frames)
    except ProtocolError as exc:
        assert str(exc)
        event("protocol error")
        return
    event(f"valid {msg.kind}")
    assert msg.kind in ("result", "status") and msg.topic == f"linewatch/{msg.camera}/{msg.kind}"
    assert type(msg.header["schema_version"]) is int and msg.header["schema_version"] == 1
    # what a client relies on in every message: who sent it (run_id: a restart is not a loss) and when
    assert isinstance(msg.header["run_id"], str) and math.isfinite(msg.header["publish_time"])
    if msg.kind == "result":  # a valid result never claims a part good (or bad) without a finite score
        assert msg.verdict in tuple(Verdict) and isinstance(msg.seq, int) and msg.seq >= 1
        if msg.verdict != "ERROR":
            assert isinstance(msg.header["image_score"], float) and math.isfinite(msg.header["image_score"])
            assert msg.header["error"] is None
        track = CameraTrack()
        track.on_result(msg.seq, msg.header["run_id"])
    else:
        results = msg.header.get("results")
        assert results is None or (type(results) is int and results >= 0)
        track = CameraTrack()
        track.on_result(1, msg.header["run_id"])
        track.on_status(msg.header)
        track.on_status(msg.header)
        assert track.missed == max(0, (results or 0) - 1)


@pytest.mark.unit
@FUZZ
@given(messages() | st.lists(st.binary(max_size=300), max_size=4))
def test_any_frames_are_a_message_or_a_protocol_error(frames):
    check_message(frames)


# --- trigger replies as a client reads them ---------------------------------------------------------------------
VALID_REPLY = {
    "schema_version": 1,
    "kind": "trigger_reply",
    "ok": True,
    "request_id": "r1",
    "camera": "cam1",
    "part_id": "P-1",
    "result": VALID_RESULT,
}
REPLIES = (
    st.builds(dumps, mutated(VALID_REPLY) | mutated(VALID_REPLY | {"ok": False, "code": "busy"}), st.booleans())
    | st.builds(dumps, mutated(VALID_RESULT).map(lambda result: VALID_REPLY | {"result": result}), st.booleans())
    | NESTING
    | st.binary(max_size=200)
)


@pytest.mark.unit
@FUZZ
@given(st.booleans(), REPLIES, st.just([MASK]) | st.lists(MASKS, max_size=2))
def test_any_trigger_reply_is_a_result_or_a_typed_error(delimiter, reply, rest):
    frames = [b""] * delimiter + [reply, *rest]
    try:
        parsed, mask = _parse_reply(frames)
        msg = reply_message(parsed, mask, "cam1", "P-1")
    except TriggerError as exc:  # the daemon's own refusal: a code a PLC can act on
        assert isinstance(exc.code, str) and exc.code and str(exc)
        event("error reply")
        return
    except ProtocolError as exc:
        assert str(exc)
        event("protocol error")
        return
    event("valid result")
    assert parsed["ok"] is True and parsed["schema_version"] == 1  # only an explicit ok: true carries a result
    assert msg.camera == "cam1" and msg.part_id == "P-1" and msg.verdict in tuple(Verdict)
    if msg.verdict != "ERROR":
        assert math.isfinite(msg.header["image_score"]) and msg.header["error"] is None


# --- the live trigger socket ---------------------------------------------------------------------------------
class FuzzLine(LineStandIn):
    """The daemon stand-in, plus a camera whose handler has a bug."""

    def __call__(self, camera: str, part_id: str) -> Future:
        if camera == "boom":
            raise RuntimeError("handler bug")
        return super().__call__(camera, part_id)


def dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(endpoint)
    return sock


def one_reply(sock: zmq.Socket, delimiter: bool, timeout_s: float = 3.0) -> dict:
    assert sock.poll(int(timeout_s * 1000)), "no reply"
    frames = sock.recv_multipart()
    assert len(frames) == 2 + delimiter and (not delimiter or frames[0] == b""), frames[:3]
    reply = json.loads(frames[-2])
    assert reply["kind"] == "trigger_reply" and isinstance(reply["ok"], bool)
    assert reply["ok"] or (reply["code"] and frames[-1] == b"")
    if reply["ok"]:  # only a printable part id ever makes it into a result
        assert reply["result"]["part_id"].isprintable(), reply["result"]["part_id"]
    return reply


BODIES = (
    st.lists(st.binary(max_size=8192), min_size=1, max_size=5)
    | REQUEST_BYTES.map(lambda b: [b])
    | NESTING.map(lambda b: [b[:MAX_REQUEST_BYTES]])
    | st.builds(lambda n: [b'{"camera": "cam1", "part_id": "' + b"p" * n + b'"}'], st.integers(150, 5000))
)


@pytest.mark.integration
def test_a_live_trigger_socket_survives_fuzz_and_a_flood():
    line = FuzzLine({"cam1": 0.002, "never": None})
    with TriggerServer("tcp://127.0.0.1:*", line, timeout_s=0.05).start() as server:
        ctx = zmq.Context()
        sock = dealer(ctx, server.endpoint)
        try:

            @settings(FUZZ, max_examples=150)
            @given(st.booleans(), BODIES)
            def every_message_gets_exactly_one_reply(delimiter, body):
                frames = [b""] * delimiter + body
                if frames[0] == b"" and not delimiter:
                    frames = [b"x", *frames]  # a leading empty frame would read as the delimiter
                sock.send_multipart(frames)
                event(one_reply(sock, delimiter or frames[0] == b"").get("code", "ok"))
                assert not sock.poll(0)

            every_message_gets_exactly_one_reply()
            assert not sock.poll(200)  # nothing late either

            # the flood: a few thousand messages at once, garbage and real requests mixed
            garbage = [[b"", b"[" * 3000], [b"", b"\xff" * 100], [b"", b"{}"], [b""], [b"", b"x" * 5000, b"y"]]
            request = [b"", b'{"camera": "never", "part_id": "FLOOD"}']
            messages = [garbage[i % 5] if i % 3 else request for i in range(3000)]
            for frames in messages:
                sock.send_multipart(frames)
            codes: dict[str, int] = {}
            deadline = time.monotonic() + 30
            while sum(codes.values()) < len(messages) and time.monotonic() < deadline:
                if sock.poll(100):
                    reply = one_reply(sock, True)
                    codes[reply.get("code", "ok")] = codes.get(reply.get("code", "ok"), 0) + 1
            assert sum(codes.values()) == len(messages), codes  # every one answered, once
            assert codes["bad_request"] == 2000 and codes.get("timeout", 0) + codes.get("busy", 0) == 1000, codes
            assert not sock.poll(300)
        finally:
            sock.close()
            ctx.term()
        with TriggerClient(server.endpoint) as client:
            assert client.inspect("cam1", "AFTER-FUZZ", timeout_s=3).part_id == "AFTER-FUZZ"
        assert server.health() is None and server.pending == 0
