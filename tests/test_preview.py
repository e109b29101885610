"""The preview stream (issue 16, item 2): the daemon as a subprocess on a looped video with the deviation bundle
(grey frames OK, frames with a white square NOK), real ZeroMQ subscribers, previews decoded with OpenCV."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
import zmq

from linewatch.line.publisher import _publishable_prefix
from linewatch.protocol.client import Subscriber as ClientSubscriber
from linewatch.protocol.wire import (
    ProtocolError,
    decode_message,
    encode_heatmap_png,
    encode_json,
    encode_preview_jpeg,
    preview_topic,
    result_topic,
    status_topic,
)
from tests.helpers import grey, with_white_square, write_video
from tests.test_daemon import (
    daemon_log,
    expected_verdict,
    start_daemon,
    stop,
    video_frames,
    write_config,
)

MAX_FPS = 2.0
PREVIEW = {"enabled": True, "max_fps": MAX_FPS, "width": 48, "jpeg_quality": 80, "heatmap_size": 32}


class RawSub:
    """Plain pyzmq SUB on one prefix, keeping every multipart message."""

    def __init__(self, endpoint: str, prefix: bytes):
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 10)
        self.sock.setsockopt(zmq.SUBSCRIBE, prefix)
        self.sock.connect(endpoint)
        self.messages: list[list[bytes]] = []

    def poll(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self.sock.poll(int(left * 1000) + 1):
                self.messages.append(self.sock.recv_multipart())

    def close(self) -> None:
        self.sock.close(0)


def _run(calibrated, tmp_path, preview: dict | None, seconds: float):
    video = write_video(tmp_path / "line.avi", video_frames(8))
    publish = {"preview": preview} if preview else {}
    config, endpoint = write_config(
        tmp_path,
        calibrated,
        [{"name": "cam1", "kind": "video", "source": str(video), "loop": True, "fps": 40, "queue_size": 16}],
        publish=publish,
    )
    everything = RawSub(endpoint, b"linewatch/")
    results_only = RawSub(endpoint, result_topic("cam1"))
    previews_only = RawSub(endpoint, preview_topic("cam1"))
    client = ClientSubscriber(endpoint, camera="cam1")  # default: previews not asked for
    asking = ClientSubscriber(endpoint, camera="cam1", statuses=False, previews=True)
    proc = start_daemon(config, tmp_path)
    client_msgs, asked = [], []
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for sub in (everything, results_only, previews_only):
                sub.poll(0.05)
            while (msg := client.recv(0.01)) is not None:
                client_msgs.append(msg)
            while (msg := asking.recv(0.01)) is not None:
                asked.append(msg)
        assert proc.poll() is None, daemon_log(tmp_path)[-3000:]
    finally:
        stop(proc)
        for sub in (everything, results_only, previews_only):
            sub.close()
        client.close()
        asking.close()
    return everything.messages, results_only.messages, previews_only.messages, client_msgs, client, asked


@pytest.mark.e2e
def test_previews_rate_limited_for_ok_every_nok_decodable_and_results_untouched(calibrated, tmp_path):
    everything, results_only, previews_only, client_msgs, client, asked = _run(calibrated, tmp_path, PREVIEW, 6.0)
    results = [decode_message(m) for m in everything if m[0].endswith(b"/result")]
    previews = [decode_message(m) for m in everything if m[0].endswith(b"/preview")]
    statuses = [decode_message(m) for m in everything if m[0].endswith(b"/status")]
    assert len(results) >= 80, len(results)
    # slow joiner: the subscription may begin between a part's result and its preview; such a preview has no result
    # here to be checked against
    previews = [p for p in previews if p.seq >= results[0].seq]
    assert all(r.verdict == expected_verdict(r.header["frame_index"]) for r in results)
    by_seq = {r.seq: r for r in results}
    nok = [r for r in results if r.verdict == "NOK"]
    preview_seqs = {p.seq for p in previews}
    assert nok and all(r.seq in preview_seqs for r in nok), "every NOK part gets a preview"
    for p in previews:  # tied to its result, never a result of its own
        assert p.seq in by_seq and p.verdict == by_seq[p.seq].verdict
        assert p.header["frame_index"] == by_seq[p.seq].header["frame_index"]
    ok_times = [p.header["publish_time"] for p in previews if p.verdict == "OK"]
    assert ok_times, "OK parts get previews too, at the limited rate"
    # chosen at least 1/max_fps apart; publish_time is stamped after the build, so allow some scheduling jitter
    assert all(b - a >= 1.0 / MAX_FPS - 0.1 for a, b in zip(ok_times, ok_times[1:])), ok_times
    span = results[-1].header["publish_time"] - results[0].header["publish_time"]
    assert len(ok_times) <= span * MAX_FPS + 1
    ok_results = sum(r.verdict == "OK" for r in results)
    assert len(ok_times) < ok_results / 4  # the limiter really dropped most OK parts
    for p in previews:
        img = cv2.imdecode(np.frombuffer(p.image, np.uint8), cv2.IMREAD_COLOR)
        assert img.shape == (48, 48, 3) and p.header["image"] == {"format": "jpeg", "width": 48, "height": 48}
        heat = cv2.imdecode(np.frombuffer(p.mask, np.uint8), cv2.IMREAD_UNCHANGED)
        assert heat.shape == (32, 32) and heat.dtype == np.uint8
        assert p.header["heatmap"]["scale"] == pytest.approx(1.0)  # twice the pixel threshold 0.5
        mask = by_seq[p.seq].mask_array()
        small = cv2.resize(mask, (32, 32), interpolation=cv2.INTER_AREA) >= 128
        agree = np.mean((heat >= 128) == small)
        assert agree >= 0.95, (p.seq, p.verdict, agree)
        assert (heat >= 128).any() == (p.verdict == "NOK")
    last_status = max(i for i, m in enumerate(everything) if m[0].endswith(b"/status"))
    before = sum(m[0].endswith(b"/preview") for m in everything[:last_status])
    assert statuses[-1].header["previews"] >= before > 0
    assert statuses[-1].header["previews_dropped"] == 0
    assert statuses[-1].header["results"] >= statuses[-1].header["previews"]  # previews are not results
    assert results_only and all(m[0] == result_topic("cam1") for m in results_only)
    assert len(previews_only) >= len(nok) and all(m[0] == preview_topic("cam1") for m in previews_only)
    # the protocol's Subscriber on the camera prefix skips previews unless asked, and counts nothing invalid
    assert client_msgs and {m.kind for m in client_msgs} <= {"result", "status"}
    assert client.invalid == 0 and client.missed.get("cam1", 0) == 0
    # asked for (results and previews topics, no status): previews come through decoded, results still tracked
    assert {m.kind for m in asked} == {"result", "preview"}
    seen = [m.seq for m in asked if m.kind == "result"]  # from its first to its last result (slow joiner, stop)
    assert {m.seq for m in asked if m.kind == "preview"} >= {r.seq for r in nok if seen[0] < r.seq < seen[-1]}
    assert all(m.image.startswith(b"\xff\xd8") for m in asked if m.kind == "preview")


@pytest.mark.e2e
def test_previews_are_off_by_default_nothing_on_the_preview_topic(calibrated, tmp_path):
    everything, results_only, previews_only, _, _, asked = _run(calibrated, tmp_path, None, 2.5)
    assert asked and {m.kind for m in asked} == {"result"}
    assert len(results_only) >= 20
    assert previews_only == []
    assert not [m for m in everything if m[0].endswith(b"/preview")]
    status = [decode_message(m) for m in everything if m[0].endswith(b"/status")][-1]
    assert status.header["previews"] == 0


@pytest.mark.unit
def test_preview_topic_is_no_prefix_of_the_others_and_its_subscription_is_accepted():
    topics = [result_topic("cam1"), status_topic("cam1"), preview_topic("cam1")]
    for a in topics:
        for b in topics:
            assert a == b or not b.startswith(a)
    for n in range(len(b"linewatch/cam1/"), len(preview_topic("cam1")) + 1):
        assert _publishable_prefix(preview_topic("cam1")[:n])
    assert not _publishable_prefix(b"linewatch/cam1/previews")


@pytest.mark.unit
def test_preview_message_round_trip_and_malformed_frames_refused():
    jpeg, (w, h) = encode_preview_jpeg(with_white_square(64), 40, 80)
    amap = np.zeros((64, 64), np.float32)
    amap[10:20, 10:20] = 0.8
    heat, (hw, hh) = encode_heatmap_png(amap, 16, 1.0)
    header = {
        "schema_version": 1,
        "kind": "preview",
        "camera": "cam1",
        "seq": 3,
        "run_id": "abc",
        "publish_time": 1.0,
        "frame_time": 1.0,
        "frame_index": 3,
        "verdict": "NOK",
        "image_score": 0.8,
        "image": {"width": w, "height": h},
        "heatmap": {"width": hw, "height": hh, "scale": 1.0, "pixel_threshold": 0.5},
    }
    msg = decode_message([preview_topic("cam1"), encode_json(header), jpeg, heat])
    assert msg.kind == "preview" and (w, h) == (40, 40) and (hw, hh) == (16, 16)
    decoded = cv2.imdecode(np.frombuffer(msg.mask, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded[3:4, 3:4].item() == pytest.approx(204, abs=2) and decoded[10, 10] == 0
    with pytest.raises(ProtocolError, match="not a JPEG"):
        decode_message([preview_topic("cam1"), encode_json(header), heat, heat])
    with pytest.raises(ProtocolError, match="heat map"):
        decode_message([preview_topic("cam1"), encode_json(header | {"heatmap": None}), jpeg, heat])
    with pytest.raises(ProtocolError, match="verdict"):
        decode_message([preview_topic("cam1"), encode_json(header | {"verdict": "MAYBE"}), jpeg, heat])
    big, size = encode_preview_jpeg(grey(size=32), 320, 80)  # never enlarged
    assert size == (32, 32) and big.startswith(b"\xff\xd8\xff")
