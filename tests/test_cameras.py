"""Capture threads on real sources: an MJPG .avi, a folder of images, an HTTP MJPEG stream with an outage."""

from __future__ import annotations

import logging
import shutil
import time
from concurrent.futures import Future

import cv2
import numpy as np
import pytest

from linewatch.errors import DataError
from linewatch.line.cameras import FINISHED, OFFLINE, ONLINE, RECONNECTING, Camera, crop, grab_frames
from linewatch.line.config import CameraConfig, ReconnectConfig
from linewatch.line.frames import FrameQueue
from tests.helpers import MjpegServer, free_port, grey, write_video

pytestmark = pytest.mark.integration


def numbered_frames(n: int, size: int = 64) -> list[np.ndarray]:
    """Frame i has grey level 40 + 10*i, so its index survives JPEG compression."""
    return [grey(40 + 10 * i, size) for i in range(n)]


def level(img: np.ndarray) -> int:
    return int(round(float(img.mean())))


def wait_for(cond, timeout: float = 10.0, step: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return cond()


def collect(queue: FrameQueue, n: int, timeout: float = 10.0):
    out, end = [], time.monotonic() + timeout
    while len(out) < n and time.monotonic() < end:
        out.extend(queue.take(n - len(out), 0.0, 0.1))
    return out


def run_camera(cfg: CameraConfig):
    queue = FrameQueue()
    cam = Camera(cfg, queue)
    cam.start()
    return cam, queue


def test_video_file_without_loop_delivers_every_frame_in_order_then_finishes(tmp_path):
    video = write_video(tmp_path / "line.avi", numbered_frames(12))
    cam, queue = run_camera(CameraConfig(name="c", kind="video", source=str(video), loop=False, queue_size=100))
    try:
        assert wait_for(lambda: cam.state == FINISHED)
        frames = queue.take(100, 0.0, 0.0)
        assert [f.index for f in frames] == list(range(1, 13))
        assert [level(f.image) for f in frames] == pytest.approx([40 + 10 * i for i in range(12)], abs=3)
        assert all(f.image.shape == (64, 64, 3) and f.error is None for f in frames)
        assert queue.dropped["c"] == 0 and cam.captured == 12
    finally:
        cam.stop()
        cam.join(2)


def test_looped_video_restarts_and_roi_crops(tmp_path):
    video = write_video(tmp_path / "line.avi", numbered_frames(5))
    cfg = CameraConfig(name="c", kind="video", source=str(video), loop=True, queue_size=100, roi=(8, 16, 32, 20))
    cam, queue = run_camera(cfg)
    try:
        frames = collect(queue, 12)
        assert len(frames) == 12 and cam.state == ONLINE
        assert all(f.image.shape == (20, 32, 3) for f in frames)
        levels = [level(f.image) for f in frames]
        assert levels[5] == pytest.approx(levels[0], abs=3) and levels[10] == pytest.approx(levels[0], abs=3)
    finally:
        cam.stop()
        cam.join(2)


def test_roi_outside_the_frame_gives_error_frames_not_silence(tmp_path):
    video = write_video(tmp_path / "line.avi", numbered_frames(3))
    cfg = CameraConfig(name="c", kind="video", source=str(video), loop=False, queue_size=10, roi=(50, 0, 32, 32))
    cam, queue = run_camera(cfg)
    try:
        assert wait_for(lambda: cam.state == FINISHED)
        frames = queue.take(10, 0.0, 0.0)
        assert len(frames) == 3
        assert all(f.image is None and "does not fit" in f.error for f in frames)
        assert cam.frame_errors == 3
    finally:
        cam.stop()
    assert isinstance(crop(grey(), (0, 0, 64, 64)), np.ndarray)


def test_full_queue_drops_the_oldest_and_counts(tmp_path):
    video = write_video(tmp_path / "line.avi", numbered_frames(10))
    cfg = CameraConfig(name="c", kind="video", source=str(video), loop=False, queue_size=3, fps=500.0)  # real time
    cam, queue = run_camera(cfg)
    try:
        assert wait_for(lambda: cam.state == FINISHED)
        frames = queue.take(10, 0.0, 0.0)
        assert [f.index for f in frames] == [8, 9, 10]
        assert queue.dropped["c"] == 7
    finally:
        cam.stop()


def test_uncapped_file_waits_for_a_slow_consumer_instead_of_dropping(tmp_path):
    video = write_video(tmp_path / "line.avi", numbered_frames(10))
    cam, queue = run_camera(CameraConfig(name="c", kind="video", source=str(video), loop=False, queue_size=2))
    try:
        time.sleep(0.3)
        assert cam.captured <= 3 and queue.pending() == 2  # waiting for room, not decoding ahead
        frames = []
        while cam.state != FINISHED or queue.pending():
            frames += queue.take(1, 0.0, 0.1)
            time.sleep(0.01)
        assert [f.index for f in frames] == list(range(1, 11)) and queue.dropped["c"] == 0
    finally:
        cam.stop()
        cam.join(2)


def test_folder_source_with_corrupt_image_and_fps_cap(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        cv2.imwrite(str(folder / f"{i}.png"), grey(50 + 20 * i))
    (folder / "2.png").write_bytes(b"not a png")
    cfg = CameraConfig(name="c", kind="folder", source=str(folder), loop=False, fps=20.0, queue_size=10)
    t0 = time.monotonic()
    cam, queue = run_camera(cfg)
    try:
        assert wait_for(lambda: cam.state == FINISHED)
        elapsed = time.monotonic() - t0
        frames = queue.take(10, 0.0, 0.0)
        assert [f.error is None for f in frames] == [True, True, False, True]
        assert "2.png" in frames[2].error
        assert [level(f.image) for f in frames if f.image is not None] == [50, 70, 110]
        assert elapsed >= 3 / 20.0 * 0.9  # 4 frames at 20 fps need 3 periods
    finally:
        cam.stop()


def test_http_stream_outage_goes_offline_then_reconnects():
    port = free_port()
    cfg = CameraConfig(
        name="c",
        kind="url",
        source=f"http://127.0.0.1:{port}/stream.mjpg",
        queue_size=1000,
        open_timeout_ms=1000,
        read_timeout_ms=1000,
        reconnect=ReconnectConfig(initial_s=0.05, max_s=0.4),
    )
    cam, queue = run_camera(cfg)  # nothing listens yet
    server = MjpegServer(port, lambda i: grey(200))
    try:
        assert wait_for(lambda: cam.reconnects >= 2, 5)
        assert cam.state != ONLINE and cam.captured == 0
        server.start()
        assert wait_for(lambda: cam.state == ONLINE and cam.captured >= 5, 10)
        server.stop()
        assert wait_for(lambda: cam.state != ONLINE, 5)
        assert cam.state in (OFFLINE, "reconnecting")
        before = cam.captured
        time.sleep(0.3)
        assert cam.captured == before
        server.start()
        assert wait_for(lambda: cam.state == ONLINE and cam.captured > before + 3, 10)
        frames = queue.take(10_000, 0.0, 0.0)
        assert frames and all(level(f.image) == pytest.approx(200, abs=3) for f in frames)
    finally:
        cam.stop()
        server.stop()
        cam.join(3)


def test_grab_frames_from_a_configured_camera(tmp_path):
    write_video(tmp_path / "line.avi", numbered_frames(6))
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    config = tmp_path / "lw.yaml"
    config.write_text(
        "model: {bundle: bundle}\ncameras:\n  - {name: cam1, kind: video, source: line.avi, loop: false}\n"
    )
    frames = grab_frames(config, "cam1", 4)
    assert [level(f) for f in frames] == pytest.approx([40, 50, 60, 70], abs=3)
    with pytest.raises(DataError, match="ended after 6 of 9"):
        grab_frames(config, "cam1", 9)


# --- triggers: judged on a frame taken after the request, told by the frame's own pixels ----------------------

EPOCH = time.time()
CELL = 16  # an 8×8 grid of black/white 16-pixel cells: rows 0-3 the time, rows 4-7 its complement (misread check)


def draw_time(t: float) -> np.ndarray:
    """A frame that carries its capture time: milliseconds since EPOCH as 32 bits, robust to JPEG."""
    ms = int(round((t - EPOCH) * 1000))
    bits = [(ms >> i) & 1 for i in range(32)]
    cells = np.array(bits + [1 - b for b in bits], np.uint8).reshape(8, 8) * 255
    return cv2.cvtColor(np.kron(cells, np.ones((CELL, CELL), np.uint8)), cv2.COLOR_GRAY2BGR)


def read_time(image: np.ndarray) -> float:
    """The capture time drawn into a frame (wall clock seconds)."""
    grey_img = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    centres = grey_img[CELL // 2 :: CELL, CELL // 2 :: CELL][:8, :8] > 128
    bits, complement = centres[:4].ravel(), centres[4:].ravel()
    assert (bits != complement).all(), "time code misread"
    return EPOCH + sum(int(b) << i for i, b in enumerate(bits)) / 1000.0


def test_time_code_survives_jpeg():
    t = time.time()
    ok, buf = cv2.imencode(".jpg", draw_time(t), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert read_time(cv2.imdecode(buf, cv2.IMREAD_COLOR)) == pytest.approx(t, abs=0.001)


def url_camera(port: int, **fields) -> CameraConfig:
    return CameraConfig(
        name="c",
        kind="url",
        source=f"http://127.0.0.1:{port}/stream.mjpg",
        queue_size=1000,
        reconnect=ReconnectConfig(initial_s=0.05, max_s=0.2),
        **fields,
    )


def test_a_request_arriving_while_a_frame_is_in_flight_is_answered_with_a_later_frame():
    """The PLC asks right after the camera exposed a frame, before that frame reached the daemon: the part in front
    of the camera at the request is only seen by a frame exposed after it. The server draws each frame's time into
    it and, for some frames, makes the request between drawing and sending: such a frame must not answer it."""
    port = free_port()
    requests: dict[str, float] = {}
    futures: list[Future] = []
    box: dict[str, Camera] = {}

    def frame_fn(i: int) -> np.ndarray:
        image = draw_time(time.time())
        cam = box.get("cam")
        if cam is not None and cam.captured >= 10 and i % 5 == 0 and len(requests) < 5:
            part = f"part-{i}"
            requests[part] = time.time()  # after the frame was exposed, before it is sent
            futures.append(Future())
            cam.request_trigger(part, futures[-1])
        return image

    server = MjpegServer(port, frame_fn, fps=20).start()
    queue = FrameQueue()
    cam = Camera(url_camera(port, mode="triggered"), queue)
    box["cam"] = cam
    cam.start()
    try:
        frames = collect(queue, 5, timeout=20)
        assert [f.part_id for f in frames] == list(requests)
        for frame in frames:
            shown = read_time(frame.image)
            asked = requests[frame.part_id]
            assert shown > asked, f"{frame.part_id}: frame exposed {asked - shown:.3f} s before the request"
            assert shown < asked + 0.5  # the next frame (20 fps), not some much later one
            assert frame.captured_wall >= asked
        assert cam.skipped == cam.captured - 5 and queue.dropped["c"] == 0
    finally:
        cam.stop()
        server.stop()
        cam.join(3)


def test_settle_ms_answers_with_the_first_frame_exposed_that_long_after_the_request():
    """Continuous mode: every frame is inspected; the request's part id goes to the first frame exposed at least
    settle_ms after it (the part has come to rest), checked on the time drawn into the frame."""
    port = free_port()
    server = MjpegServer(port, lambda i: draw_time(time.time()), fps=50).start()
    queue = FrameQueue()
    cam = Camera(url_camera(port, settle_ms=150), queue)
    cam.start()
    try:
        assert wait_for(lambda: cam.captured >= 10, 10)
        for n in range(3):
            queue.take(10_000, 0.0, 0.0)
            asked = time.time()
            cam.request_trigger(f"part-{n}", Future())
            frames: list = []
            assert wait_for(lambda: frames.extend(queue.take(10_000, 0.0, 0.0)) or any(f.part_id for f in frames), 5)
            answer = next(f for f in frames if f.part_id)
            shown = read_time(answer.image)
            # the camera can only time a frame when it arrives; the time drawn in it is from before it was sent
            # (local transport: a few ms) and rounded to 1 ms, hence the 5 ms allowance below the 150 ms
            early = 0.005
            assert asked + 0.150 - early <= shown < asked + 0.150 + 0.3, f"exposed {shown - asked:.4f} s after"
            earlier = [f for f in frames if f.index < answer.index]
            assert earlier and all(f.part_id is None for f in earlier)  # inspected, but not as the part
            assert any(read_time(f.image) > asked for f in earlier)  # frames after the request, before it settled
    finally:
        cam.stop()
        server.stop()
        cam.join(3)


# --- credentials never leave the config -----------------------------------------------------------------------

SECRETS = ("S3cret", "hunter2", "T0k3n")


@pytest.mark.parametrize("scheme", ["rtsp", "http"])
def test_url_credentials_reach_neither_last_error_nor_the_log(scheme, caplog, tmp_path):
    """A camera that cannot be opened reports why (status topic `last_error`, the log, calibrate's error) without
    the password, token or user name of its URL."""
    caplog.set_level(logging.DEBUG, logger="linewatch")
    port = free_port()  # nothing listens: the open fails at once
    url = f"{scheme}://admin:S3cret@127.0.0.1:{port}/stream?user=operator&password=hunter2&token=T0k3n"
    cfg = CameraConfig(
        name="c", kind="url", source=url, open_timeout_ms=500, reconnect=ReconnectConfig(initial_s=0.05, max_s=0.1)
    )
    cam = Camera(cfg, FrameQueue())
    cam.start()
    try:
        assert wait_for(lambda: cam.reconnects >= 2 and cam.last_error is not None, 10)
        error = cam.last_error
        assert f"127.0.0.1:{port}" in error and "***" in error
        for secret in (*SECRETS, "operator"):
            assert secret not in error and secret not in caplog.text
    finally:
        cam.stop()
        cam.join(3)
    (tmp_path / "bundle").mkdir()
    config = tmp_path / "lw.yaml"
    config.write_text(f"model: {{bundle: bundle}}\ncameras:\n  - {{name: cam1, kind: url, source: '{url}'}}\n")
    with pytest.raises(DataError) as info:  # `linewatch calibrate --camera`: the camera's error in the message
        grab_frames(config, "cam1", 1, timeout_s=1.0)
    assert "***" in str(info.value) and not any(secret in str(info.value) for secret in SECRETS)


# --- state and last_error describe what is happening ----------------------------------------------------------


def warnings_of(caplog, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "linewatch.line.cameras" and r.levelno >= logging.WARNING and text in r.getMessage()
    ]


def test_a_vanished_folder_takes_its_camera_offline_with_the_reason_and_recovery_clears_it(tmp_path, caplog):
    """The folder of a folder camera is removed while it runs: offline with a last_error naming the folder (logged
    once, not per attempt), no stream of ERROR frames; recreated: online again, last_error cleared."""
    caplog.set_level(logging.DEBUG, logger="linewatch.line.cameras")
    folder = tmp_path / "imgs"

    def fill() -> None:
        folder.mkdir()
        for i in range(3):
            cv2.imwrite(str(folder / f"{i}.png"), grey(60 + 40 * i))

    fill()
    cfg = CameraConfig(
        name="c",
        kind="folder",
        source=str(folder),
        loop=True,
        fps=50.0,
        queue_size=1000,
        reconnect=ReconnectConfig(initial_s=0.02, max_s=0.05),
    )
    cam, queue = run_camera(cfg)
    try:
        assert wait_for(lambda: cam.state == ONLINE and cam.captured >= 5)
        assert cam.last_error is None
        shutil.rmtree(folder)
        assert wait_for(lambda: cam.state != ONLINE and cam.reconnects >= 5, 10)
        assert cam.state in (OFFLINE, RECONNECTING)
        assert cam.last_error == f"image folder not found: {folder}"
        assert cam.frame_errors == 0
        assert all(f.error is None for f in queue.take(10_000, 0.0, 0.0))  # the frames before: no ERROR stream
        assert len(warnings_of(caplog, "offline")) == 1  # once for the outage, not once per reconnect attempt
        assert str(folder) in warnings_of(caplog, "offline")[0]
        fill()
        assert wait_for(lambda: cam.state == ONLINE, 10)
        assert cam.last_error is None
        assert any("online again" in r.getMessage() for r in caplog.records)
    finally:
        cam.stop()
        cam.join(3)


def test_frame_errors_show_in_last_error_while_they_last(tmp_path, caplog):
    """An online camera whose frames are unusable says why in last_error (logged when it starts, not per frame);
    the next good frame clears it."""
    caplog.set_level(logging.DEBUG, logger="linewatch.line.cameras")
    cams = {}
    for name, bad in (("ends_bad", (1, 2)), ("ends_good", (1, 2, 3))):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(5 if name == "ends_good" else 3):
            cv2.imwrite(str(folder / f"{i}.png"), grey(100))
        for i in bad:
            (folder / f"{i}.png").write_bytes(b"not a png")
        cfg = CameraConfig(name=name, kind="folder", source=str(folder), loop=False, queue_size=10)
        cams[name] = run_camera(cfg)
    try:
        for cam, _ in cams.values():
            assert wait_for(lambda: cam.state == FINISHED)
        bad_cam, good_cam = cams["ends_bad"][0], cams["ends_good"][0]
        assert bad_cam.frame_errors == 2 and bad_cam.last_error is not None
        assert bad_cam.last_error.startswith("frame 3: ") and "2.png" in bad_cam.last_error
        assert good_cam.frame_errors == 3 and good_cam.last_error is None
        for name in cams:
            assert len([m for m in warnings_of(caplog, "frame error") if f"camera {name}:" in m]) == 1
        assert any("camera ends_good: frames good again after 3" in r.getMessage() for r in caplog.records)
    finally:
        for cam, _ in cams.values():
            cam.stop()
