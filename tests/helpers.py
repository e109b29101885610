"""Shared test helpers, real parts only: camera-like sources (an MJPEG video file, an HTTP multipart/x-mixed-replace
stream that can be stopped and restarted on the same port, i.e. an outage) and a real systemd notify socket."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from linewatch.demo.run import free_port
from linewatch.protocol.wire import ResultHeader

__all__ = ["free_port"]  # one definition for the demo, the benchmarks and the tests


def write_video(path: str | Path, frames: list[np.ndarray], fps: float = 25.0) -> Path:
    path = Path(path)
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened(), "OpenCV cannot write MJPG .avi"
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def grey(level: int = 128, size: int = 64) -> np.ndarray:
    return np.full((size, size, 3), level, np.uint8)


def with_white_square(size: int = 64, side: int = 16) -> np.ndarray:
    img = grey(128, size)
    img[8 : 8 + side, 8 : 8 + side] = 255
    return img


class MjpegServer:
    """HTTP MJPEG camera on 127.0.0.1. stop() closes the port and every open stream; start() again reopens it."""

    def __init__(self, port: int, frame_fn: Callable[[int], np.ndarray], fps: float = 50.0):
        self.port = port
        self.frame_fn = frame_fn
        self.period = 1.0 / fps
        self.sent = 0
        self._server: http.server.ThreadingHTTPServer | None = None
        self._running = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream.mjpg"

    def start(self) -> "MjpegServer":
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    while outer._running.is_set():
                        ok, buf = cv2.imencode(".jpg", outer.frame_fn(outer.sent), [cv2.IMWRITE_JPEG_QUALITY, 95])
                        part = (
                            b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(buf)
                            + buf.tobytes()
                            + b"\r\n"
                        )
                        self.wfile.write(part)
                        self.wfile.flush()
                        outer.sent += 1
                        time.sleep(outer.period)
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        http.server.ThreadingHTTPServer.allow_reuse_address = True
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._running.set()
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._running.clear()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        time.sleep(2 * self.period)  # let handler threads notice and close their sockets


# --- result headers -------------------------------------------------------------------------------------------


def result_header(
    camera: str, seq: int, verdict: str = "NOK", score: float | None = 0.9, **fields: Any
) -> ResultHeader:
    """A valid result header as the daemon builds it (before the publisher stamps it); `fields` override its keys."""
    regions = fields.pop("regions", [])
    base: dict[str, Any] = dict(
        frame_time=time.time(),
        part_id=None,
        thresholds={"pixel": 0.5, "image": None},
        calibration_version=1,
        model_id="abcdefabcdef",
        regions=regions,
        regions_total=len(regions),
        error=None,
        frame_index=None,
        mask=None,
    )
    return ResultHeader(camera=camera, seq=seq, verdict=verdict, image_score=score, **(base | fields))


# --- systemd notify socket ------------------------------------------------------------------------------


class NotifySocket:
    """A real sd_notify datagram socket, as systemd gives a Type=notify service: read continuously by a thread
    (as systemd does), or never read (`reading=False`: a receiver that has stalled, its queue soon full)."""

    def __init__(self, path: Path, reading: bool = True):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.messages: list[str] = []
        if reading:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                continue
            except OSError:
                return

    def drain(self) -> list[str]:
        """What was received so far (the reader thread keeps appending)."""
        time.sleep(0.06)
        return self.messages


def fill_queue(path: str) -> int:
    """Queue datagrams until the kernel refuses more (max_dgram_qlen differs between machines)."""
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.setblocking(False)
    n = 0
    try:
        while True:
            sender.sendto(b"FILL", path)
            n += 1
    except BlockingIOError:
        return n


# --- bundles that `linewatch check-config` passes ----------------------------------------------------------------


def calibrated_bundle(path: str | Path, size: int = 64) -> Path:
    """A deviation bundle (tests/bundles.py) with a calibration for its fp32 graph: one `linewatch run` can judge
    parts with, so `linewatch check-config` passes it."""
    from linewatch.calibrate.store import write_calibration
    from tests.bundles import make_deviation_bundle

    folder = make_deviation_bundle(path, size, size)
    write_calibration(folder, 0.5)
    return folder


# --- unusable image files -------------------------------------------------------------------------------------


def write_bad_images(folder: str | Path) -> list[Path]:
    """Three image files that cannot be used, each broken differently: a PNG cut in half, a text file named .jpg
    and a PNG whose header claims 100 000² pixels (a decompression bomb)."""
    import struct
    import zlib

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ok, png = cv2.imencode(".png", (np.random.default_rng(0).random((48, 48, 3)) * 255).astype(np.uint8))
    assert ok

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
    files = {"cut_in_half.png": png.tobytes()[: len(png) // 2], "notes.jpg": b"not an image\n", "bomb.png": bomb}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [folder / name for name in files]
