"""Optional archive of failed parts (frame + mask PNGs) under a size cap (torch-free).

Runs in its own thread behind a bounded queue: a slow or full disk only costs archived images (counted and
logged), never inspection time. The oldest files go first when the cap is reached, and only files the archive
wrote itself (its naming scheme, `OWN_FILE`): anything else in the folder is never counted, moved or deleted.
"""

from __future__ import annotations

import logging
import queue
import re
import stat
import threading
import time
from collections import deque
from pathlib import Path
from typing import TypeAlias

import cv2
import numpy as np

log = logging.getLogger("linewatch.line.archive")

LOG_EVERY_S = 60.0
PREFIX = "linewatch-"
# what write() names its files: [linewatch-]UTC time_camera_seq_verdict[_mask].png (no prefix before the prefix
# was added); a foreign file needs this exact shape to be mistaken for one
OWN_FILE = re.compile(r"^(?:linewatch-)?\d{8}T\d{6}\.\d{3}_[A-Za-z0-9_-]+_\d{9,}_(?:OK|NOK|ERROR)(?:_mask)?\.png$")

# what write() takes: camera, seq, verdict, image, mask PNG, wall time
_Item: TypeAlias = tuple[str, int, str, np.ndarray | None, bytes | None, float]


class Archive:
    def __init__(self, folder: str | Path, max_bytes: int, queue_size: int = 64):
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)
        self.saved = 0
        self.errors = 0  # failed writes
        self.skipped = 0  # queue full
        self.deleted = 0
        self._files: deque[tuple[Path, int]] = deque()  # oldest first
        self._bytes = 0
        self._last_log = 0.0
        self._closing = False
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=queue_size)  # None: stop
        self._thread = threading.Thread(target=self._run, name="archive", daemon=True)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._scan()
        except OSError as exc:
            self.errors += 1
            self._error(f"cannot prepare archive folder {self.folder}: {exc}")

    def _scan(self) -> None:
        """Pick up the files an earlier run wrote (its naming scheme only), oldest first, to count them in the cap."""
        files = []
        for path in self.folder.iterdir():
            if not OWN_FILE.match(path.name):
                continue
            try:
                st = path.lstat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):  # a link or folder under an archive name was not written by us
                files.append((st.st_mtime, path, st.st_size))
        for _, path, size in sorted(files):
            self._files.append((path, size))
            self._bytes += size

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def start(self) -> None:
        self._thread.start()

    def health(self) -> str | None:
        """None while the writer is fine (or was never started or was closed on purpose), else why not."""
        if self._thread.ident is not None and not self._thread.is_alive() and not self._closing:
            return "archive writer thread has died"
        return None

    def submit(self, camera: str, seq: int, verdict: str, image: np.ndarray | None, mask_png: bytes | None) -> bool:
        """Queue a frame for writing; False (counted) when the writer is behind."""
        try:
            self._queue.put_nowait((camera, seq, verdict, image, mask_png, time.time()))
            return True
        except queue.Full:
            self.skipped += 1
            self._error("archive writer behind; frame not archived")
            return False

    def close(self, timeout: float = 2.0) -> None:
        self._closing = True
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self.write(*item)
            except Exception as exc:  # never let the archive thread die
                self._error(f"archive write failed: {exc}")

    def write(
        self, camera: str, seq: int, verdict: str, image: np.ndarray | None, mask_png: bytes | None, wall_time: float
    ) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(wall_time)) + f"{wall_time % 1:.3f}"[1:]
        stem = f"{PREFIX}{stamp}_{camera}_{seq:09d}_{verdict}"
        blobs = []
        if image is not None:
            ok, buf = cv2.imencode(".png", image)
            if ok:
                blobs.append((self.folder / f"{stem}.png", buf.tobytes()))
        if mask_png is not None:
            blobs.append((self.folder / f"{stem}_mask.png", mask_png))
        written = 0
        for path, data in blobs:
            self._make_room(len(data))
            try:
                path.write_bytes(data)
            except OSError as exc:
                self.errors += 1
                self._error(f"cannot write {path}: {exc}")
                try:
                    path.unlink()
                except OSError:
                    pass
                continue
            self._files.append((path, len(data)))
            self._bytes += len(data)
            written += 1
        if written:
            self.saved += 1

    def _make_room(self, incoming: int) -> None:
        while self._files and self._bytes + incoming > self.max_bytes:
            path, size = self._files.popleft()
            try:
                path.unlink()
                self.deleted += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._error(f"cannot delete {path}: {exc}")
            self._bytes -= size

    def _error(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            log.warning("%s (errors %d, skipped %d so far)", message, self.errors, self.skipped)
            self._last_log = now
