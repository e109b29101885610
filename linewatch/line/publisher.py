"""The result and status socket: never blocks inference, counts what it could not send, bounds what subscribers
can make it hold.

A PUB-style socket drops messages for a subscriber whose queue (SNDHWM here + RCVHWM there) is full without
telling the sender, so per-subscriber losses show up only at the subscriber, as gaps in the per-camera `seq`
(`linewatch.protocol.client.Subscriber.missed`). `dropped` here counts sends the socket refused outright
(zmq.Again with NOBLOCK, or a socket error), which the daemon reports as publish drops.

Subscriptions are the only traffic subscribers send, and libzmq keeps every one of them in memory. So the socket
is an XPUB in manual mode: a small thread reads each subscription and applies only those that can match a topic
this daemon publishes (a prefix of `linewatch/<camera>/result|status|preview`, or of `linewatch/`), up to a cap of
distinct topics; the rest are refused and counted. `MAXMSGSIZE` cuts a connection that sends a larger message. A PUB
subscriber sees exactly what a PUB socket would send it (a refused topic could not have matched anything).
"""

from __future__ import annotations

import logging
import re
import select
import threading
import time
import uuid
from collections import Counter
from typing import Any, Iterable

import zmq

from linewatch.errors import ConfigError
from linewatch.protocol.curve import (
    CurveConfig,
    apply_server_curve,
    check_bind_security,
    start_authenticator,
    zap_health,
)
from linewatch.protocol.wire import (
    TOPIC_ROOT,
    ResultHeader,
    encode_json,
    preview_topic,
    result_topic,
    status_header,
    status_topic,
)

log = logging.getLogger("linewatch.line.publisher")

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
# Inbound messages are subscriptions (a flag byte + a topic prefix) and the CURVE handshake (about 300 bytes,
# more with long metadata): 1 KiB is plenty; a larger message closes that subscriber's connection.
MAX_INBOUND_BYTES = 1024
MAX_SUBSCRIPTIONS = 1000  # distinct topics applied at once; each camera needs a handful
SUBSCRIPTION_POLL_S = 0.05  # the subscription thread's longest sleep (woken earlier by the socket's fd)
_TOPIC_TAIL = re.compile(rb"[A-Za-z0-9_-]*(/[a-z]{0,7})?")  # after the root: a camera prefix, '/', a kind prefix


def _publishable_prefix(topic: bytes) -> bool:
    """Could a subscription to `topic` match something a linewatch publisher sends (for some camera)?"""
    if TOPIC_ROOT.startswith(topic):
        return True
    if not topic.startswith(TOPIC_ROOT) or not _TOPIC_TAIL.fullmatch(topic[len(TOPIC_ROOT) :]):
        return False
    _camera, slash, kind = topic[len(TOPIC_ROOT) :].partition(b"/")
    return not slash or any(name.startswith(kind) for name in (b"result", b"status", b"preview"))


class ResultPublisher:
    """XPUB bound on `endpoint`, seen by subscribers as a PUB. Thread-safe: a lock serialises the inference
    thread's results, the main thread's status and the subscription thread (each send is a non-blocking hand-over
    to ZeroMQ's I/O thread: microseconds).

    Every message gets `publish_time` and `run_id` here, at send time and nowhere else: `run_id` is random per
    publisher, so subscribers can tell a restart (every camera's seq starts again at 1) from lost messages.
    `cameras`, when given, narrows the subscriptions applied to those cameras' topics. `health()` is None while
    the subscription thread (and, with CURVE, the authenticator) runs.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        hwm: int = 1000,
        curve: CurveConfig | None = None,
        *,
        allow_insecure_bind: bool = False,
        linger_ms: int = 1000,
        cameras: Iterable[str] | None = None,
        max_subscriptions: int = MAX_SUBSCRIPTIONS,
    ):
        check_bind_security(endpoint, curve is not None, allow_insecure_bind, "publish endpoint")
        self.run_id = uuid.uuid4().hex[:12]
        self.sent = 0
        self.status_sent = 0
        self.dropped = 0
        self.previews_sent = 0
        self.previews_dropped = 0  # previews the socket refused: never counted as result drops
        self.subscriptions_refused = 0  # subscriptions (and other inbound messages) not applied
        self.max_subscriptions = int(max_subscriptions)
        self._topics = None if cameras is None else _prefixes_of(cameras)
        self._applied: Counter[bytes] = Counter()  # subscriptions applied, by topic (one per subscriber)
        self._linger_ms = int(linger_ms)
        self._lock = threading.Lock()
        self._closed = False
        self._stopping = threading.Event()
        self._last_refusal_log = 0.0
        self._context = zmq.Context()
        self._auth = None
        self._socket = self._context.socket(zmq.XPUB)
        try:
            self._socket.setsockopt(zmq.SNDHWM, int(hwm))
            self._socket.setsockopt(zmq.LINGER, self._linger_ms)
            self._socket.setsockopt(zmq.XPUB_MANUAL, 1)
            longest = max((len(t) for t in self._topics or ()), default=0)
            self._socket.setsockopt(zmq.MAXMSGSIZE, max(MAX_INBOUND_BYTES, 2 * longest))
            if curve is not None:
                self._auth = start_authenticator(self._context, curve)
                apply_server_curve(self._socket, curve)
            self._socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self._teardown(0)
            raise ConfigError(f"publish endpoint {endpoint!r}: cannot bind: {exc}") from None
        except BaseException:
            self._teardown(0)
            raise
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._fd = int(self._socket.getsockopt(zmq.FD))
        self._thread = threading.Thread(target=self._serve_subscriptions, name="publisher-subscriptions", daemon=True)
        self._thread.start()
        log.info("publishing results on %s%s", self.endpoint, " (CURVE)" if curve else "")

    # --- sending ------------------------------------------------------------------------------------------
    def publish_result(self, header: ResultHeader, mask_png: bytes | None) -> dict[str, Any] | None:
        """Send `[topic, header, mask or b""]`; the header as sent (stamped), or None when the socket refused it
        (counted in `dropped`)."""
        sent = header.model_copy(update=self._stamp()).model_dump(mode="json")
        frames = [result_topic(header.camera), encode_json(sent), mask_png or b""]
        return sent if self._send(frames, "sent") else None

    def publish_status(self, camera: str, status: dict[str, Any]) -> bool:
        """Send one camera's status (the life bit): `[topic, {schema_version, kind, camera, ..., **status}]`."""
        header = status_header(camera, status) | self._stamp()
        return self._send([status_topic(camera), encode_json(header)], "status_sent")

    def publish_preview(self, header: dict[str, Any], jpeg: bytes, heatmap_png: bytes | None) -> bool:
        """Send `[topic, header, JPEG, heat map PNG or b""]`; False (counted in `previews_dropped`) when refused."""
        sent = header | self._stamp()
        frames = [preview_topic(header["camera"]), encode_json(sent), jpeg, heatmap_png or b""]
        return self._send(frames, "previews_sent", "previews_dropped")

    def _stamp(self) -> dict[str, Any]:
        return {"publish_time": time.time(), "run_id": self.run_id}

    def _send(self, frames: list[bytes], counter: str, drops: str = "dropped") -> bool:
        with self._lock:
            if self._closed:
                setattr(self, drops, getattr(self, drops) + 1)
                return False
            try:
                copy = max(len(f) for f in frames[2:] or [b""]) < 65536
                self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=copy)
                setattr(self, counter, getattr(self, counter) + 1)
                return True
            except zmq.Again:
                setattr(self, drops, getattr(self, drops) + 1)
                return False
            except zmq.ZMQError as exc:
                setattr(self, drops, getattr(self, drops) + 1)
                log.warning("publish failed: %s", exc)
                return False

    # --- subscriptions --------------------------------------------------------------------------------------
    def _serve_subscriptions(self) -> None:
        """Apply or refuse subscriptions as they arrive. libzmq signals its fd when the socket has news; the
        timeout covers a signal consumed by a send on another thread."""
        while not self._stopping.is_set():
            try:
                select.select([self._fd], [], [], SUBSCRIPTION_POLL_S)
                while self._read_subscriptions(100):
                    pass
            except Exception:  # one bad round must not end subscriptions for everybody
                if self._stopping.is_set():
                    return
                log.exception("publisher: reading subscriptions failed")
                time.sleep(SUBSCRIPTION_POLL_S)

    def _read_subscriptions(self, at_most: int) -> bool:
        """Handle up to `at_most` inbound messages under the lock (sends wait microseconds); True if more may wait."""
        with self._lock:
            if self._closed:
                return False
            for _ in range(at_most):
                try:
                    message = self._socket.recv(zmq.NOBLOCK)
                except zmq.Again:
                    return False
                self._on_subscription(message)
            return True

    def _on_subscription(self, message: bytes) -> None:
        """One inbound message (lock held): `\\x01topic` subscribes, `\\x00topic` unsubscribes; in manual mode it
        takes effect only through our own SUBSCRIBE/UNSUBSCRIBE, which apply to the subscriber that sent it.
        A leaving subscriber's topics come back as unsubscriptions from nobody (libzmq has already dropped them).
        `_applied` only feeds the cap; where it cannot tell subscribers apart it errs on the lenient side."""
        flag, topic = message[:1], message[1:]
        if flag == b"\x00":
            if self._applied[topic] > 0:  # else: a refused topic, or the subscriber has gone (libzmq cleaned up)
                self._socket.setsockopt(zmq.UNSUBSCRIBE, topic)
                self._applied[topic] -= 1
            if self._applied[topic] <= 0:
                del self._applied[topic]
            return
        if flag == b"\x01" and self._acceptable(topic):
            self._socket.setsockopt(zmq.SUBSCRIBE, topic)
            self._applied[topic] += 1
            return
        self.subscriptions_refused += 1
        now = time.monotonic()
        if now - self._last_refusal_log > 60:
            self._last_refusal_log = now
            log.warning(
                "refused a subscription %r (%d refused so far): not a linewatch topic, or too many topics",
                message[:60],
                self.subscriptions_refused,
            )

    def _acceptable(self, topic: bytes) -> bool:
        if self._topics is not None and topic not in self._topics:
            return False
        if self._topics is None and not _publishable_prefix(topic):
            return False
        return topic in self._applied or len(self._applied) < self.max_subscriptions

    # --- state ----------------------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        return {
            "sent": self.sent,
            "status_sent": self.status_sent,
            "dropped": self.dropped,
            "subscriptions": len(self._applied),  # distinct topics subscribed now
            "subscriptions_refused": self.subscriptions_refused,
        }

    def health(self) -> str | None:
        """None while subscriptions are served; otherwise why not (a dead subscription or authenticator thread)."""
        if self._closed or self._stopping.is_set():
            return None  # closed on purpose
        if not self._thread.is_alive():
            return "subscription thread has died: new subscribers get nothing"
        return zap_health(self._auth)

    def close(self, linger_ms: int | None = None) -> None:
        """Close, giving queued messages at most `linger_ms` (default: the constructor's) to leave."""
        self._stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(2.0)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._teardown(self._linger_ms if linger_ms is None else linger_ms)

    def _teardown(self, linger_ms: int) -> None:
        self._socket.close(linger=linger_ms)
        if self._auth is not None:
            self._auth.stop()
        self._context.term()

    def __enter__(self) -> "ResultPublisher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _prefixes_of(cameras: Iterable[str]) -> frozenset[bytes]:
    """Every subscription that can match one of these cameras' topics: each prefix of each topic."""
    topics = [topic(camera) for camera in cameras for topic in (result_topic, status_topic, preview_topic)]
    return frozenset(t[:n] for t in topics for n in range(len(t) + 1))
