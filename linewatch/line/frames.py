"""Frames on their way from capture to inference, and the bounded queue between them (torch-free).

A frame that was captured either becomes a result or is counted as dropped here: the queue drops the oldest frame
of a camera when inference falls behind (counted per camera), so results stay fresh. For a camera whose frames are
parts (`frames_are_parts`), a dropped frame keeps its place without its image and becomes an ERROR result, so a
PLC counting results sees every part. Frames handed to inference stay on the queue's books until their message
went out (`settle`), so a shutdown can answer every one of them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np

from linewatch.errors import LinewatchError

DROPPED_REASON = "dropped: inference behind, not inspected"
SHUTDOWN_REASON = "shutdown: not inspected"

# a trigger request's answer: {"header": the result header as published, "mask": mask PNG or None}
TriggerFuture: TypeAlias = Future[dict[str, Any]]


@dataclass
class Frame:
    """One captured image on its way to inference. `error` set: publish ERROR, never inspect.

    `captured_wall`/`captured_mono` are when the camera's grab() returned this frame, before it was decoded (the
    header's `frame_time`; decoding is part of the latency). `part_id`/`future`: the trigger request it answers, only
    ever one that arrived before this frame's grab started (plus the camera's settle time)."""

    camera: str
    index: int
    captured_wall: float
    captured_mono: float
    image: np.ndarray | None
    error: str | None = None
    part_id: str | None = None
    future: TriggerFuture | None = None

    def fail_trigger(self, reason: str) -> None:
        if self.future is not None:
            fail_future(self.future, reason)


def fail_future(future: Future[Any], reason: str) -> None:
    """Fail a trigger request, unless it was answered or cancelled (timed out) meanwhile."""
    try:
        future.set_exception(LinewatchError(reason))
    except InvalidStateError:
        pass


# --- queue ----------------------------------------------------------------------------------------------


class FrameQueue:
    """Per-camera bounded queues behind one condition, so one worker can batch frames across cameras.

    A full camera queue drops its oldest frame: inference then works on fresh frames. The drop is counted per
    camera (`dropped`), or, for a camera whose frames are parts, the frame stays in line without its image as an
    ERROR-to-be (`dropped_as_error`): it costs no inference and keeps its place, so its result goes out in order.
    """

    def __init__(self, track: bool = False) -> None:
        """`track`: keep the frames handed to inference on the books until `settle` (the daemon does, to answer
        each of them at shutdown); off for callers that never settle."""
        self._track = track
        self._cond = threading.Condition()
        self._queues: dict[str, deque[Frame]] = {}
        self._marks: dict[str, deque[Frame]] = {}  # parts dropped before inspection, older than the queue's frames
        self._sizes: dict[str, int] = {}
        self._parts: dict[str, bool] = {}
        self._unsettled: dict[int, Frame] = {}  # id -> frame handed to inference whose message has not gone out
        self.dropped: dict[str, int] = {}
        self.dropped_as_error: dict[str, int] = {}
        self.taken: dict[str, int] = {}  # frames handed to inference
        self._closed = False

    def add_camera(self, name: str, size: int) -> None:
        with self._cond:
            self._queues[name] = deque()
            self._marks[name] = deque()
            self._sizes[name] = size
            self._parts[name] = False
            self.dropped[name] = 0
            self.dropped_as_error[name] = 0
            self.taken[name] = 0

    def set_frames_are_parts(self, name: str, on: bool) -> None:
        """A camera whose every frame is a part: a frame dropped before inspection becomes an ERROR result."""
        with self._cond:
            self._parts[name] = on

    def put(self, frame: Frame, wait_for_room: threading.Event | None = None) -> Frame | None:
        """Queue a frame; returns the frame dropped to make room, if any.

        With `wait_for_room` (a stop event), a full queue makes the caller wait instead of dropping: for files,
        which have no real time to keep up with, so every frame is inspected and none is decoded for nothing.
        """
        dropped = None
        with self._cond:
            q = self._queues[frame.camera]
            if wait_for_room is not None:
                while len(q) >= self._sizes[frame.camera] and not self._closed and not wait_for_room.is_set():
                    self._cond.wait(0.05)
            if len(q) >= self._sizes[frame.camera] and wait_for_room is None:
                dropped = q.popleft()
                if self._parts[frame.camera]:
                    dropped.image, dropped.error = None, DROPPED_REASON  # its trigger gets this ERROR too
                    self._marks[frame.camera].append(dropped)
                    self.dropped_as_error[frame.camera] += 1
                else:
                    self.dropped[frame.camera] += 1
            q.append(frame)
            self._cond.notify()
        if dropped is not None and dropped.error != DROPPED_REASON:
            dropped.fail_trigger("frame dropped before inspection: inference fell behind")
        return dropped

    def pending(self) -> int:
        with self._cond:
            return self.pending_locked()

    def _pop_oldest(self) -> Frame | None:
        """The oldest frame across cameras; a camera's dropped parts are older than its queued frames."""
        best = None
        for name, q in self._queues.items():
            line = self._marks[name] or q
            if line and (best is None or line[0].captured_mono < best[0].captured_mono):
                best = line
        return best.popleft() if best is not None else None

    def take(self, max_n: int, max_wait_s: float, idle_timeout_s: float) -> list[Frame]:
        """Up to max_n frames, oldest first across cameras. Waits up to idle_timeout_s for the first frame,
        then at most max_wait_s for the batch to fill."""
        batch: list[Frame] = []
        with self._cond:
            end_idle = time.monotonic() + idle_timeout_s
            while self.pending_locked() == 0 and not self._closed:
                left = end_idle - time.monotonic()
                if left <= 0:
                    return batch
                self._cond.wait(left)
            end_fill = time.monotonic() + max_wait_s
            while len(batch) < max_n:
                frame = self._pop_oldest()
                if frame is not None:
                    self.taken[frame.camera] += 1
                    if self._track:
                        self._unsettled[id(frame)] = frame
                    batch.append(frame)
                    self._cond.notify_all()  # room for a file source waiting in put()
                    continue
                left = end_fill - time.monotonic()
                if left <= 0 or self._closed:
                    break
                self._cond.wait(left)
        return batch

    def pending_locked(self) -> int:
        return sum(len(q) for q in self._queues.values()) + sum(len(m) for m in self._marks.values())

    def settle(self, frame: Frame) -> None:
        """The frame's message went out (or was counted as not publishable): off the books."""
        with self._cond:
            self._unsettled.pop(id(frame), None)

    def is_settled(self, frame: Frame) -> bool:
        with self._cond:
            return id(frame) not in self._unsettled

    def unanswered(self) -> list[Frame]:
        """Shutdown: every frame without a message yet, taken by inference or still queued, oldest first; they
        leave the queue and its books (the caller answers them)."""
        with self._cond:
            frames = list(self._unsettled.values())
            self._unsettled.clear()
            while (frame := self._pop_oldest()) is not None:
                frames.append(frame)
            self._cond.notify_all()
        return sorted(frames, key=lambda f: (f.captured_mono, f.camera, f.index))

    def close(self) -> None:
        """Wake the worker: no more frames will come, take() returns what is left without waiting."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
