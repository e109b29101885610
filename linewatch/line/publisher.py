"""The result and status PUB socket: never blocks inference, counts what it could not send.

A PUB socket drops messages for a subscriber whose queue (SNDHWM here + RCVHWM there) is full without telling the
sender, so per-subscriber losses show up only at the subscriber, as gaps in the per-camera `seq`
(`linewatch.protocol.client.Subscriber.missed`). `dropped` here counts sends the socket refused outright (zmq.Again with
NOBLOCK, or a socket error), which the daemon reports as publish drops.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import zmq

from linewatch.protocol.curve import (
    CurveConfig,
    apply_server_curve,
    check_bind_security,
    start_authenticator,
)
from linewatch.protocol.wire import (
    ResultHeader,
    encode_json,
    result_topic,
    status_header,
    status_topic,
)

log = logging.getLogger("linewatch.line.publisher")

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"


class ResultPublisher:
    """PUB bound on `endpoint`. Thread-safe: a lock serialises the inference thread's results and the main
    thread's status (each send is a non-blocking hand-over to ZeroMQ's I/O thread: microseconds).

    Every message gets `publish_time` and `run_id` here, at send time and nowhere else: `run_id` is random per
    publisher, so subscribers can tell a restart (every camera's seq starts again at 1) from lost messages.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        hwm: int = 1000,
        curve: CurveConfig | None = None,
        *,
        allow_insecure_bind: bool = False,
        linger_ms: int = 1000,
    ):
        check_bind_security(endpoint, curve is not None, allow_insecure_bind, "publish endpoint")
        self.run_id = uuid.uuid4().hex[:12]
        self.sent = 0
        self.status_sent = 0
        self.dropped = 0
        self._linger_ms = int(linger_ms)
        self._lock = threading.Lock()
        self._closed = False
        self._context = zmq.Context()
        self._auth = None
        self._socket = self._context.socket(zmq.PUB)
        try:
            self._socket.setsockopt(zmq.SNDHWM, int(hwm))
            self._socket.setsockopt(zmq.LINGER, self._linger_ms)
            if curve is not None:
                self._auth = start_authenticator(self._context, curve)
                apply_server_curve(self._socket, curve)
            self._socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self._teardown(0)
            from linewatch.errors import ConfigError

            raise ConfigError(f"publish endpoint {endpoint!r}: cannot bind: {exc}") from None
        except BaseException:
            self._teardown(0)
            raise
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("publishing results on %s%s", self.endpoint, " (CURVE)" if curve else "")

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

    def _stamp(self) -> dict[str, Any]:
        return {"publish_time": time.time(), "run_id": self.run_id}

    def _send(self, frames: list[bytes], counter: str) -> bool:
        with self._lock:
            if self._closed:
                self.dropped += 1
                return False
            try:
                self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=len(frames[-1]) < 65536)
                setattr(self, counter, getattr(self, counter) + 1)
                return True
            except zmq.Again:
                self.dropped += 1
                return False
            except zmq.ZMQError as exc:
                self.dropped += 1
                log.warning("publish failed: %s", exc)
                return False

    def counters(self) -> dict[str, int]:
        return {"sent": self.sent, "status_sent": self.status_sent, "dropped": self.dropped}

    def close(self, linger_ms: int | None = None) -> None:
        """Close, giving queued messages at most `linger_ms` (default: the constructor's) to leave."""
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
