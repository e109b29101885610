"""Optional archive of failed parts under a size cap (torch-free).

Each archived result is up to three files sharing one stem, `linewatch-<UTC time>_<camera>_<seq>_<verdict>`:
`.png` (the frame as captured, after the ROI), `_mask.png` (the defect mask as published, when there is one) and
`.json`, the result header as published (camera, seq, part_id, verdict, image_score, thresholds,
calibration_version, model_id, error, regions, publish_time, run_id) plus `"archive": {"frame", "mask"}` naming its
files. Every file is written atomically (temp file + fsync + rename) and in that order, the `.json` last: it commits
the entry. When a write fails (full disk, the folder gone) what the entry had written is removed, newest first, so
a mask or header never outlives its frame; the failure is counted (`errors`) and logged (at most once a minute).
An ERROR result without an image is archived as its `.json` alone.

Runs in its own thread behind a bounded queue: a slow or full disk only costs archived images (counted and
logged), never inspection time. The oldest entries go first when the cap is reached (header, mask, then frame),
and only files the archive wrote itself (its naming scheme, `OWN_FILE`): anything else in the folder is never
counted, moved or deleted.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import stat
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, TypeAlias

import cv2
import numpy as np

from linewatch.bundle import atomic_write_bytes

log = logging.getLogger("linewatch.line.archive")

LOG_EVERY_S = 60.0
PREFIX = "linewatch-"
_STEM = r"(?:linewatch-)?\d{8}T\d{6}\.\d{3}_[A-Za-z0-9_-]+_\d{9,}_(?:OK|NOK|ERROR)"
_SUFFIX = r"(?:_mask\.png|\.png|\.json)"
# what write() names its files: [linewatch-]UTC time_camera_seq_verdict{.png,_mask.png,.json} (no prefix before
# the prefix was added); a foreign file needs this exact shape to be mistaken for one
OWN_FILE = re.compile(rf"^{_STEM}{_SUFFIX}$")
# what atomic_write_bytes leaves behind when the process dies mid-write: ours, removed at start
OWN_TEMP = re.compile(rf"^\.{_STEM}{_SUFFIX}\.[0-9a-f]{{12}}\.tmp$")

# what write() takes: camera, seq, verdict, image, mask PNG, wall time, header as published
_Item: TypeAlias = tuple[str, int, str, np.ndarray | None, bytes | None, float, Mapping[str, Any] | None]


@dataclass
class _Entry:
    """One archived result: its files in write order (frame, mask, header) and their bytes."""

    paths: list[Path]
    size: int


def entry_name(camera: str, seq: int, verdict: str, wall_time: float) -> str:
    """The stem of the entry write() makes for a result submitted at `wall_time` (the frame is `<stem>.png`)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(wall_time)) + f"{wall_time % 1:.3f}"[1:]
    return f"{PREFIX}{stamp}_{camera}_{seq:09d}_{verdict}"


def entry_stem(name: str) -> str:
    """The stem an archive file name shares with the other files of its entry."""
    for suffix in ("_mask.png", ".png", ".json"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class Archive:
    def __init__(self, folder: str | Path, max_bytes: int, queue_size: int = 64):
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)
        self.saved = 0
        self.errors = 0  # failed writes
        self.skipped = 0  # queue full
        self.deleted = 0
        self._entries: deque[_Entry] = deque()  # oldest first
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
        """Pick up the entries an earlier run wrote (its naming scheme only), oldest first, to count them in the
        cap; remove the temp files a crash left mid-write."""
        groups: dict[str, list[tuple[float, Path, int]]] = {}
        for path in self.folder.iterdir():
            own, temp = OWN_FILE.match(path.name), OWN_TEMP.match(path.name)
            if not (own or temp):
                continue
            try:
                st = path.lstat()
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):  # a link or folder under an archive name was not written by us
                continue
            if temp:
                try:
                    path.unlink()
                except OSError as exc:
                    log.warning("cannot remove %s left by an interrupted write: %s", path, exc)
                continue
            groups.setdefault(entry_stem(path.name), []).append((st.st_mtime, path, st.st_size))
        order = {".png": 0, "_mask.png": 1, ".json": 2}
        for files in sorted(groups.values(), key=lambda fs: min(f[0] for f in fs)):
            files.sort(key=lambda f: order[f[1].name[len(entry_stem(f[1].name)) :]])
            size = sum(f[2] for f in files)
            self._entries.append(_Entry([f[1] for f in files], size))
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

    def submit(
        self,
        camera: str,
        seq: int,
        verdict: str,
        image: np.ndarray | None,
        mask_png: bytes | None,
        header: Mapping[str, Any] | None = None,
        wall_time: float | None = None,
    ) -> bool:
        """Queue a result for writing (`header`: as published; `wall_time`: the time its file names carry, see
        entry_name, default now); False (counted) when the writer is behind."""
        wall_time = time.time() if wall_time is None else wall_time
        try:
            self._queue.put_nowait((camera, seq, verdict, image, mask_png, wall_time, header))
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
                self.errors += 1
                self._error(f"archive write failed: {exc}")

    def write(
        self,
        camera: str,
        seq: int,
        verdict: str,
        image: np.ndarray | None,
        mask_png: bytes | None,
        wall_time: float,
        header: Mapping[str, Any] | None = None,
    ) -> bool:
        """Write one entry: frame, mask, then the header as the commit; on any failure remove what this entry
        wrote (newest first) and count one error. True when the entry is complete on disk."""
        stem = entry_name(camera, seq, verdict, wall_time)
        blobs: list[tuple[Path, bytes]] = []
        names: dict[str, str | None] = {"frame": None, "mask": None}
        if image is not None:
            ok, buf = cv2.imencode(".png", image)
            if not ok:
                return self._failed(f"cannot archive {stem}: the frame cannot be encoded as PNG")
            names["frame"] = f"{stem}.png"
            blobs.append((self.folder / f"{stem}.png", buf.tobytes()))
            if mask_png is not None:  # never a mask without its frame
                names["mask"] = f"{stem}_mask.png"
                blobs.append((self.folder / f"{stem}_mask.png", mask_png))
        record = dict(header) if header is not None else {"camera": camera, "seq": seq, "verdict": verdict}
        record["archive"] = names
        try:
            sidecar = (json.dumps(record, default=str) + "\n").encode()
        except ValueError as exc:  # circular or otherwise unserialisable: a bug, but not the archive's to raise
            return self._failed(f"cannot archive {stem}: header not serialisable: {exc}")
        blobs.append((self.folder / f"{stem}.json", sidecar))
        size = sum(len(data) for _, data in blobs)
        self._make_room(size)
        written: list[Path] = []
        try:
            for path, data in blobs:
                atomic_write_bytes(path, data)
                written.append(path)
        except OSError as exc:
            self._failed(f"cannot write {path}: {exc}")
            self._remove(written)
            return False
        self._entries.append(_Entry(written, size))
        self._bytes += size
        self.saved += 1
        return True

    def _failed(self, message: str) -> bool:
        self.errors += 1
        self._error(message)
        return False

    def _remove(self, paths: list[Path]) -> int:
        """Delete an entry's files newest first (header, mask, frame), stopping at the first that cannot go, so
        what stays is always a frame with or without its mask, never a mask or header alone. Files deleted."""
        done = 0
        for path in reversed(paths):
            try:
                os.unlink(path)
            except (FileNotFoundError, NotADirectoryError):  # already gone, or its folder is
                pass
            except OSError as exc:
                self._error(f"cannot delete {path}: {exc}")
                return done
            done += 1
        return done

    def _make_room(self, incoming: int) -> None:
        while self._entries and self._bytes + incoming > self.max_bytes:
            entry = self._entries.popleft()
            self.deleted += self._remove(entry.paths)
            self._bytes -= entry.size

    def _error(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            log.warning("%s (errors %d, skipped %d so far)", message, self.errors, self.skipped)
            self._last_log = now
