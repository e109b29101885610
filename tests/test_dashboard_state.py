"""The dashboard's model (linewatch/dashboard/state.py), fed real encoded protocol messages: every message here is
built with the wire format's own encoders and goes through `decode_message`, as it would from the socket."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from linewatch.dashboard.state import DashboardState, reason
from linewatch.protocol.wire import (
    decode_message,
    encode_heatmap_png,
    encode_json,
    encode_mask_png,
    encode_preview_jpeg,
    preview_topic,
    result_topic,
    status_header,
    status_topic,
)
from tests.helpers import grey, result_header, with_white_square

pytestmark = pytest.mark.unit

RUN = "run000000001"
DEFECT = {"bbox": [8, 8, 16, 16], "area": 256, "peak": 0.99, "defect": True}


def result(seq, verdict="OK", score=0.1, camera="cam1", run_id=RUN, t=1000.0, **fields):
    """A result message as the daemon sends it: header stamped by the publisher, a mask PNG for judged parts."""
    if verdict == "NOK" and "regions" not in fields:
        fields.update(regions=[DEFECT], defect_regions=1)
    if verdict == "ERROR":
        fields.setdefault("error", "camera read failed")
        score = None
    mask = None
    if verdict != "ERROR":
        m = np.zeros((64, 64), bool)
        if verdict == "NOK":
            m[8:24, 8:24] = True
        mask = encode_mask_png(m)
        fields.setdefault("mask", {"format": "png", "width": 64, "height": 64})
    header = result_header(camera, seq, verdict, score, frame_time=t - 0.01, **fields).model_dump(mode="json")
    header.update(run_id=run_id, publish_time=t)
    return decode_message([result_topic(camera), encode_json(header), mask or b""])


def status(camera="cam1", t=1000.0, run_id=RUN, **fields):
    body = {"state": "online", "fps": 10.0, "results": 0, "verdicts": {"OK": 0, "NOK": 0, "ERROR": 0}}
    body.update(fields)
    header = status_header(camera, body) | {"publish_time": t, "run_id": run_id}
    return decode_message([status_topic(camera), encode_json(header)])


def preview(seq, verdict="NOK", camera="cam1", run_id=RUN, t=1000.0):
    image = with_white_square(64) if verdict == "NOK" else grey(128, 64)
    jpeg, (w, h) = encode_preview_jpeg(image, 48, 80)
    amap = np.zeros((64, 64), np.float32)
    if verdict == "NOK":
        amap[8:24, 8:24] = 0.9
    heat, (hw, hh) = encode_heatmap_png(amap, 32, 1.0)
    header = {
        "schema_version": 1,
        "kind": "preview",
        "camera": camera,
        "seq": seq,
        "run_id": run_id,
        "publish_time": t,
        "frame_time": t - 0.01,
        "frame_index": seq,
        "verdict": verdict,
        "image_score": 0.9 if verdict == "NOK" else 0.1,
        "image": {"format": "jpeg", "width": w, "height": h},
        "heatmap": {"format": "png", "width": hw, "height": hh, "scale": 1.0, "pixel_threshold": 0.5},
    }
    return decode_message([preview_topic(camera), encode_json(header), jpeg, heat])


def names(events):
    return [name for name, _ in events]


def banners(events):
    return [(d["kind"], d["camera"], d["active"]) for name, d in events if name == "banner"]


def test_results_fill_counts_trend_and_a_bounded_gallery_newest_first():
    state = DashboardState(history=5, gallery=3, now=0.0)
    verdicts = ["OK", "NOK", "OK", "ERROR", "NOK", "OK", "NOK", "OK"]
    for seq, verdict in enumerate(verdicts, 1):
        events = state.on_message(result(seq, verdict, 0.9 if verdict == "NOK" else 0.1, t=1000 + seq), now=seq)
        assert names(events)[0] == "result"
        data = events[0][1]
        assert data["point"]["seq"] == seq and data["point"]["verdict"] == verdict
        assert (data["gallery_item"] is not None) == (verdict != "OK")
    snap = state.snapshot(now=9)
    cam = snap["cameras"]["cam1"]
    assert cam["counts"] == {"OK": 4, "NOK": 3, "ERROR": 1}  # no status yet: what arrived here
    assert cam["per_hour"] == {"OK": 4, "NOK": 3, "ERROR": 1}
    assert cam["trend"]["seq"] == [4, 5, 6, 7, 8]  # the last `history` parts
    assert cam["trend"]["score"][0] is None and cam["trend"]["verdict"][0] == "ERROR"  # ERROR: no score
    assert cam["trend"]["pixel"] == [0.5] * 5
    assert [(g["seq"], g["verdict"]) for g in snap["gallery"]] == [(7, "NOK"), (5, "NOK"), (4, "ERROR")]
    assert snap["gallery"][2]["reason"] == "not inspected: camera read failed"
    assert cam["verdict"] == "OK" and cam["seq"] == 8 and cam["model_id"] == "abcdefabcdef"
    assert cam["calibration_version"] == 1 and cam["latency_ms"] == pytest.approx(10.0)
    assert state.part("cam1", 2) is None  # NOK 2 fell out of the trend and the gallery: no longer held
    assert state.part("cam1", 4).header["verdict"] == "ERROR"
    json.dumps(snap, allow_nan=False)  # what /api/state sends


def test_parts_leave_memory_with_the_trend_unless_the_gallery_still_shows_them():
    state = DashboardState(history=3, gallery=2, now=0.0)
    state.on_message(result(1, "NOK", 0.9), now=1)
    for seq in range(2, 8):
        state.on_message(result(seq, "OK"), now=seq)
    assert state.part("cam1", 1) is not None and state.part("cam1", 1).header["verdict"] == "NOK"  # in the gallery
    assert state.part("cam1", 2) is None  # OK part older than the last 3
    assert state.part("cam1", 7).header["seq"] == 7
    assert state.part("cam2", 7) is None


def test_counts_are_the_daemons_own_plus_what_came_after_its_status_never_twice():
    state = DashboardState(now=0.0)
    for seq in (1, 2, 3):
        state.on_message(result(seq, "OK"), now=seq)
    # the dashboard joined late: the daemon had made 5 results (2 NOK the dashboard never saw)
    state.on_message(status(results=5, verdicts={"OK": 3, "NOK": 2, "ERROR": 0}, t=1001.0), now=4)
    assert state.snapshot(now=4)["cameras"]["cam1"]["counts"] == {"OK": 3, "NOK": 2, "ERROR": 0}
    state.on_message(result(5, "NOK", 0.9), now=4.1)  # counted in that status already, arriving after it
    state.on_message(result(6, "OK"), now=4.2)  # not yet counted by the daemon
    state.on_message(result(7, "ERROR"), now=4.3)
    assert state.snapshot(now=5)["cameras"]["cam1"]["counts"] == {"OK": 4, "NOK": 2, "ERROR": 1}
    state.on_message(status(results=7, verdicts={"OK": 4, "NOK": 2, "ERROR": 1}, t=1002.0), now=5)
    assert state.snapshot(now=5)["cameras"]["cam1"]["counts"] == {"OK": 4, "NOK": 2, "ERROR": 1}


def test_per_hour_counts_only_the_last_hour():
    state = DashboardState(now=0.0)
    state.on_message(result(1, "NOK", 0.9), now=10.0)
    state.on_message(result(2, "OK"), now=1800.0)
    assert state.snapshot(now=1800.0)["cameras"]["cam1"]["per_hour"] == {"OK": 1, "NOK": 1, "ERROR": 0}
    state.on_message(result(3, "OK"), now=3700.0)
    cam = state.snapshot(now=3700.0)["cameras"]["cam1"]
    assert cam["per_hour"] == {"OK": 2, "NOK": 0, "ERROR": 0}
    assert cam["counts"] == {"OK": 2, "NOK": 1, "ERROR": 0}
    assert state.snapshot(now=5500.0)["cameras"]["cam1"]["per_hour"] == {"OK": 1, "NOK": 0, "ERROR": 0}


def test_a_preview_joins_its_result_and_previews_held_are_bounded():
    state = DashboardState(previews=2, gallery=5, now=0.0)
    state.on_message(result(1, "NOK", 0.9), now=1)
    events = state.on_message(preview(1, "NOK"), now=1.1)
    assert names(events) == ["preview"]
    data = events[0][1]
    assert data["seq"] == 1 and data["in_gallery"] and data["latest_preview"]["frame"] == "/api/frame/cam1/1.jpg"
    part = state.part("cam1", 1)
    img = cv2.imdecode(np.frombuffer(part.jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (48, 48, 3) and part.heatmap.startswith(b"\x89PNG") and part.mask.startswith(b"\x89PNG")
    for seq in (2, 3, 4):
        state.on_message(result(seq, "OK"), now=seq)
        state.on_message(preview(seq, "OK"), now=seq + 0.1)
    assert state.part("cam1", 2).jpeg is None  # beyond the 2 previews held
    assert state.part("cam1", 3).jpeg is not None and state.part("cam1", 4).jpeg is not None
    assert state.part("cam1", 1).jpeg is not None  # the gallery keeps its parts' frames
    snap = state.snapshot(now=5)
    assert [r["seq"] for r in snap["recent"]] == [4, 3, 1]  # newest first, only parts whose frame is held
    assert snap["cameras"]["cam1"]["latest_preview"]["seq"] == 4
    # a preview whose result never arrived, or from another run of the daemon, has nothing to attach to
    assert state.on_message(preview(9, "NOK"), now=6) == []
    assert state.on_message(preview(4, "OK", run_id="otherrun0000"), now=6) == []


def test_life_bit_banner_after_three_status_intervals_and_gone_with_the_next_status():
    state = DashboardState(now=0.0)
    for i in range(4):  # the daemon's status every 0.2 s
        events = state.on_message(status(t=1000.0 + 0.2 * i), now=10.0 + 0.2 * i)
        assert banners(events) == []
    assert state.status_interval(state.cameras["cam1"]) == pytest.approx(0.2)
    assert banners(state.tick(now=10.6 + 0.55)) == []  # within 3 intervals of the last status
    events = state.tick(now=10.6 + 0.65)
    assert banners(events) == [("lifebit", "cam1", True)]
    assert "no life bit" in events[0][1]["text"] and events[0][1]["level"] == "error"
    assert state.tick(now=12.0) == []  # reported once, not on every tick
    assert [b["kind"] for b in state.snapshot(now=12.0)["banners"]] == ["lifebit"]
    assert state.snapshot(now=12.0)["cameras"]["cam1"]["alive"] is False
    assert banners(state.on_message(status(t=1002.0), now=12.1)) == [("lifebit", "cam1", False)]
    assert state.snapshot(now=12.1)["banners"] == []


def test_a_camera_seen_first_through_a_result_gets_the_life_bit_grace_before_its_first_status():
    state = DashboardState(status_interval_s=0.2, now=0.0)
    assert banners(state.on_message(result(1), now=5.0)) == []  # its first status is still on its way
    assert state.snapshot(now=5.5)["cameras"]["cam1"]["alive"] is True
    assert banners(state.tick(now=5.55)) == []  # within 3 intervals of first hearing of the camera
    assert banners(state.tick(now=5.65)) == [("lifebit", "cam1", True)]  # no status came at all
    assert banners(state.on_message(status(t=1000.0), now=5.7)) == [("lifebit", "cam1", False)]


def test_a_given_status_interval_overrides_the_learnt_one():
    state = DashboardState(status_interval_s=2.0, now=0.0)
    state.on_message(status(t=1000.0), now=1.0)
    state.on_message(status(t=1000.1), now=1.1)
    assert banners(state.tick(now=6.9)) == []
    assert banners(state.tick(now=7.2)) == [("lifebit", "cam1", True)]


def test_nothing_received_at_all_is_a_banner_too():
    state = DashboardState(source="tcp://127.0.0.1:5555", now=100.0)
    assert state.tick(now=102.0) == []
    events = state.tick(now=103.5)
    assert banners(events) == [("lifebit", "", True)] and "tcp://127.0.0.1:5555" in events[0][1]["text"]
    assert ("lifebit", "", False) in banners(state.on_message(status(), now=104.0))


def test_offline_and_drift_banners_follow_the_status():
    state = DashboardState(now=0.0)
    events = state.on_message(status(state="reconnecting", last_error="cannot open url: connection refused"), now=1)
    assert banners(events) == [("offline", "cam1", True)]
    assert "reconnecting" in events[-1][1]["text"] and "connection refused" in events[-1][1]["text"]
    assert state.snapshot(now=1)["cameras"]["cam1"]["state"] == "reconnecting"
    assert banners(state.on_message(status(state="online", t=1000.2), now=1.2)) == [("offline", "cam1", False)]
    drift = {"state": "warn", "since": "2026-01-01T00:00:00Z", "statistic": 3.1, "warn_at": 3.0, "alarm_at": 6.0}
    events = state.on_message(status(t=1000.4, drift=drift | {"advice": None}), now=1.4)
    assert banners(events) == [("drift", "cam1", True)]
    assert events[-1][1]["level"] == "warn" and "recalibrate" in events[-1][1]["text"]
    alarm = drift | {"state": "alarm", "statistic": 6.5, "advice": "lighting changed? recalibrate"}
    events = state.on_message(status(t=1000.6, drift=alarm), now=1.6)
    assert banners(events) == [("drift", "cam1", True)]  # the same banner, now an alarm
    assert events[-1][1]["level"] == "error" and "lighting changed? recalibrate" in events[-1][1]["text"]
    assert events[-1][1]["since"] == state.banners[("drift", "cam1")]["since"]
    unavailable = {"state": "unavailable", "reason": "no good scores", "since": "2026-01-01T00:00:00Z"}
    assert banners(state.on_message(status(t=1000.8, drift=unavailable), now=1.8)) == [("drift", "cam1", False)]
    assert state.snapshot(now=1.8)["cameras"]["cam1"]["drift"]["state"] == "unavailable"


def test_a_remote_engine_offline_is_a_banner_until_it_is_back():
    state = DashboardState(now=0.0)
    assert banners(state.on_message(status(engine={"backend": "local", "state": "online"}), now=1.0)) == []
    down = {"backend": "triton", "state": "offline", "url": "gpu1:8001", "last_error": "connection refused"}
    events = state.on_message(status(t=1001.0, engine=down), now=1.1)
    assert banners(events) == [("engine", "cam1", True)]
    text = [e for e in events if e[0] == "banner"][0][1]["text"]
    assert "gpu1:8001" in text and "connection refused" in text and "ERROR" in text
    back = {"backend": "triton", "state": "online", "url": "gpu1:8001"}
    assert banners(state.on_message(status(t=1002.0, engine=back), now=1.2)) == [("engine", "cam1", False)]


def test_a_daemon_restart_starts_the_parts_again():
    state = DashboardState(now=0.0)
    state.on_message(result(1, "NOK", 0.9), now=1)
    state.on_message(preview(1, "NOK"), now=1.1)
    state.on_message(result(1, "OK", run_id="secondrun000"), now=2)  # seq 1 again, another part
    part = state.part("cam1", 1)
    assert part.header["verdict"] == "OK" and part.jpeg is None
    snap = state.snapshot(now=3)
    assert snap["gallery"] == [] and snap["recent"] == []
    assert snap["cameras"]["cam1"]["trend"]["seq"] == [1, 1] and snap["cameras"]["cam1"]["trend"]["x"] == [1, 2]
    assert snap["cameras"]["cam1"]["missed"] == 0


def test_seq_gaps_are_counted_as_missed():
    state = DashboardState(now=0.0)
    for seq in (1, 2, 5, 6):
        state.on_message(result(seq), now=seq)
    assert state.snapshot(now=7)["cameras"]["cam1"]["missed"] == 2


def test_reason_says_why_in_the_operators_words():
    def header(seq, verdict, score=0.1, **fields):
        return result(seq, verdict, score, **fields).header

    assert reason(header(1, "NOK", 0.9)).startswith("1 defect region(s) above the pixel threshold 0.5; largest 256 px")
    image_nok = header(2, "NOK", 0.8, regions=[], defect_regions=0, thresholds={"pixel": 0.5, "image": 0.7})
    assert reason(image_nok) == "image score 0.8 above the image threshold 0.7"
    assert reason(header(3, "ERROR")) == "not inspected: camera read failed"
    speck = {"bbox": [1, 1, 1, 1], "area": 1, "peak": 0.6, "defect": False}
    text = reason(header(4, "OK", 0.6, regions=[speck], defect_regions=0))
    assert "1 speck(s)" in text and "none large enough" in text
    assert reason(header(5, "OK")) == "image score 0.1, nothing above the pixel threshold 0.5"


def test_bounds_must_be_positive():
    with pytest.raises(ValueError):
        DashboardState(history=0)
