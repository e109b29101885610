"""Client side in code: a result Subscriber (gap counting, liveness) and a TriggerClient (lazy-pirate requests).

from linewatch.protocol.client import Subscriber, TriggerClient
with Subscriber("tcp://127.0.0.1:5555", camera="cam1") as sub:
    for msg in sub.results(timeout_s=5):          # stops after 5 s without a result
        print(msg.seq, msg.verdict, msg.header["image_score"])
with TriggerClient("tcp://127.0.0.1:5556") as trig:
    msg = trig.inspect("cam1", "PART-0042", timeout_s=5)   # TriggerError / TriggerTimeout otherwise
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Iterator

import zmq

from linewatch.errors import LinewatchError
from linewatch.protocol.curve import apply_client_curve
from linewatch.protocol.wire import (
    PREVIEW,
    RESULT,
    Message,
    ProtocolError,
    camera_prefix,
    check_mask_frame,
    check_result_header,
    decode_message,
    encode_json,
    parse_header,
    parse_topic,
    preview_topic,
    result_topic,
)

log = logging.getLogger("linewatch.protocol.client")


class TriggerError(LinewatchError):
    """The daemon answered a trigger request with an error reply (`code` as in docs/PROTOCOL.md)."""

    def __init__(self, code: str, message: str, part_id: str | None = None):
        super().__init__(f"trigger for part {part_id!r} failed ({code}): {message}")
        self.code, self.message, self.part_id = code, message, part_id


class TriggerTimeout(LinewatchError):
    """No reply in time: the daemon is down, unreachable, or refused our CURVE key."""


def _curve_options(socket: zmq.SyncSocket, server_key: bytes | None, client_keys: tuple[bytes, bytes] | None) -> None:
    if server_key is None and client_keys is None:
        return
    if server_key is None or client_keys is None:
        raise LinewatchError("CURVE needs both the server's public key and this client's key pair")
    apply_client_curve(socket, server_key, client_keys)


class CameraTrack:
    """What one subscriber knows about one camera: last seq, gaps, when it last heard from it."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.last_seq: int | None = None
        self.received = 0
        self.missed = 0
        self.restarts = 0
        self.last_heard: float | None = None  # monotonic, any message
        self.last_status: dict[str, Any] | None = None

    def on_result(self, seq: int, run_id: str | None) -> int:
        """Count the results skipped before `seq`; a new run_id (daemon restart) starts counting again."""
        gap = 0
        self.received += 1
        if self.last_seq is not None and run_id != self.run_id:
            self.restarts += 1
        elif self.last_seq is not None and seq <= self.last_seq:
            return 0  # already counted as missed by a status, or a duplicate
        elif self.last_seq is not None:
            gap = seq - self.last_seq - 1
        self.missed += gap
        self.run_id, self.last_seq = run_id, seq
        return gap

    def on_status(self, status: dict[str, Any]) -> int:
        """Trailing losses: each status carries the camera's result count (`results`, the last seq made). One
        status later every result counted in it must have arrived (a PUB socket keeps order per subscriber),
        so what is still missing then was lost."""
        gap = 0
        before, self.last_status = self.last_status, status
        if before is not None and before.get("run_id") == status.get("run_id") == self.run_id:
            results = before.get("results")
            if type(results) is int and self.last_seq is not None and results > self.last_seq:  # not bool
                gap = results - self.last_seq
                self.missed += gap
                self.last_seq = results
        return gap


class Subscriber:
    """SUB to a daemon's results and status, for one camera (`linewatch/<camera>/`) or all of them.

    `missed[camera]` counts results that never arrived (seq gaps, including drops at a full high-water mark),
    from the first message received on: a subscriber that joins late (the slow joiner) misses nothing it counts.
    `alive(camera, within_s)` is the life bit: true when the camera's status (or a result) arrived recently.
    Previews (`previews=True`) come from `recv` and `previews()` as messages of kind "preview"; without it they
    are skipped, uncounted, even where the subscription (`linewatch/`, `linewatch/<camera>/`) lets them through.
    """

    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:5555",
        camera: str | None = None,
        *,
        server_key: bytes | None = None,
        client_keys: tuple[bytes, bytes] | None = None,
        rcvhwm: int = 10_000,
        timeout_s: float | None = None,
        statuses: bool = True,
        previews: bool = False,
    ):
        self.endpoint = endpoint
        self.camera = camera
        self.timeout_s = timeout_s
        self.tracks: dict[str, CameraTrack] = {}
        self.invalid = 0
        self.previews_wanted = previews
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RCVHWM, rcvhwm)
        self._socket.setsockopt(zmq.HEARTBEAT_IVL, 2000)  # notices a dead TCP peer and reconnects
        self._socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
        _curve_options(self._socket, server_key, client_keys)
        prefix = camera_prefix(camera)
        if statuses:
            self._socket.setsockopt(zmq.SUBSCRIBE, prefix)
        else:
            self._socket.setsockopt(zmq.SUBSCRIBE, result_topic(camera) if camera else prefix)
            if previews and camera:
                self._socket.setsockopt(zmq.SUBSCRIBE, preview_topic(camera))
        self._socket.connect(endpoint)

    # --- receiving ---------------------------------------------------------------------------------------
    def recv(self, timeout_s: float | None = 1.0) -> Message | None:
        """The next valid message (result or status), or None after `timeout_s` (None: wait forever).
        Malformed messages are logged, counted in `invalid` and skipped."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            wait = -1 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            if not self._socket.poll(wait, zmq.POLLIN):
                return None
            frames = self._socket.recv_multipart()
            if not self.previews_wanted and _is_preview(frames[0]):
                continue
            try:
                msg = decode_message(frames)
            except ProtocolError as exc:
                self.invalid += 1
                log.warning("skipping malformed message: %s", exc)
                continue
            self._track(msg)
            return msg

    def _track(self, msg: Message) -> None:
        track = self.tracks.setdefault(msg.camera, CameraTrack())
        track.last_heard = time.monotonic()
        if msg.kind == PREVIEW:
            return
        if msg.kind == RESULT:
            gap = track.on_result(msg.header["seq"], msg.header.get("run_id"))
        else:
            gap = track.on_status(msg.header)
        if gap:
            log.warning("camera %s: %d result(s) missed", msg.camera, gap)

    def results(self, timeout_s: float | None = None) -> Iterator[Message]:
        """Result messages as they come; ends after `timeout_s` without any message (None: never)."""
        while True:
            msg = self.recv(timeout_s)
            if msg is None:
                return
            if msg.kind == RESULT:
                yield msg

    def previews(self, timeout_s: float | None = None) -> Iterator[Message]:
        """Preview messages as they come (needs `previews=True`); ends after `timeout_s` without any message."""
        while True:
            msg = self.recv(timeout_s)
            if msg is None:
                return
            if msg.kind == PREVIEW:
                yield msg

    def __iter__(self) -> Iterator[Message]:
        return self.results(self.timeout_s)

    # --- what we know ------------------------------------------------------------------------------------
    @property
    def missed(self) -> dict[str, int]:
        return {name: t.missed for name, t in self.tracks.items()}

    @property
    def received(self) -> dict[str, int]:
        return {name: t.received for name, t in self.tracks.items()}

    def alive(self, camera: str, within_s: float = 3.0) -> bool:
        track = self.tracks.get(camera)
        return bool(track and track.last_heard is not None and time.monotonic() - track.last_heard <= within_s)

    def last_status(self, camera: str) -> dict[str, Any] | None:
        track = self.tracks.get(camera)
        return None if track is None else track.last_status

    def close(self) -> None:
        self._socket.close(linger=0)
        self._context.term()

    def __enter__(self) -> "Subscriber":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TriggerClient:
    """DEALER client of the trigger endpoint. On a timeout the socket is thrown away and a fresh one connected
    (lazy pirate), so a late reply to an abandoned request can never be taken for the next request's; replies
    are also matched by `request_id`. `retries` re-sends the request (a re-send can inspect another frame)."""

    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:5556",
        *,
        server_key: bytes | None = None,
        client_keys: tuple[bytes, bytes] | None = None,
    ):
        self.endpoint = endpoint
        self._server_key, self._client_keys = server_key, client_keys
        self._context = zmq.Context()
        self._socket = self._connect()

    def _connect(self) -> zmq.SyncSocket:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        _curve_options(sock, self._server_key, self._client_keys)
        sock.connect(self.endpoint)
        return sock

    def _reconnect(self) -> None:
        self._socket.close(linger=0)
        self._socket = self._connect()

    def request(
        self, request: dict[str, Any], timeout_s: float = 5.0, retries: int = 0
    ) -> tuple[dict[str, Any], bytes]:
        """Send one raw request object; (reply JSON, mask frame) of the matching reply."""
        request = dict(request)
        request.setdefault("request_id", uuid.uuid4().hex)
        payload = encode_json(request)
        for attempt in range(retries + 1):
            self._socket.send_multipart([b"", payload])
            deadline = time.monotonic() + timeout_s
            while (left := deadline - time.monotonic()) > 0:
                if not self._socket.poll(int(left * 1000) + 1, zmq.POLLIN):
                    continue
                frames = self._socket.recv_multipart()
                reply, mask = _parse_reply(frames)
                if reply.get("request_id") == request["request_id"]:
                    return reply, mask
                log.debug("ignoring a reply to an earlier request %r", reply.get("request_id"))
            log.warning(
                "no trigger reply from %s within %.1f s (attempt %d of %d)",
                self.endpoint,
                timeout_s,
                attempt + 1,
                retries + 1,
            )
            self._reconnect()
        raise TriggerTimeout(
            f"no reply from {self.endpoint} within {timeout_s:g} s "
            f"({retries + 1} attempt(s)): daemon down, unreachable, or CURVE key refused"
        )

    def inspect(self, camera: str, part_id: str, timeout_s: float = 5.0, retries: int = 0) -> Message:
        """Trigger an inspection of `part_id` on `camera`; the result Message (its part_id is checked)."""
        reply, mask = self.request({"camera": camera, "part_id": part_id}, timeout_s, retries)
        return reply_message(reply, mask, camera, part_id)

    def close(self) -> None:
        self._socket.close(linger=0)
        self._context.term()

    def __enter__(self) -> "TriggerClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse_reply(frames: list[bytes]) -> tuple[dict[str, Any], bytes]:
    """`[JSON, mask]` (after a DEALER's empty delimiter) -> (reply object, mask frame); ProtocolError otherwise."""
    if frames and frames[0] == b"":
        frames = frames[1:]
    if len(frames) != 2:
        raise ProtocolError(f"trigger reply of {len(frames)} frames: expected [JSON, mask]")
    reply = parse_header(frames[0], "trigger reply")
    if reply.get("kind") != "trigger_reply":
        raise ProtocolError(f"trigger reply of kind {reply.get('kind')!r}")
    return reply, frames[1]


def reply_message(reply: dict[str, Any], mask: bytes, camera: str, part_id: str) -> Message:
    """The result Message of a trigger reply to (camera, part_id): TriggerError for an error reply (`ok: false`
    with a code), ProtocolError for anything that is neither that nor a valid result of exactly that request."""
    ok, code = reply.get("ok"), reply.get("code")
    if ok is False and isinstance(code, str) and code:
        echoed = reply.get("part_id")
        raise TriggerError(code[:100], _text(reply.get("error")), echoed if isinstance(echoed, str) else None)
    if ok is not True:
        raise ProtocolError(
            f"trigger reply: expected ok: true with a result, or ok: false with a code; got ok {_text(ok, 40)}"
        )
    header = reply.get("result")
    if not isinstance(header, dict):
        raise ProtocolError("trigger reply: ok without a result object")
    check_result_header(header, "trigger reply result")
    if header["part_id"] != part_id or header["camera"] != camera:
        raise ProtocolError(
            f"trigger reply for camera {header['camera']!r} part {header['part_id']!r}, "
            f"asked for {camera!r} {part_id!r}"
        )
    mask_png = check_mask_frame(header, mask, "trigger reply")
    return Message(result_topic(camera).decode(), header, mask_png)


def _text(value: Any, limit: int = 1000) -> str:
    """A reply's field for an exception message: text (cut), a plain scalar, or just the type of anything else."""
    if isinstance(value, str):
        return value[:limit]
    plain = value is None or isinstance(value, (bool, int, float))
    return repr(value)[:limit] if plain else f"<{type(value).__name__}>"


__all__ = ["Subscriber", "TriggerClient", "TriggerError", "TriggerTimeout", "Message", "CameraTrack", "reply_message"]


def _is_preview(topic: bytes) -> bool:
    try:
        return parse_topic(topic)[1] == PREVIEW
    except ProtocolError:
        return False
