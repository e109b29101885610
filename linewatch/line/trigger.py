"""Trigger requests for PLC/MES: `{camera, part_id}` in, the result of the frame taken for it out, same part_id.

One ROUTER socket in its own thread. Requests are handed to the daemon's `handler(camera, part_id) -> Future`
and answered when the future resolves, so any number of clients can have requests outstanding and a slow
inspection never holds up the others. The loop polls the socket and a wake-up pipe written by the futures'
done-callbacks, so replies leave as soon as a result exists. Every malformed request gets an error reply; nothing
a client sends can stop the loop, and a bug met while handling one request costs that request an `internal`
reply, not the loop (`health()` reports a dead thread, so the daemon's watchdog does not stay green).

Outstanding requests are capped per client (its CURVE key, else its address), so one client flooding the socket
gets `busy` while everybody else is still served; a global cap stays as a backstop.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Union

import zmq
from pydantic import Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator

from linewatch.errors import ConfigError, LinewatchError
from linewatch.protocol.curve import (
    CurveConfig,
    apply_server_curve,
    check_bind_security,
    start_authenticator,
    zap_health,
)
from linewatch.protocol.wire import (
    SCHEMA_VERSION,
    ProtocolError,
    check_mask_frame,
    check_result_header,
    encode_json,
    json_object,
    jsonable,
)
from linewatch.validation import TolerantModel, validate

log = logging.getLogger("linewatch.line.trigger")

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5556"
REPLY = "trigger_reply"
MAX_REQUEST_BYTES = 4096
MAX_PART_ID_CHARS = 200
MAX_PENDING = 1024  # all clients together: the backstop
MAX_PENDING_PER_CLIENT = 64  # one client (CURVE key, else address): a flood takes its own slots, nobody else's
LOCAL_CLIENT = "local"  # ipc:// peers have no address: they share one cap, as loopback clients share 127.0.0.1

# error codes of error replies (docs/PROTOCOL.md)
BAD_REQUEST = "bad_request"  # not one JSON object in one frame, missing/mistyped fields
UNKNOWN_CAMERA = "unknown_camera"
REJECTED = "rejected"  # the daemon refused (stopping, camera finished, ...)
BUSY = "busy"  # too many requests outstanding (from this client, or from all together)
TIMEOUT = "timeout"  # no result within timeout_s
FAILED = "failed"  # the request was accepted but no result came (frame dropped, shutdown, ...)
INTERNAL = "internal"  # a daemon bug: the request gets this instead of a doubtful answer
REFUSED = "refused"  # a recipe switch refused (unknown or broken recipe, golden set failed): the old one stays
VERIFY_FAILED = "verify_failed"  # a verify request ran and the golden set failed
OK = "ok"  # not an error: the request got its result
OUTCOMES = (OK, BAD_REQUEST, UNKNOWN_CAMERA, REJECTED, BUSY, TIMEOUT, FAILED, INTERNAL, REFUSED, VERIFY_FAILED)
CONTROL_KINDS = ("recipe", "verify")  # requests that change or check the daemon rather than inspect a part
CONTROL_TIMEOUT_S = 60.0  # at least this long for them: a golden set takes longer than one part

Handler = Callable[[str, str], Future[Any]]
# control(request dict) -> Future of the reply's payload: {"ok": bool, "code"?: str, "error"?: str, ...}
ControlHandler = Callable[[dict[str, Any]], Future[dict[str, Any]]]


@dataclass
class _Pending:
    envelope: list[bytes]
    request: dict[str, Any]  # the ids a reply echoes: camera, part_id, request_id
    future: Future[Any]
    deadline: float
    client: str  # who counts it against their cap (see client_of)


class TriggerServer:
    """ROUTER on `endpoint`; `handler(camera, part_id)` returns a Future resolving to `(header, mask_png)` or
    `{"header": ..., "mask": ...}` with the header as published, or raising (its text goes back as the error).
    The handler runs in this server's thread and must return at once. A KeyError from it, or an error whose text
    starts with "unknown camera", is answered with code unknown_camera. Call `start()`, then `close()`.
    """

    def __init__(
        self,
        endpoint: str,
        handler: Handler,
        curve: CurveConfig | None = None,
        *,
        timeout_s: float = 10.0,
        allow_insecure_bind: bool = False,
        max_pending: int = MAX_PENDING,
        max_pending_per_client: int = MAX_PENDING_PER_CLIENT,
        control: ControlHandler | None = None,
    ):
        if not callable(handler):
            raise TypeError("TriggerServer needs a handler(camera, part_id) -> Future")
        check_bind_security(endpoint, curve is not None, allow_insecure_bind, "trigger endpoint")
        self.handler = handler
        self.control = control  # recipe / verify requests (None: answered `rejected`)
        self.timeout_s = float(timeout_s)
        self.max_pending = int(max_pending)
        self.max_pending_per_client = int(max_pending_per_client)
        self.requests = 0
        self.replies = 0
        self.errors: dict[str, int] = {}
        self.outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)  # every outcome from the start (metrics)
        self._pending: list[_Pending] = []
        self._per_client: Counter[str] = Counter()  # outstanding requests by client
        self._torn_down = False
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()  # closed sockets refuse writes; a closed fd could be reused
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._context = zmq.Context()
        self._auth = None
        self._socket = self._context.socket(zmq.ROUTER)
        try:
            self._socket.setsockopt(zmq.LINGER, 500)
            self._socket.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a reply to a vanished client is dropped
            self._socket.setsockopt(zmq.SNDHWM, 10_000)
            self._socket.setsockopt(zmq.MAXMSGSIZE, 64 * 1024)  # garbage floods are cut at the transport
            if curve is not None:
                self._auth = start_authenticator(self._context, curve)
                apply_server_curve(self._socket, curve)
            self._socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self._teardown()
            raise ConfigError(f"trigger endpoint {endpoint!r}: cannot bind: {exc}") from None
        except BaseException:
            self._teardown()
            raise
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._thread = threading.Thread(target=self._run, name="trigger-server", daemon=True)
        log.info("trigger requests on %s%s", self.endpoint, " (CURVE)" if curve else "")

    # --- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> "TriggerServer":
        """Start the server thread (again: no-op)."""
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()
        return self

    def close(self, timeout_s: float = 2.0) -> None:
        """Answer what is outstanding with an error ("server stopping"), stop the thread, close the socket."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        else:
            self._teardown()

    def __enter__(self) -> "TriggerServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def health(self) -> str | None:
        """None while requests are served; otherwise why not (a dead server or authenticator thread)."""
        if self._stop.is_set():
            return None  # closed on purpose
        if not self._thread.is_alive():
            return "trigger server thread has died" if self._thread.ident else "trigger server thread not started"
        return zap_health(self._auth)

    def _teardown(self) -> None:
        if self._torn_down:
            return
        self._torn_down = True
        self._socket.close(linger=500)
        if self._auth is not None:
            self._auth.stop()
        self._context.term()
        self._wake_w.close()
        self._wake_r.close()

    def _wake(self, _future: Future[Any] | None = None) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # full (a wake-up is already waiting) or closed

    # --- the loop -----------------------------------------------------------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(self._next_deadline_ms()))
                if self._wake_r in events:
                    self._drain_wake_pipe()
                if self._socket in events:
                    self._receive_some()
                self._answer_ready()
            for item in self._pending:
                item.future.cancel()
                self._reply_error(item.envelope, item.request, FAILED, "server stopping")
            self._pending.clear()
        except Exception:  # outside any one request (the socket itself failed): health() now reports it
            log.exception("trigger server loop failed: trigger requests are no longer answered")
        finally:
            self._teardown()

    def _receive_some(self) -> None:
        for _ in range(100):  # bounded, so replies are not starved by a flood
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            data = [f.bytes for f in frames]
            try:
                self._on_request(data, client_of(frames[-1]))
            except Exception as exc:  # a bug met on this request: it gets an `internal` reply, the loop goes on
                log.exception("trigger request not handled")
                envelope, body = split_envelope(data)
                self._reply_internal(envelope, echo_ids(body), exc)

    def _reply_internal(self, envelope: list[bytes] | None, request: dict[str, Any] | None, exc: Exception) -> None:
        """The reply to a request whose handling failed by a bug; never raises (the loop must go on)."""
        if envelope is None:
            return
        try:
            self._reply_error(envelope, request or {}, INTERNAL, f"request not handled: {exc!r}"[:300])
        except Exception:
            log.exception("trigger: even the internal-error reply failed; the client will time out")

    def _next_deadline_ms(self) -> int:
        if not self._pending:
            return 1000
        soonest = min(p.deadline for p in self._pending)
        return max(0, min(1000, int((soonest - time.monotonic()) * 1000) + 1))

    def _drain_wake_pipe(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _on_request(self, frames: list[bytes], client: str) -> None:
        self.requests += 1
        envelope, body = split_envelope(frames)
        if envelope is None:
            log.debug("trigger: unroutable message of %d frames ignored", len(frames))
            return
        try:
            parsed = parse_request(body)
            request = parsed.model_dump()
        except RequestError as exc:
            self._reply_error(envelope, exc.request, BAD_REQUEST, str(exc))
            return
        if self._per_client[client] >= self.max_pending_per_client:
            text = f"{self._per_client[client]} requests outstanding from this client; try again"
            self._reply_error(envelope, request, BUSY, text)
            return
        if len(self._pending) >= self.max_pending:
            self._reply_error(envelope, request, BUSY, f"{len(self._pending)} requests outstanding; try again")
            return
        timeout_s = self.timeout_s
        try:
            if isinstance(parsed, ControlRequest):
                if self.control is None:
                    raise LinewatchError(f"{parsed.request} requests are not served here")
                future = self.control(request)
                timeout_s = max(timeout_s, CONTROL_TIMEOUT_S)
            else:
                future = self.handler(request["camera"], request["part_id"])
        except KeyError:
            self._reply_error(envelope, request, UNKNOWN_CAMERA, f"unknown camera {request['camera']!r}")
            return
        except LinewatchError as exc:
            code = UNKNOWN_CAMERA if str(exc).startswith("unknown camera") else REJECTED
            self._reply_error(envelope, request, code, str(exc))
            return
        except Exception as exc:
            log.exception("trigger handler failed for %r", request)
            self._reply_error(envelope, request, INTERNAL, f"handler failed: {exc}")
            return
        if not isinstance(future, Future):
            self._reply_error(envelope, request, INTERNAL, "handler did not return a Future")
            return
        future.add_done_callback(self._wake)  # before it counts as pending: nothing after this can fail
        self._pending.append(_Pending(envelope, request, future, time.monotonic() + timeout_s, client))
        self._per_client[client] += 1

    def _answer_ready(self) -> None:
        if not self._pending:
            return
        now = time.monotonic()
        done: list[_Pending] = []
        expired: list[_Pending] = []
        waiting: list[_Pending] = []
        for item in self._pending:  # one pass: a future finishing meanwhile is seen in the next round
            (done if item.future.done() else expired if now >= item.deadline else waiting).append(item)
        if not done and not expired:
            return
        self._pending = waiting  # before replying: `pending` is read from other threads
        for item in done + expired:
            self._per_client[item.client] -= 1
            if self._per_client[item.client] <= 0:
                del self._per_client[item.client]
        for item in done:
            try:
                self._reply_result(item)
            except Exception as exc:  # a bug met on this result: its request gets `internal`, the others go on
                log.exception("trigger result for %r not handled", item.request)
                self._reply_internal(item.envelope, item.request, exc)
        for item in expired:
            item.future.cancel()
            self._reply_error(item.envelope, item.request, TIMEOUT, f"no result within {self.timeout_s:g} s")

    def _reply_result(self, item: _Pending) -> None:
        request = item.request
        if request.get("request") in CONTROL_KINDS:
            self._reply_control(item)
            return
        try:
            value = item.future.result()
        except Exception as exc:  # accepted, but no result: frame dropped, daemon stopping, ...
            self._reply_error(item.envelope, request, FAILED, str(exc) or exc.__class__.__name__)
            return
        try:
            header, mask = unpack_result(value)
            check_result_header(header, "result")
            if header.get("camera") != request["camera"] or header.get("part_id") != request["part_id"]:
                raise ValueError(f"result is for camera {header.get('camera')!r} part {header.get('part_id')!r}")
            mask = check_mask_frame(header, mask or b"", "result")
        except (ProtocolError, TypeError, ValueError) as exc:  # a daemon bug: never hand out a doubtful result
            log.error("trigger result for %r is malformed: %s", request, exc)
            self._reply_error(item.envelope, request, INTERNAL, f"malformed result: {exc}")
            return
        reply = _reply_base(request) | {"ok": True, "result": header}
        self.outcomes[OK] += 1
        self._send(item.envelope, [encode_json(reply), mask or b""])

    def _reply_control(self, item: _Pending) -> None:
        """A recipe/verify reply: the daemon's payload (`ok`, and `code`/`error` when not ok) on the usual base."""
        try:
            payload = dict(item.future.result())
        except Exception as exc:
            self._reply_error(item.envelope, item.request, FAILED, str(exc) or exc.__class__.__name__)
            return
        ok = payload.get("ok") is True
        code = OK if ok else str(payload.get("code") or FAILED)
        if not ok:
            self.errors[code] = self.errors.get(code, 0) + 1
            payload = payload | {"ok": False, "code": code, "error": str(payload.get("error") or code)}
        self.outcomes[code] = self.outcomes.get(code, 0) + 1
        reply = _reply_base(item.request) | payload
        self._send(item.envelope, [encode_json(reply), b""])

    def _reply_error(self, envelope: list[bytes], request: dict[str, Any], code: str, message: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1
        self.outcomes[code] = self.outcomes.get(code, 0) + 1
        reply = _reply_base(request) | {"ok": False, "code": code, "error": message}
        self._send(envelope, [encode_json(reply), b""])

    def _send(self, envelope: list[bytes], body: list[bytes]) -> None:
        try:
            self._socket.send_multipart(envelope + body, flags=zmq.NOBLOCK)
            self.replies += 1
        except zmq.ZMQError as exc:  # the client's queue is full or it is gone: it will time out and retry
            log.warning("trigger reply not sent: %s", exc)


# --- pure helpers ------------------------------------------------------------------------------------------
def client_of(frame: zmq.Frame) -> str:
    """Who sent a message, for the per-client cap: its CURVE public key (the ZAP handler's User-Id) when CURVE is
    on, else its address. Not the ROUTER identity: that is per connection, and a flooder could reconnect."""
    for prop in ("User-Id", "Peer-Address"):
        try:
            value = frame.get(prop)
        except zmq.ZMQError:  # not set on this connection (no ZAP handler; ipc://)
            continue
        if value:
            return f"{prop}:{value}"
    return LOCAL_CLIENT


class RequestError(ProtocolError):
    """A request that gets a bad_request reply; `request` holds the ids that could be read, to echo them."""

    def __init__(self, message: str, request: dict[str, Any] | None = None):
        super().__init__(message)
        self.request = request or {}


Id = Annotated[StrictStr, Field(min_length=1, max_length=MAX_PART_ID_CHARS)]


class TriggerRequest(TolerantModel):
    """`{"camera", "part_id", "request_id"?}`; other keys are ignored. An explicit null request_id is refused.
    `part_id` is printable text only: it goes into results, logs and MES records, where a control character
    (a newline, an escape sequence, a right-to-left override) could forge or hide what a person reads."""

    camera: Id
    part_id: Id
    request_id: StrictStr | StrictInt = None  # type: ignore[assignment]

    @field_validator("part_id")
    @classmethod
    def _printable(cls, value: str) -> str:
        if not value.isprintable():
            bad = next(c for c in value if not c.isprintable())
            raise ValueError(f"printable text only, got the control/format character U+{ord(bad):04X}")
        return value

    @field_validator("request_id")
    @classmethod
    def _short_enough(cls, value: str | int) -> str | int:
        if not _echoable(value):
            raise ValueError(f"at most {MAX_PART_ID_CHARS} characters, to be echoed")
        return value


class ControlRequest(TolerantModel):
    """`{"request": "recipe", "recipe": NAME, "force"?: bool}` (switch the recipe between parts) or
    `{"request": "verify"}` (judge the active recipe's golden set); `request_id` as for inspections."""

    request: Literal["recipe", "verify"]
    recipe: Union[Id, None] = None
    force: StrictBool = False
    request_id: StrictStr | StrictInt = None  # type: ignore[assignment]

    @model_validator(mode="after")
    def _recipe_named(self) -> "ControlRequest":
        if self.request == "recipe" and self.recipe is None:
            raise ValueError("a recipe request needs `recipe`: the name of the recipe to switch to")
        if self.request_id is not None and not _echoable(self.request_id):
            raise ValueError(f"request_id: at most {MAX_PART_ID_CHARS} characters, to be echoed")
        return self


def split_envelope(frames: list[bytes]) -> tuple[list[bytes] | None, list[bytes]]:
    """ROUTER frames -> (routing envelope to echo, body). REQ clients add an empty delimiter, DEALERs may not."""
    if not frames:
        return None, []
    if len(frames) >= 2 and frames[1] == b"":
        return frames[:2], frames[2:]
    return frames[:1], frames[1:]


def parse_request(body: list[bytes]) -> TriggerRequest | ControlRequest:
    """The request of a body `[JSON]`; RequestError (with whatever ids could be read) otherwise. `request`
    (default "inspect") says which: inspect a part, or the control requests recipe and verify."""
    if len(body) != 1:
        raise RequestError(f"expected one frame with a JSON object, got {len(body)} frames")
    data = body[0]
    if len(data) > MAX_REQUEST_BYTES:
        raise RequestError(f"request of {len(data)} bytes: at most {MAX_REQUEST_BYTES}")
    request = json_object(data, RequestError)
    kind = request.get("request", "inspect")
    try:
        if kind in CONTROL_KINDS:
            return validate(ControlRequest, request, "request", error=RequestError)
        if kind != "inspect":
            raise RequestError(f"request: unknown request {str(kind)[:40]!r}: expected inspect, recipe or verify")
        return validate(TriggerRequest, request, "request", error=RequestError)
    except RequestError as exc:
        exc.request = _ids(request)
        raise


def echo_ids(body: list[bytes]) -> dict[str, Any]:
    """The ids of a request that can be echoed, read without the request model (for a reply after a bug)."""
    try:
        return _ids(json_object(body[0], RequestError)) if len(body) == 1 else {}
    except Exception:
        return {}


def _ids(request: dict[str, Any]) -> dict[str, Any]:
    return {k: request[k] for k in ("request_id", "part_id", "camera") if _echoable(request.get(k))}


def _echoable(value: Any) -> bool:
    return (isinstance(value, str) and len(value) <= MAX_PART_ID_CHARS) or (
        isinstance(value, int) and not isinstance(value, bool)
    )


def _reply_base(request: dict[str, Any]) -> dict[str, Any]:
    base = {
        "schema_version": SCHEMA_VERSION,
        "kind": REPLY,
        "request_id": request.get("request_id"),
        "camera": request.get("camera"),
        "part_id": request.get("part_id"),
    }
    if request.get("request") in CONTROL_KINDS:
        base["request"] = request["request"]
    return base


def unpack_result(value: Any) -> tuple[dict[str, Any], bytes | None]:
    """A handler future's value: `(header, mask_png)` or `{"header": ..., "mask": ...}`."""
    if isinstance(value, dict) and "header" in value:
        header, mask = value["header"], value.get("mask")
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        header, mask = value
    else:
        raise TypeError(f"handler future gave {type(value).__name__}: expected (header, mask_png)")
    if not isinstance(header, dict) or not (mask is None or isinstance(mask, (bytes, bytearray, memoryview))):
        raise TypeError("handler future gave a header that is not a dict or a mask that is not bytes")
    return jsonable(header), None if mask is None else bytes(mask)
