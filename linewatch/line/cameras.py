"""Camera capture via OpenCV: one thread per camera feeding a bounded, drop-oldest queue (torch-free).

A dead or stalled camera must never stall inspection: every capture call that can block has a timeout where
OpenCV offers one (FFmpeg open/read), the thread reconnects with exponential backoff, and the queue drops the
oldest frame (counted) when inference falls behind, so results stay fresh. Frames that cannot be used (corrupt
image in a folder, ROI outside the frame) travel on as frames with an `error`, so they become ERROR results
instead of disappearing.

A frame's time is taken when grab() returns it, before it is decoded. A trigger request is answered with the first
frame whose grab started after the request arrived (plus the camera's `settle_ms`): a frame exposed or in flight
when the PLC asked is never judged as that part. Sources are shown (logs, `last_error`, errors) through
`redact_source`, so a camera password never leaves the config file.

State and `last_error` describe what is happening now: a folder that vanishes takes its camera offline (not an
online camera whose every frame is an ERROR), and recovery clears the error. OpenCV's and FFmpeg's own messages
are kept off stderr (`quiet_opencv_logs`): they repeat on every reconnect attempt and flood the journal; the camera
thread logs the failure itself, with its reason, when it changes (and as a reminder every `OUTAGE_REMINDER_S`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import urlsplit

import cv2
import numpy as np

from linewatch.errors import ConfigError, DataError
from linewatch.images import as_bgr, list_images, read_image
from linewatch.line.camera_settings import CameraSettings
from linewatch.line.config import CameraConfig, load_config
from linewatch.line.frames import Frame, FrameQueue, TriggerFuture, fail_future
from linewatch.line.gating import FrameGate
from linewatch.validation import redact_source

log = logging.getLogger("linewatch.line.cameras")

T = TypeVar("T")

ONLINE, OFFLINE, RECONNECTING, FINISHED = "online", "offline", "reconnecting", "finished"
LIVE_KINDS = ("device", "url", "gstreamer")
OUTAGE_REMINDER_S = 300.0  # an unchanged failure is logged again this often (at most), never per attempt
URL_PROBE_MAX_S = 2.0
DEFAULT_PORTS = {"http": 80, "https": 443, "rtsp": 554, "rtsps": 322, "rtmp": 1935, "rtmps": 443}
FFMPEG_QUIET = "-8"  # AV_LOG_QUIET


class SourceEnded(Exception):
    """A video file or folder without looping reached its end."""


class SourceFailed(Exception):
    """Opening or reading failed; the camera thread reconnects."""


@dataclass(frozen=True)
class Grab:
    """When one grab() call started and when it returned the frame (monotonic, and wall clock for the header)."""

    started_mono: float
    done_mono: float
    done_wall: float


# --- sources --------------------------------------------------------------------------------------------


class CaptureSource:
    """cv2.VideoCapture for device, video file, URL (FFmpeg with timeouts) and GStreamer pipelines."""

    def __init__(self, cfg: CameraConfig):
        self.cfg = cfg
        self.cap = _open_capture(cfg)

    def grab(self) -> bool:
        if self.cap.grab():
            return True
        if self.cfg.kind == "video":
            if not self.cfg.loop:
                raise SourceEnded(self.cfg.shown_source)
            self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            if self.cap.grab():
                return True
        raise SourceFailed(f"no frame from {self.cfg.kind} {self.cfg.shown_source}")

    def retrieve(self) -> np.ndarray | str:
        ok, image = self.cap.retrieve()
        if not ok or image is None:
            raise SourceFailed(f"cannot decode frame from {self.cfg.kind} {self.cfg.shown_source}")
        return image

    def close(self) -> None:
        self.cap.release()


def _open_capture(cfg: CameraConfig) -> cv2.VideoCapture:
    if cfg.kind == "url":
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            cfg.open_timeout_ms,
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            cfg.read_timeout_ms,
        ]
        cap = cv2.VideoCapture(cfg.source, cv2.CAP_FFMPEG, params)
    elif cfg.kind == "gstreamer":
        cap = cv2.VideoCapture(cfg.source, cv2.CAP_GSTREAMER)
    elif cfg.kind == "device" and isinstance(cfg.source, str):
        cap = cv2.VideoCapture(cfg.source, cv2.CAP_V4L2)
    else:
        cap = cv2.VideoCapture(cfg.source)
    if not cap.isOpened():
        cap.release()
        reason = probe_url(str(cfg.source), cfg.open_timeout_ms / 1000.0) if cfg.kind == "url" else None
        raise SourceFailed(f"cannot open {cfg.kind} {cfg.shown_source}" + (f": {reason}" if reason else ""))
    return cap


def probe_url(source: str, timeout_s: float) -> str | None:
    """Why a URL camera could not be opened, as far as a TCP connect tells (refused, no answer, unknown host), or
    None for a URL without a TCP server to ask. FFmpeg's own reason only goes to stderr, which is kept quiet."""
    try:
        parts = urlsplit(source)
        host, port = parts.hostname, parts.port or DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError:
        return None
    if not host or not port:
        return None
    where = f"{host}:{port}"
    timeout_s = min(timeout_s, URL_PROBE_MAX_S)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return f"{where} accepts connections, but no stream could be opened there (path, format, credentials?)"
    except ConnectionRefusedError:
        return f"connection refused by {where}"
    except socket.timeout:
        return f"no answer from {where} within {timeout_s:g} s"
    except socket.gaierror:
        return f"host name {host!r} not resolved"
    except OSError as exc:
        return f"{where}: {exc.strerror or exc}"


def quiet_opencv_logs() -> None:
    """Keep OpenCV's log (to ERROR) and FFmpeg's (quiet) off stderr: both write there directly, several lines per
    reconnect attempt. The camera threads log failures themselves. An operator's own OPENCV_LOG_LEVEL or
    OPENCV_FFMPEG_LOGLEVEL wins; FFmpeg's is read when its backend first opens a capture, so this runs before any
    camera opens (Camera does it)."""
    if "OPENCV_LOG_LEVEL" not in os.environ:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", FFMPEG_QUIET)


class FolderSource:
    """Images of a folder in name order, as if they were a video; an unreadable image is a frame error."""

    def __init__(self, cfg: CameraConfig):
        self.cfg = cfg
        try:
            self.files = list_images(str(cfg.source))  # kind 'folder': the config made it a folder path
        except DataError as exc:
            raise SourceFailed(str(exc)) from exc
        self.pos = -1

    def grab(self) -> bool:
        self.pos += 1
        if self.pos >= len(self.files):
            if not self.cfg.loop:
                raise SourceEnded(self.cfg.shown_source)
            self.pos = 0
        return True

    def retrieve(self) -> np.ndarray | str:
        """The image, or the reason it is unusable (a frame error); a file or folder that has vanished is a
        source failure instead: the camera goes offline and lists the folder again, no stream of ERROR frames."""
        path = self.files[self.pos]
        try:
            return read_image(path)
        except DataError as exc:
            if os.path.lexists(path):
                return str(exc)
        if not Path(str(self.cfg.source)).is_dir():
            raise SourceFailed(f"image folder not found: {self.cfg.shown_source}")
        raise SourceFailed(f"{path.name} has vanished from folder {self.cfg.shown_source}")

    def close(self) -> None:
        pass


def open_source(cfg: CameraConfig) -> CaptureSource | FolderSource:
    return FolderSource(cfg) if cfg.kind == "folder" else CaptureSource(cfg)


def check_backend(cfg: CameraConfig) -> None:
    """Refuse at start-up what this OpenCV build can never open, instead of reconnecting forever."""
    if cfg.kind == "gstreamer" and not cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER):
        raise ConfigError(
            f"camera {cfg.name!r}: this OpenCV build has no GStreamer backend "
            f"(install an OpenCV built with GStreamer, or use kind 'url')"
        )
    if cfg.kind == "url" and not cv2.videoio_registry.hasBackend(cv2.CAP_FFMPEG):
        raise ConfigError(f"camera {cfg.name!r}: this OpenCV build has no FFmpeg backend for URLs")


def crop(image: np.ndarray, roi: tuple[int, ...] | None) -> np.ndarray | str:
    """The ROI of a frame, or an error message when it does not fit (the frame size can change on reconnect)."""
    if roi is None:
        return image
    x, y, w, h = roi
    height, width = image.shape[:2]
    if x + w > width or y + h > height:
        return f"roi {list(roi)} does not fit in the {width}x{height} frame"
    return image[y : y + h, x : x + w]


# --- camera thread --------------------------------------------------------------------------------------


class Camera:
    """One capture thread: open, read (paced by the fps cap), crop, queue; reconnect with backoff."""

    def __init__(self, cfg: CameraConfig, queue: FrameQueue):
        quiet_opencv_logs()
        check_backend(cfg)
        self.cfg = cfg
        self.name = cfg.name
        self.queue = queue
        queue.add_camera(cfg.name, cfg.queue_size)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._state = OFFLINE
        self._blocking_since: float | None = None
        self._triggers: deque[tuple[str, TriggerFuture, float]] = deque()
        self.captured = 0
        self.skipped = 0  # triggered mode: frames nobody asked for
        self.frame_errors = 0
        self.reconnects = 0
        self.last_frame_mono: float | None = None
        self.last_error: str | None = None  # why the camera is not online, or why its last frame failed; None: fine
        self._down_since: float | None = None  # monotonic start of the current outage
        self._logged_error: str | None = None  # the failure last logged, and when: logged again only when it changes
        self._logged_at = 0.0
        self._frame_error_since: int | None = None  # frame errors in a row since this frame count
        # locked capture properties and the image gate (docs/CAMERAS.md): reported in the status, never a stop
        self.settings = CameraSettings(cfg.name, cfg.settings)
        self.gate = FrameGate(cfg.name, cfg.gating) if cfg.gating.enabled else None
        self._thread = threading.Thread(target=self._run, name=f"camera-{cfg.name}", daemon=True)

    # public ------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def state(self) -> str:
        """online/offline/reconnecting/finished; a read blocked longer than stall_s counts as offline."""
        blocked = self.blocked_for()
        if self._state == ONLINE and blocked > self.cfg.stall_s:
            return OFFLINE
        return self._state

    def blocked_for(self, now: float | None = None) -> float:
        since = self._blocking_since
        return 0.0 if since is None else (now or time.monotonic()) - since

    def request_trigger(self, part_id: str, future: TriggerFuture) -> None:
        """Answer this request with the first frame whose grab starts from now on (plus `settle_ms`)."""
        with self._lock:  # the time is taken under the lock: the queue stays in arrival order
            self._triggers.append((part_id, future, time.monotonic()))

    def expire_triggers(self, timeout_s: float) -> int:
        now, expired = time.monotonic(), []
        with self._lock:
            while self._triggers and now - self._triggers[0][2] > timeout_s:
                expired.append(self._triggers.popleft())
        for part_id, future, _ in expired:
            fail_future(
                future,
                f"camera {self.name!r} delivered no frame for part {part_id!r} within "
                f"{timeout_s:g} s (camera {self.state})",
            )
        return len(expired)

    def fail_pending_triggers(self, reason: str) -> None:
        with self._lock:
            pending, self._triggers = list(self._triggers), deque()
        for _, future, _ in pending:
            fail_future(future, reason)

    # thread ------------------------------------------------------------------------------------------
    def _set_state(self, state: str) -> None:
        """Change state and log what changed: an outage and its reason once (again only when the reason changes,
        or as a reminder), recovery with how long it took; reconnect attempts only at DEBUG."""
        old = self._state
        if state == old:
            return
        self._state = state
        now = time.monotonic()
        if state == OFFLINE and self._stop.is_set():
            log.info("camera %s: stopped", self.name)
        elif state == OFFLINE:
            self._log_outage(now)
        elif state == ONLINE:
            if self._down_since is not None:
                log.info(
                    "camera %s: online again after %.1f s (%d reconnects so far; the failure was: %s)",
                    self.name,
                    now - self._down_since,
                    self.reconnects,
                    self._logged_error,
                )
            else:
                log.info("camera %s: online", self.name)
            self._down_since = None
            self._logged_error = None
            self.last_error = None  # recovered: the status no longer shows a failure that has passed
        elif state == FINISHED:
            log.info("camera %s: %s -> finished", self.name, old)
        else:
            log.debug("camera %s: %s -> %s", self.name, old, state)

    def _log_outage(self, now: float) -> None:
        error = self.last_error or "unknown failure"
        if self._down_since is None:
            self._down_since = now
            log.warning("camera %s: offline: %s (reconnecting with backoff)", self.name, error)
        elif error != self._logged_error or now - self._logged_at >= OUTAGE_REMINDER_S:
            log.warning(
                "camera %s: still offline after %.0f s, %d reconnects: %s",
                self.name,
                now - self._down_since,
                self.reconnects,
                error,
            )
        else:
            log.debug("camera %s: reconnect failed: %s", self.name, error)
            return
        self._logged_error, self._logged_at = error, now

    def _blocking(self, fn: Callable[[], T]) -> T:
        self._blocking_since = time.monotonic()
        try:
            return fn()
        finally:
            self._blocking_since = None

    def _run(self) -> None:
        delay = self.cfg.reconnect.initial_s
        first = True
        while not self._stop.is_set():
            self._set_state(RECONNECTING)
            if not first:
                self.reconnects += 1
            first = False
            try:
                source = self._blocking(lambda: open_source(self.cfg))
            except Exception as exc:  # SourceFailed, or cv2.error from an odd backend
                self.last_error = redact_source(str(exc))
                self._set_state(OFFLINE)
                self._stop.wait(delay)
                delay = min(delay * 2, self.cfg.reconnect.max_s)
                continue
            delivered_before = self.captured
            try:
                if self.settings.wanted:
                    self._blocking(lambda: self.settings.apply(getattr(source, "cap", None)))
                self._pump(source)
            except SourceEnded:
                self._set_state(FINISHED)
                log.info("camera %s: %s ended after %d frames", self.name, self.cfg.shown_source, self.captured)
                return
            except SourceFailed as exc:
                self.last_error = redact_source(str(exc))
            except Exception as exc:  # an OpenCV surprise must not kill the thread silently
                self.last_error = redact_source(f"{type(exc).__name__}: {exc}")
                # the traceback quotes the exception, which may quote the source: redacted like the rest
                log.error("camera %s: capture error\n%s", self.name, redact_source(traceback.format_exc()))
            finally:
                self._blocking_since = None
                source.close()
            if self._stop.is_set():
                break
            if self.captured > delivered_before:
                delay = self.cfg.reconnect.initial_s
            self._set_state(OFFLINE)
            self._stop.wait(delay)
            delay = min(delay * 2, self.cfg.reconnect.max_s)
        if self._state != FINISHED:
            self._set_state(OFFLINE)

    def _pump(self, source: CaptureSource | FolderSource) -> None:
        period = 1.0 / self.cfg.fps if self.cfg.fps > 0 else 0.0
        live = self.cfg.kind in LIVE_KINDS
        next_slot = time.monotonic()
        recheck = self.cfg.settings.recheck_s if self.settings.wanted else 0.0
        next_recheck = next_slot + recheck
        while not self._stop.is_set():
            if recheck and time.monotonic() >= next_recheck:
                next_recheck = time.monotonic() + recheck
                self.settings.recheck(getattr(source, "cap", None))
            if period and not live:
                wait = next_slot - time.monotonic()
                if wait > 0 and self._stop.wait(wait):
                    return
            started = time.monotonic()
            self._blocking(source.grab)
            grab = Grab(started, time.monotonic(), time.time())  # the frame's time: in hand, not yet decoded
            if period and live and grab.done_mono < next_slot:
                continue  # live source: keep draining so frames stay fresh, but inspect at the capped rate
            if period:
                next_slot = max(next_slot + period, grab.done_mono - period)
            if self.cfg.mode == "triggered" and not self._trigger_waiting(started):
                self._count(grab, skipped=True)  # nobody asked for it: not even decoded
                continue
            image = self._blocking(source.retrieve)
            self._deliver(image, grab)

    def _trigger_waiting(self, grab_started: float) -> bool:
        """A pending request that a frame whose grab started at `grab_started` may answer."""
        settle = self.cfg.settle_ms / 1000.0
        with self._lock:
            for _, future, requested in self._triggers:  # in arrival order: the first live one is the oldest
                if not future.done():
                    return requested + settle <= grab_started
        return False

    def _take_trigger(self, frame: Frame, grab_started: float) -> None:
        """Attach the oldest pending request that arrived at least settle_ms before this frame's grab started."""
        settle = self.cfg.settle_ms / 1000.0
        with self._lock:
            while self._triggers:
                part_id, future, requested = self._triggers[0]
                if future.done():  # timed out meanwhile: never attached to a later frame
                    self._triggers.popleft()
                    continue
                if requested + settle > grab_started:
                    return  # exposed (or in flight) before the request, or the part still moving: a later frame
                self._triggers.popleft()
                frame.part_id, frame.future = part_id, future
                return

    def _note_frame(self, error: str | None) -> None:
        """Frame errors in `last_error` while they last; logged when they start and when frames are good again."""
        if error is not None:
            self.frame_errors += 1
            self.last_error = redact_source(f"frame {self.captured}: {error}")
            if self._frame_error_since is None:
                self._frame_error_since = self.captured
                log.warning("camera %s: frame error: %s", self.name, self.last_error)
        elif self._frame_error_since is not None:
            log.info(
                "camera %s: frames good again after %d frame error(s)",
                self.name,
                self.captured - self._frame_error_since,
            )
            self._frame_error_since = None
            self.last_error = None

    def _count(self, grab: Grab, skipped: bool = False) -> None:
        self.captured += 1
        self.last_frame_mono = grab.done_mono
        self._set_state(ONLINE)
        if skipped:
            self.skipped += 1

    def _deliver(self, captured: np.ndarray | str, grab: Grab) -> None:
        error: str | None = None
        image: np.ndarray | None = None
        if isinstance(captured, str):
            error = captured
        else:
            try:
                image = as_bgr(captured)
            except DataError as exc:
                error = str(exc)
            if image is not None:
                cropped = crop(image, self.cfg.roi)
                if isinstance(cropped, str):
                    error, image = cropped, None
                else:
                    image = cropped
        gated = None if self.gate is None or image is None else self.gate.check(image)
        self._count(grab)
        # a gated frame keeps its picture (preview, archive) but is an ERROR, never scored; not a frame error
        frame = Frame(self.name, self.captured, grab.done_wall, grab.done_mono, image, gated.text if gated else error)
        self._note_frame(error)
        self._take_trigger(frame, grab.started_mono)
        if self.cfg.mode == "triggered" and frame.future is None:
            self.skipped += 1
            return
        paced = self.cfg.kind in LIVE_KINDS or self.cfg.fps > 0
        self.queue.put(frame, wait_for_room=None if paced else self._stop)


def grab_frames(config_path: str | Path, camera_name: str, n: int, timeout_s: float = 60.0) -> list[np.ndarray]:
    """N consecutive frames (after ROI) from a configured camera, for `linewatch calibrate --camera`."""
    if n < 1:
        raise ConfigError(f"frames to grab must be >= 1, got {n}")
    cfg = load_config(config_path).camera(camera_name)
    queue = FrameQueue()
    camera = Camera(cfg.model_copy(update={"mode": "continuous", "queue_size": n}), queue)
    camera.start()
    frames: list[np.ndarray] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(frames) < n:
            batch = queue.take(n - len(frames), 0.0, 0.1)
            for frame in batch:
                if frame.error is not None or frame.image is None:
                    raise DataError(f"camera {camera_name!r}: {frame.error or 'no image'}")
                frames.append(frame.image)
            if not batch and camera.state == FINISHED and queue.pending() == 0:
                raise DataError(
                    f"camera {camera_name!r}: source ended after {len(frames)} of {n} frames "
                    f"({cfg.shown_source}); ask for fewer frames or set loop: true"
                )
            if time.monotonic() > deadline:
                raise DataError(
                    f"camera {camera_name!r}: only {len(frames)} of {n} frames within {timeout_s:g} s "
                    f"(state {camera.state}{', ' + camera.last_error if camera.last_error else ''})"
                )
    finally:
        camera.stop()
        camera.join(5.0)
    if queue.dropped[camera_name]:
        log.info("camera %s: %d frames dropped while grabbing", camera_name, queue.dropped[camera_name])
    return frames
