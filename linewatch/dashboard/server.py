"""`linewatch dashboard`: the operator's web page, a Starlette app served by uvicorn in its own process.

A thread owns the ZeroMQ Subscriber (results, status, previews) and feeds `DashboardState`; browsers get a snapshot
from `/api/state` and then live events over Server-Sent Events. Nothing is fetched from the internet: the page, its
script and the vendored chart library are served from `static/`. The daemon gets no extra work: it publishes the
same messages whether or not a dashboard listens.

Security: loopback by default, where only requests naming a loopback host are answered (a DNS-rebinding page
cannot reach it); marking parts (`--feedback`) beyond loopback needs a token, sent as `Authorization: Bearer`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import stat
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import cv2
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from linewatch.dashboard.state import DashboardState, Event, Part, part_links
from linewatch.errors import ConfigError
from linewatch.protocol.wire import jsonable

log = logging.getLogger("linewatch.dashboard")

STATIC = Path(__file__).parent / "static"
TOKEN_ENV = "LINEWATCH_DASHBOARD_TOKEN"
MIN_TOKEN_CHARS = 16
CAMERA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_FEEDBACK_BODY = 16 * 1024
MAX_WHO, MAX_WHY = 100, 2000
CLIENT_QUEUE = 2000  # events a browser may lag behind before its stream is closed (it reconnects and resyncs)
KEEPALIVE_S = 15.0
TICK_S = 0.25
PENDING_EVERY_S = 10.0
FEEDBACK_FITS = {"false_reject": "NOK", "missed_defect": "OK"}  # the verdict each correction contradicts
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


# --- settings -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    endpoint: str
    camera: str | None
    host: str
    port: int
    loopback: bool
    archive: Path | None
    feedback: Path | None
    token: str | None
    server_key: bytes | None
    client_keys: tuple[bytes, bytes] | None
    history: int
    gallery: int
    previews: int
    status_interval: float | None


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[IPv6]:PORT` (port 0: any free port)."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]\s]+):(\d{1,5})", text.strip())
    if not m:
        raise ConfigError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080 or [::1]:8080")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if port > 65535:
        raise ConfigError(f"--listen {text!r}: port {port} is not a TCP port (0-65535)")
    return host, port


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def host_name(host: str) -> str:
    """The name in a Host header: `127.0.0.1:8080` -> `127.0.0.1`, `[::1]:8080` -> `::1`."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def load_token(path: str | None) -> str | None:
    """The marking token from `--token-file` (private to its owner) or the environment; None when neither."""
    if path:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"--token-file {file}: not found")
        if os.name == "posix":
            mode = stat.S_IMODE(file.stat().st_mode)
            if mode & 0o077:
                raise ConfigError(
                    f"--token-file {file}: readable by group or others (mode {mode:04o}); "
                    f"make it private to its owner: chmod 600 {file}"
                )
        try:
            token = file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--token-file {file}: cannot read it ({exc})") from None
        where = f"--token-file {file}"
    elif os.environ.get(TOKEN_ENV):
        token, where = os.environ[TOKEN_ENV].strip(), f"environment variable {TOKEN_ENV}"
    else:
        return None
    if len(token) < MIN_TOKEN_CHARS or not token.isprintable() or any(c.isspace() for c in token):
        raise ConfigError(
            f"{where}: the token must be one word of at least {MIN_TOKEN_CHARS} printable characters "
            '(make one with: python -c "import secrets; print(secrets.token_urlsafe(32))")'
        )
    return token


def settings_from_args(args: argparse.Namespace) -> Settings:
    from linewatch.protocol.curve import client_keys_from_args

    host, port = parse_listen(args.listen)
    loopback = is_loopback_host(host)
    for name in ("history", "gallery", "previews"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(args, name)}")
    interval = args.status_interval
    if interval is not None and not 0.05 <= interval <= 60:
        raise ConfigError(f"--status-interval must be 0.05 to 60 s (as publish.status_interval_s), got {interval}")
    if args.camera is not None and not CAMERA_NAME.match(args.camera):
        raise ConfigError(f"--camera {args.camera!r}: camera names are letters, digits, '-' and '_'")
    archive = Path(args.archive) if args.archive else None
    if archive is not None and archive.exists() and not archive.is_dir():
        # a folder that does not exist yet is fine: the daemon creates it with its first archived part
        raise ConfigError(f"--archive {archive}: not a folder (the daemon's archive.dir)")
    feedback = Path(args.feedback) if args.feedback else None
    token = load_token(args.token_file)
    if feedback is not None:
        if not loopback and token is None:
            raise ConfigError(
                f"--listen {args.listen} is beyond loopback: marking parts (--feedback) there needs a token "
                f"(--token-file FILE or {TOKEN_ENV}), so that only operators who know it can write training data"
            )
        try:
            feedback.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--feedback {feedback}: cannot create it ({exc})") from None
        if not os.access(feedback, os.W_OK | os.X_OK):
            raise ConfigError(f"--feedback {feedback}: not writable by this user")
    server_key, client_keys = client_keys_from_args(args)
    return Settings(
        endpoint=args.connect,
        camera=args.camera,
        host=host,
        port=port,
        loopback=loopback,
        archive=archive,
        feedback=feedback,
        token=token,
        server_key=server_key,
        client_keys=client_keys,
        history=args.history,
        gallery=args.gallery,
        previews=args.previews,
        status_interval=interval,
    )


# --- the hub: state, feeder thread, browsers ------------------------------------------------------------------------
class Client:
    """One browser's event stream: a bounded queue; None ends the stream."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=CLIENT_QUEUE)
        self.closed = False


def sse(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(jsonable(data), separators=(',', ':'), allow_nan=False)}\n\n"


class Hub:
    """Owns the state (behind a lock), the thread that feeds it from ZeroMQ, and the browsers' queues."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.state = DashboardState(
            history=settings.history,
            gallery=settings.gallery,
            previews=settings.previews,
            status_interval_s=settings.status_interval,
            source=settings.endpoint,
        )
        self.lock = threading.Lock()
        self.clients: set[Client] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pending: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._feed, name="dashboard-subscriber", daemon=True)
        self.feed_error: str | None = None

    # feeding (its own thread: the ZeroMQ socket lives and dies there)
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=3)

    def _feed(self) -> None:
        from linewatch.protocol.client import Subscriber

        s = self.settings
        try:
            with Subscriber(
                s.endpoint, s.camera, server_key=s.server_key, client_keys=s.client_keys, previews=True
            ) as sub:
                last_tick = 0.0
                while not self._stop.is_set():
                    msg = sub.recv(timeout_s=TICK_S)
                    now = time.monotonic()
                    events: list[Event] = []
                    with self.lock:
                        if msg is not None:
                            events += self.state.on_message(msg, now)
                            last_tick = now
                        self.state.invalid = sub.invalid
                        if now - last_tick >= TICK_S:
                            events += self.state.tick(now)
                            last_tick = now
                    if events:
                        self.publish(events)
        except Exception as exc:  # the page must say so, not go quiet
            self.feed_error = f"subscriber stopped: {exc}"
            log.exception("dashboard subscriber thread failed")
            banner = {"kind": "lifebit", "camera": "", "level": "error", "active": True, "text": self.feed_error}
            self.publish([("banner", banner)])

    # browsers (the event loop's thread)
    def publish(self, events: list[Event]) -> None:
        if self.loop is None or self.loop.is_closed() or not self.clients:
            return  # nobody watching: not even worth encoding
        encoded = [sse(name, data) for name, data in events]
        with contextlib.suppress(RuntimeError):  # loop closing
            self.loop.call_soon_threadsafe(self._fanout, encoded)

    def _fanout(self, encoded: list[str]) -> None:
        for client in list(self.clients):
            for item in encoded:
                try:
                    client.queue.put_nowait(item)
                except asyncio.QueueFull:  # this browser is too slow: end its stream, it reconnects and resyncs
                    self._close(client)
                    break

    def _close(self, client: Client) -> None:
        client.closed = True
        self.clients.discard(client)
        while not client.queue.empty():
            client.queue.get_nowait()
        client.queue.put_nowait(None)

    def connect(self) -> Client:
        client = Client()
        self.clients.add(client)
        return client

    def disconnect(self, client: Client) -> None:
        self.clients.discard(client)

    def close_clients(self) -> None:
        for client in list(self.clients):
            self._close(client)

    # feedback counts
    def refresh_pending(self) -> dict[str, int]:
        from linewatch.feedback import pending_counts

        assert self.settings.feedback is not None
        pending = dict(pending_counts(self.settings.feedback))
        self.pending = pending
        return pending


# --- archive --------------------------------------------------------------------------------------------------------
def archived_frame(folder: Path, camera: str, seq: int, run_id: str | None) -> Path | None:
    """The archived full frame (PNG, after the ROI crop) of exactly this part: camera, seq and run_id as in the
    entry's header (linewatch/line/archive.py names the files `..._<camera>_<seq>_<verdict>`)."""
    if run_id is None:
        return None
    for sidecar in folder.glob(f"*_{camera}_{seq:09d}_*.json"):
        try:
            record = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict):
            continue
        if record.get("camera") != camera or record.get("seq") != seq or record.get("run_id") != run_id:
            continue
        frame = (record.get("archive") or {}).get("frame")
        if isinstance(frame, str) and frame == Path(frame).name:
            path = folder / frame
            if path.is_file():
                return path
    return None


# --- images for the page --------------------------------------------------------------------------------------------
def colour_heatmap(png: bytes, opaque: bool = False) -> bytes:
    """The preview's grey heat map (128 ≈ the pixel threshold) as a colour-mapped RGBA PNG, transparent where the
    map is low, so it can lie over the frame without hiding it (`opaque`: the colour map alone, to show beside)."""
    grey = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    if grey is None:
        raise ValueError("heat map is not a readable PNG")
    colour = cv2.applyColorMap(grey, cv2.COLORMAP_JET)
    alpha = np.full(grey.shape, 255.0) if opaque else np.clip((grey.astype(np.float32) - 32.0) / 96.0, 0.0, 1.0) * 170
    rgba = np.dstack([colour, alpha.astype(np.uint8)])
    ok, buf = cv2.imencode(".png", rgba)
    if not ok:
        raise ValueError("cannot encode the heat map")
    return buf.tobytes()


def mask_outline(png: bytes) -> bytes:
    """The published mask as an RGBA PNG holding only its outline (the defect's border stays visible)."""
    mask = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError("mask is not a readable PNG")
    contours, _ = cv2.findContours((mask >= 128).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    rgba = np.zeros((*mask.shape, 4), np.uint8)
    thickness = max(1, round(max(mask.shape) / 160))
    cv2.drawContours(rgba, contours, -1, (255, 255, 0, 255), thickness)  # BGRA: cyan
    ok, buf = cv2.imencode(".png", rgba)
    if not ok:
        raise ValueError("cannot encode the mask outline")
    return buf.tobytes()


# --- HTTP -----------------------------------------------------------------------------------------------------------
NO_STORE = {"Cache-Control": "no-store"}


def error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers={**NO_STORE, **headers})


class Guard:
    """Security headers on every response; on loopback, only requests that name a loopback host (DNS rebinding)."""

    def __init__(self, app: ASGIApp, loopback_only: bool):
        self.app = app
        self.loopback_only = loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.loopback_only:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if not is_loopback_host(host_name(host)):  # an IP or exactly "localhost", never 127.evil.example
                await error(421, f"this dashboard answers loopback addresses only, not host {host!r}")(
                    scope, receive, send
                )
                return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def make_app(settings: Settings, hub: Hub | None = None) -> ASGIApp:
    hub = hub or Hub(settings)
    feedback_on = settings.feedback is not None

    def find(request: Request) -> tuple[Part | None, str, int]:
        camera = request.path_params["camera"]
        seq = int(request.path_params["seq"])
        with hub.lock:
            part = hub.state.part(camera, seq) if CAMERA_NAME.match(camera) else None
        return part, camera, seq

    def frame_of(part: Part, prefer_archive: bool) -> tuple[bytes | Path, str, str] | None:
        """(image bytes or file, media type, source) for a part: the archived full frame, else the preview JPEG."""
        if prefer_archive and settings.archive is not None:
            path = archived_frame(settings.archive, part.camera, part.seq, part.run_id)
            if path is not None:
                return path, "image/png", "archive"
        if part.jpeg is not None:
            return part.jpeg, "image/jpeg", "preview"
        return None

    def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=NO_STORE)

    def state(request: Request) -> JSONResponse:
        with hub.lock:
            snap = hub.state.snapshot(time.monotonic())
        snap["feedback"] = {
            "enabled": feedback_on,
            "pending": hub.pending if feedback_on else {},
            "token_required": feedback_on and settings.token is not None,
            "kinds": FEEDBACK_FITS,
        }
        snap["archive"] = settings.archive is not None
        snap["daemon"]["feed_error"] = hub.feed_error
        return JSONResponse(jsonable(snap), headers=NO_STORE)

    async def events(request: Request) -> StreamingResponse:
        client = hub.connect()

        async def stream() -> AsyncIterator[str]:
            try:
                yield "retry: 2000\n\n"
                while True:
                    try:
                        item = await asyncio.wait_for(client.queue.get(), KEEPALIVE_S)
                    except asyncio.TimeoutError:
                        yield ": keepalive\n\n"
                        continue
                    if item is None:
                        return
                    yield item
            finally:
                hub.disconnect(client)

        headers = {**NO_STORE, "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    def frame(request: Request) -> Response:
        part, camera, seq = find(request)
        if part is None:
            return error(404, f"part {camera}/{seq} is not held by this dashboard (too old, or never received)")
        found = frame_of(part, request.query_params.get("preview") != "1")
        if found is None:
            return error(404, f"no frame for part {camera}/{seq}: no preview arrived and the archive has none")
        content, media, source = found
        headers = {**NO_STORE, "X-Frame-Source": source}
        if isinstance(content, Path):
            return FileResponse(content, media_type=media, headers=headers)
        return Response(content, media_type=media, headers=headers)

    def heatmap(request: Request) -> Response:
        part, camera, seq = find(request)
        if part is None or part.heatmap is None:
            return error(404, f"no heat map for part {camera}/{seq} (no preview held, or an ERROR without a map)")
        query = request.query_params
        data = part.heatmap if query.get("raw") == "1" else colour_heatmap(part.heatmap, query.get("opaque") == "1")
        return Response(data, media_type="image/png", headers=NO_STORE)

    def mask(request: Request) -> Response:
        part, camera, seq = find(request)
        if part is None or part.mask is None:
            return error(404, f"no mask for part {camera}/{seq} (masks off, an ERROR result, or not held)")
        data = mask_outline(part.mask) if request.query_params.get("outline") == "1" else part.mask
        return Response(data, media_type="image/png", headers=NO_STORE)

    def part_detail(request: Request) -> JSONResponse:
        part, camera, seq = find(request)
        if part is None:
            return error(404, f"part {camera}/{seq} is not held by this dashboard (too old, or never received)")
        found = frame_of(part, True)
        summary = part.summary()
        links: dict[str, str | None] = dict(part_links(camera, seq))
        links["heatmap"] = links["heatmap"] if part.heatmap is not None else None
        links["mask"] = links["mask"] if part.mask is not None else None
        links["frame"] = links["frame"] if found is not None else None
        verdict = part.header.get("verdict")
        body = {
            **summary,
            "header": part.header,
            "regions": part.header.get("regions") or [],
            "regions_total": part.header.get("regions_total"),
            "defect_regions": part.header.get("defect_regions"),
            "error": part.header.get("error"),
            "thresholds": part.header.get("thresholds"),
            "links": links,
            "frame_source": None if found is None else found[2],
            "preview_image": (part.preview or {}).get("image"),
            "feedback": {
                "enabled": feedback_on,
                "allowed": [k for k, v in FEEDBACK_FITS.items() if v == verdict] if found is not None else [],
            },
        }
        return JSONResponse(jsonable(body), headers=NO_STORE)

    async def feedback(request: Request) -> JSONResponse:
        if not feedback_on:
            return error(403, "marking is off: start the dashboard with --feedback DIR to turn it on")
        if settings.token is not None:
            given = request.headers.get("authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), settings.token.encode()):
                return error(401, "a valid token is needed to mark parts", **{"WWW-Authenticate": "Bearer"})
        origin = request.headers.get("origin")
        if origin is not None and origin.split("://", 1)[-1] != request.headers.get("host"):
            return error(403, f"request from another site ({origin}) refused")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return error(415, "send the correction as application/json")
        raw = await request.body()
        if len(raw) > MAX_FEEDBACK_BODY:
            return error(413, f"request over {MAX_FEEDBACK_BODY} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            return error(400, "the body is not JSON")
        if not isinstance(body, dict):
            return error(400, "expected a JSON object {camera, seq, kind, who, why}")
        kind, camera, seq = body.get("kind"), body.get("camera"), body.get("seq")
        who, why = body.get("who", ""), body.get("why", "")
        if kind not in FEEDBACK_FITS:
            return error(400, f"kind must be one of {', '.join(FEEDBACK_FITS)}, got {str(kind)[:40]!r}")
        if not isinstance(camera, str) or not CAMERA_NAME.match(camera) or type(seq) is not int:
            return error(400, "camera (a camera name) and seq (an integer) are required")
        if not isinstance(who, str) or not who.strip() or len(who) > MAX_WHO or not who.isprintable():
            return error(400, f"who: the operator's name, 1 to {MAX_WHO} printable characters")
        if not isinstance(why, str) or len(why) > MAX_WHY or not why.replace("\n", " ").isprintable():
            return error(400, f"why: at most {MAX_WHY} printable characters")
        with hub.lock:
            part = hub.state.part(camera, seq)
        if part is None:
            return error(404, f"part {camera}/{seq} is not held by this dashboard (too old, or never received)")
        verdict = part.header.get("verdict")
        if FEEDBACK_FITS[kind] != verdict:
            return error(
                400,
                f"a {kind.replace('_', ' ')} is a correction of a {FEEDBACK_FITS[kind]} part; "
                f"part {camera}/{seq} is {verdict}",
            )
        found = await run_in_threadpool(frame_of, part, True)
        if found is None:
            return error(404, f"part {camera}/{seq} has no frame to save (no preview arrived, not in the archive)")
        content, media, source = found
        image = await run_in_threadpool(content.read_bytes) if isinstance(content, Path) else content
        from linewatch.feedback import FeedbackError, save_feedback

        assert settings.feedback is not None
        try:
            path = await run_in_threadpool(
                lambda: save_feedback(
                    settings.feedback,  # type: ignore[arg-type]
                    kind=kind,
                    camera=camera,
                    image=image,
                    image_format="png" if media == "image/png" else "jpeg",
                    header=part.header,
                    who=who.strip(),
                    why=why.strip(),
                    source=source,
                )
            )
        except FeedbackError as exc:  # e.g. already marked the other way: the operator's to resolve
            log.error("feedback for %s/%s not saved: %s", camera, seq, exc)
            return error(500 if isinstance(exc.__cause__, OSError) else 409, str(exc))
        except Exception as exc:  # the operator must see that nothing was saved, and why
            log.exception("feedback for %s/%s not saved", camera, seq)
            return error(500, f"not saved: {exc}")
        pending = await run_in_threadpool(hub.refresh_pending)
        hub.publish([("feedback", {"pending": pending, "saved": {"camera": camera, "seq": seq, "kind": kind}})])
        return JSONResponse(
            {"path": str(path), "source": source, "kind": kind, "pending": pending}, status_code=201, headers=NO_STORE
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        hub.start(asyncio.get_running_loop())
        task = None
        if feedback_on:
            await run_in_threadpool(hub.refresh_pending)
            task = asyncio.create_task(_pending_loop(hub))
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            hub.close_clients()
            await run_in_threadpool(hub.stop)

    seq = "{seq:int}"
    routes = [
        Route("/", index),
        Route("/api/state", state),
        Route("/api/events", events),
        Route(f"/api/frame/{{camera}}/{seq}.jpg", frame),
        Route(f"/api/heatmap/{{camera}}/{seq}.png", heatmap),
        Route(f"/api/mask/{{camera}}/{seq}.png", mask),
        Route(f"/api/part/{{camera}}/{seq}", part_detail),
        Route("/api/feedback", feedback, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    return Guard(app, loopback_only=settings.loopback)


async def _pending_loop(hub: Hub) -> None:
    """Corrections are used (and so no longer pending) by train/eval in other processes: re-count now and then."""
    while True:
        await asyncio.sleep(PENDING_EVERY_S)
        before = hub.pending
        try:
            pending = await run_in_threadpool(hub.refresh_pending)
        except Exception as exc:
            log.warning("cannot count pending feedback: %s", exc)
            continue
        if pending != before:
            hub.publish([("feedback", {"pending": pending})])


# --- the process ----------------------------------------------------------------------------------------------------
class _Server(uvicorn.Server):
    """uvicorn, but a SIGTERM ends the process with exit 0 after a clean shutdown (uvicorn re-raises it)."""

    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self.signals: list[int] = []

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handle(sig: int, frame: Any) -> None:
            self.signals.append(sig)
            self.handle_exit(sig, frame)

        originals = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, original in originals.items():
                signal.signal(sig, original)


def bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        raise ConfigError(f"--listen {host}:{port}: cannot listen there ({exc.strerror or exc})") from None
    return sock


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def cli_dashboard(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if settings.feedback is not None:
        import linewatch.feedback  # noqa: F401  (fail now, not at the first click)
    if not settings.loopback:
        print(
            f"dashboard: listening beyond loopback on {settings.host}: anyone who reaches this port sees the line's "
            "frames and results" + (" (marking needs the token)" if settings.feedback else ""),
            file=sys.stderr,
            flush=True,
        )
    sock = bind(settings.host, settings.port)
    port = sock.getsockname()[1]
    hub = Hub(settings)
    config = uvicorn.Config(
        make_app(settings, hub),
        log_level="warning",
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=2,
        lifespan="on",
    )
    server = _Server(config)

    async def run() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        announced = False
        while not task.done():
            if server.started and not announced:
                print(f"dashboard: {url_of(settings.host, port)}", flush=True)
                announced = True
            if server.should_exit:
                hub.close_clients()  # event streams never end by themselves
            await asyncio.sleep(0.05)
        await task

    asyncio.run(run())
    if not server.started:
        return 1
    return 130 if signal.SIGINT in server.signals else 0
