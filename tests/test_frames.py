"""FrameQueue accounting: drops of free-running frames are counted, drops of parts stay in line as ERROR-to-be, and
frames handed to inference stay on the books until their message is out (what a shutdown answers)."""

from __future__ import annotations

import time
from concurrent.futures import Future

import numpy as np
import pytest

from linewatch.line.frames import DROPPED_REASON, Frame, FrameQueue

pytestmark = pytest.mark.unit


def frame(camera: str, index: int) -> Frame:
    return Frame(camera, index, time.time(), time.monotonic(), np.zeros((4, 4, 3), np.uint8))


def fill(queue: FrameQueue, camera: str, n: int, futures: bool = False) -> list[Frame]:
    frames = [frame(camera, i) for i in range(1, n + 1)]
    for f in frames:
        if futures:
            f.future = Future()
        queue.put(f)
    return frames


def test_a_part_dropped_before_inspection_keeps_its_place_without_its_image():
    queue = FrameQueue()
    queue.add_camera("parts", 2)
    queue.add_camera("free", 2)
    queue.set_frames_are_parts("parts", True)
    parts = fill(queue, "parts", 5, futures=True)
    free = fill(queue, "free", 5, futures=True)
    assert (queue.dropped, queue.dropped_as_error) == ({"parts": 0, "free": 3}, {"parts": 3, "free": 0})
    assert queue.pending() == 5 + 2  # three marks and two frames to inspect; two frames of "free"
    taken = queue.take(100, 0.0, 0.0)
    got = [(f.camera, f.index, f.error, f.image is None) for f in taken]
    # oldest first: every part of camera "parts" in capture order, the first three as ERROR-to-be, no image kept
    assert [g for g in got if g[0] == "parts"] == [
        ("parts", 1, DROPPED_REASON, True),
        ("parts", 2, DROPPED_REASON, True),
        ("parts", 3, DROPPED_REASON, True),
        ("parts", 4, None, False),
        ("parts", 5, None, False),
    ]
    assert [g[1] for g in got if g[0] == "free"] == [4, 5]  # dropped frames of a free-running camera are gone
    assert not any(f.future.done() for f in parts)  # their triggers wait for the ERROR result
    assert all("dropped before inspection" in str(f.future.exception(0)) for f in free[:3])


def test_frames_taken_stay_on_the_books_until_settled_and_a_shutdown_gets_every_unanswered_one():
    queue = FrameQueue(track=True)
    queue.add_camera("a", 10)
    queue.add_camera("b", 10)
    frames = [frame("a" if i % 2 else "b", i) for i in range(8)]
    for f in frames:
        queue.put(f)
    taken = queue.take(4, 0.0, 0.0)
    assert [f.index for f in taken] == [0, 1, 2, 3]
    queue.settle(taken[1])
    queue.settle(taken[1])  # twice is harmless
    assert queue.is_settled(taken[1]) and not queue.is_settled(taken[0])
    left = queue.unanswered()
    assert [f.index for f in left] == [0, 2, 3, 4, 5, 6, 7]  # in capture order: scored or queued alike
    assert queue.pending() == 0 and queue.unanswered() == []


def test_an_untracked_queue_keeps_nothing_it_has_handed_out():
    queue = FrameQueue()
    queue.add_camera("a", 4)
    fill(queue, "a", 3)
    assert len(queue.take(10, 0.0, 0.0)) == 3
    assert queue.unanswered() == []
