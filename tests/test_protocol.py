"""Wire format: topics, headers, masks and message validation, over real ZeroMQ sockets where it matters; and the
subscriber example in docs/PROTOCOL.md, run as written against a real publisher."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq

from linewatch.line.publisher import ResultPublisher
from linewatch.protocol.wire import (
    SCHEMA_VERSION,
    ProtocolError,
    ResultHeader,
    Verdict,
    camera_prefix,
    check_result_header,
    decode_mask_png,
    decode_message,
    encode_json,
    encode_mask_png,
    result_topic,
    status_topic,
)

ROOT = Path(__file__).resolve().parents[1]


def header_for(camera: str, seq: int, **kw) -> ResultHeader:
    args = dict(
        camera=camera,
        seq=seq,
        frame_time=1_700_000_000.25,
        verdict="NOK",
        image_score=0.75,
        thresholds={"pixel": 0.5, "image": 0.6},
        calibration_version=2,
        model_id="0123456789ab",
        regions=[{"bbox": (3, 4, 5, 6), "area": 20, "peak": 0.9}],
        regions_total=1,
        part_id=f"P-{seq}",
        error=None,
        frame_index=None,
        mask=None,
    )
    args.update(kw)
    return ResultHeader(**args)


def wire(header: ResultHeader) -> dict:
    """The header as a publisher sends it (stamped)."""
    return header.model_dump(mode="json") | {"publish_time": 1_700_000_000.5, "run_id": "0123456789ab"}


def sub_socket(ctx: zmq.Context, endpoint: str, prefix: bytes) -> zmq.Socket:
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, prefix)
    sock.connect(endpoint)
    return sock


def wait_until_subscribed(pub: ResultPublisher, only_cam1: zmq.Socket, everything: zmq.Socket) -> None:
    """Slow joiner: publish until both subscriptions have reached the publisher, then drain what came."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (only_cam1.poll(50) and everything.poll(0)):
        pub.publish_status("cam1", {"state": "online"})
    for s in (only_cam1, everything):
        while s.poll(100):
            s.recv_multipart()


@pytest.mark.integration
def test_topics_are_delimited_so_cam1_never_matches_cam10():
    assert result_topic("cam1") == b"linewatch/cam1/result"
    assert status_topic("cam1") == b"linewatch/cam1/status"
    assert camera_prefix("cam1") == b"linewatch/cam1/"
    with pytest.raises(ValueError):
        result_topic("cam/1")
    ctx = zmq.Context()
    pub = ResultPublisher("tcp://127.0.0.1:*", 1000)
    only_cam1 = sub_socket(ctx, pub.endpoint, camera_prefix("cam1"))
    everything = sub_socket(ctx, pub.endpoint, camera_prefix())
    try:
        wait_until_subscribed(pub, only_cam1, everything)
        for seq in range(1, 4):
            for cam in ("cam10", "cam1", "cam1x", "cam"):
                assert pub.publish_result(header_for(cam, seq), None)
        got_cam1 = [decode_message(only_cam1.recv_multipart()) for _ in range(3)]
        assert [(m.camera, m.seq) for m in got_cam1] == [("cam1", 1), ("cam1", 2), ("cam1", 3)]
        assert not only_cam1.poll(300)
        got_all = [decode_message(everything.recv_multipart()).camera for _ in range(12)]
        assert got_all == ["cam10", "cam1", "cam1x", "cam"] * 3
    finally:
        only_cam1.close()
        everything.close()
        ctx.term()
        pub.close()


@pytest.mark.integration
def test_result_header_round_trip_over_a_real_socket():
    mask = np.zeros((40, 60), bool)
    mask[10:20, 30:50] = True
    header = header_for(
        "line-2_cam",
        7,
        regions=[
            {"bbox": [30, 10, 20, 10], "area": 200, "peak": np.float32(0.9), "defect": True},
            {"bbox": [1, 1, 2, 2], "area": 4, "peak": 0.6, "defect": False},
        ],
        regions_total=2,
        defect_regions=1,
        frame_index=np.int64(41),
        mask={"width": 60, "height": 40},
    )
    ctx = zmq.Context()
    pub = ResultPublisher("tcp://127.0.0.1:*", 100)
    sub = sub_socket(ctx, pub.endpoint, camera_prefix("line-2_cam"))
    try:
        before = time.time()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not sub.poll(50):
            pub.publish_result(header, encode_mask_png(mask))
        msg = decode_message(sub.recv_multipart())
    finally:
        sub.close()
        ctx.term()
        pub.close()
    h = msg.header
    assert msg.topic == "linewatch/line-2_cam/result" and msg.kind == "result"
    assert h["schema_version"] == SCHEMA_VERSION
    assert (h["camera"], h["seq"], h["part_id"], h["verdict"]) == ("line-2_cam", 7, "P-7", "NOK")
    assert h["frame_time"] == 1_700_000_000.25 and h["image_score"] == 0.75
    assert h["thresholds"] == {"pixel": 0.5, "image": 0.6}
    assert (h["calibration_version"], h["model_id"], h["frame_index"]) == (2, "0123456789ab", 41)
    assert h["regions"][0] == {"bbox": [30, 10, 20, 10], "area": 200, "peak": pytest.approx(0.9), "defect": True}
    assert h["regions"][1]["defect"] is False  # largest first: the defect region before the speck
    assert h["regions_total"] == 2 and h["defect_regions"] == 1 and h["error"] is None
    assert h["mask"] == {"format": "png", "width": 60, "height": 40}
    assert before - 1 <= h["publish_time"] <= time.time() and len(h["run_id"]) == 12
    np.testing.assert_array_equal(msg.mask_array() > 0, mask)


@pytest.mark.unit
def test_header_rules_never_let_an_uninspected_part_pass():
    with pytest.raises(ValueError, match="needs a finite image score"):
        header_for("cam1", 1, verdict="OK", image_score=float("nan"))
    with pytest.raises(ValueError, match="use verdict ERROR"):
        header_for("cam1", 1, verdict="OK", error="camera offline")
    with pytest.raises(ValueError, match="needs a reason"):
        header_for("cam1", 1, verdict="ERROR")
    with pytest.raises(ValueError, match="verdict"):
        header_for("cam1", 1, verdict="GOOD")
    with pytest.raises(ValueError, match="seq"):
        header_for("cam1", 0)
    err = header_for("cam1", 3, verdict="ERROR", image_score=float("inf"), error="inference failed: boom")
    data = json.loads(encode_json(wire(err)))  # strict JSON: no NaN/Infinity tokens
    assert data["image_score"] is None and data["error"] == "inference failed: boom"
    assert err.verdict is Verdict.ERROR and data["verdict"] == "ERROR"
    # regions as documented: at most 100, largest first, regions_total counts them all
    many = [{"bbox": [i, 0, 1, 1], "area": i, "peak": 1.0} for i in range(250, 149, -1)]
    with pytest.raises(ValueError, match="at most 100"):
        header_for("cam1", 1, regions=many, regions_total=250)
    assert header_for("cam1", 1, regions=many[:100], regions_total=250).model_dump()["regions_total"] == 250
    with pytest.raises(ValueError, match="largest first"):
        header_for("cam1", 1, regions=many[:2][::-1], regions_total=2)
    with pytest.raises(ValueError, match="regions_total"):
        header_for("cam1", 1, regions=many[:2], regions_total=1)


@pytest.mark.unit
def test_one_schema_builds_and_checks_headers_and_ignores_unknown_fields():
    header = wire(header_for("cam1", 5, mask={"width": 8, "height": 8}))
    assert check_result_header(header).seq == 5
    assert check_result_header(dict(header, added_in_a_later_release={"x": 1})).camera == "cam1"
    for key in ("publish_time", "run_id", "regions_total"):
        with pytest.raises(ProtocolError, match=key):
            check_result_header({k: v for k, v in header.items() if k != key})
    with pytest.raises(ProtocolError, match="frame_index"):
        check_result_header(dict(header, frame_index=True))  # strict: no bool for an int
    with pytest.raises(ProtocolError, match="regions"):
        check_result_header(dict(header, regions=[{"bbox": [1, 2, 3], "area": 1, "peak": 0.5}]))


@pytest.mark.unit
def test_mask_png_round_trip_at_a_configured_resolution():
    mask = np.zeros((48, 64), bool)
    mask[8:24, 16:40] = True
    png = encode_mask_png(mask, (32, 24))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 32 * 24
    small = decode_mask_png(png)
    expected = np.zeros((24, 32), np.uint8)
    expected[4:12, 8:20] = 255  # the rectangle at half resolution, still binary
    np.testing.assert_array_equal(small, expected)
    np.testing.assert_array_equal(decode_mask_png(encode_mask_png(mask)), mask.astype(np.uint8) * 255)
    grey = np.linspace(0.0, 1.0, 64, dtype=np.float32)[None, :].repeat(8, 0)
    np.testing.assert_allclose(decode_mask_png(encode_mask_png(grey)), np.round(grey * 255), atol=1)
    up = decode_mask_png(encode_mask_png(mask.astype(np.uint8) * 255, (128, 96)))
    assert up.shape == (96, 128) and set(np.unique(up)) == {0, 255}
    assert encode_mask_png(None, (32, 24)) is None
    with pytest.raises(ValueError):
        encode_mask_png(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ProtocolError):
        decode_mask_png(cv2.imencode(".jpg", np.zeros((8, 8), np.uint8))[1].tobytes())


@pytest.mark.unit
def test_decode_message_rejects_what_does_not_follow_the_protocol():
    header = wire(header_for("cam1", 1, mask={"width": 8, "height": 8}))
    png = encode_mask_png(np.ones((8, 8), bool))
    good = [result_topic("cam1"), encode_json(header), png]
    assert decode_message(good).seq == 1
    no_mask = wire(header_for("cam1", 2))
    assert decode_message([result_topic("cam1"), encode_json(no_mask), b""]).mask is None
    bad = {
        "frame count": good[:1],
        "too many frames": good + [b"x"],
        "topic": [b"linewatch/cam1/results", good[1], png],
        "topic root": [b"other/cam1/result", good[1], png],
        "json": [good[0], b"\xff{not json", png],
        "array": [good[0], b"[1, 2]", png],
        "camera mismatch": [result_topic("cam2"), good[1], png],
        "schema": [good[0], encode_json(dict(header, schema_version=99)), png],
        "missing field": [good[0], encode_json({k: v for k, v in header.items() if k != "seq"}), png],
        "bad type": [good[0], encode_json(dict(header, seq="1")), png],
        "OK without score": [good[0], encode_json(dict(header, verdict="OK", image_score=None)), png],
        "mask not png": [good[0], good[1], b"GIF89a"],
        "mask not announced": [good[0], encode_json(no_mask), png],
        "status frames": [
            status_topic("cam1"),
            encode_json({"schema_version": 1, "kind": "status", "camera": "cam1"}),
            b"",
        ],
    }
    for name, frames in bad.items():
        with pytest.raises(ProtocolError):
            decode_message(frames)
            pytest.fail(name)


def _doc_example() -> str:
    text = (ROOT / "docs" / "PROTOCOL.md").read_text()
    match = re.search(r"<!-- example: subscriber -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/PROTOCOL.md lost its marked subscriber example"
    return match.group(1)


@pytest.mark.e2e
def test_the_subscriber_example_in_protocol_md_runs(tmp_path):
    code = _doc_example()
    assert len(code.strip().splitlines()) <= 25 and "linewatch" not in code.replace("linewatch/", "")
    assert "tcp://127.0.0.1:5555" in code
    pub = ResultPublisher("tcp://127.0.0.1:*", 100)
    script = tmp_path / "example.py"
    script.write_text(code.replace("tcp://127.0.0.1:5555", pub.endpoint))
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        seq, deadline = 0, time.monotonic() + 15
        mask = np.zeros((16, 16), bool)
        mask[2:6, 3:9] = True
        while time.monotonic() < deadline and sum(" NOK " in line for line in lines) < 3:
            seq += 1
            pub.publish_result(header_for("cam1", seq, mask={"width": 16, "height": 16}), encode_mask_png(mask))
            pub.publish_status("cam1", {"state": "online"})
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait(5)
        reader.join(5)
        pub.close()
    results = [line for line in lines if "cam1" in line and "NOK" in line]
    assert len(results) >= 3, (lines, proc.stderr.read())
    first = results[0].split()
    assert first[0] == "cam1" and first[2] == f"P-{first[1]}" and first[4] == "0.75" and int(first[5]) > 0
    assert any(line.split() == ["status", "cam1", "online"] for line in lines)


@pytest.mark.integration
def test_published_header_separates_defect_regions_from_specks(deviation_bundle, tmp_path):
    """The daemon's own header builder on a real engine and calibration, sent and checked over a real socket."""
    import shutil

    from linewatch.calibrate.store import write_calibration
    from linewatch.line.frames import Frame
    from linewatch.line.inference import judge_frames, load_model, result_header

    model_dir = tmp_path / "model"
    shutil.copytree(deviation_bundle, model_dir)
    write_calibration(model_dir, 0.5, min_defect_area=10)
    model = load_model(model_dir)
    nok, ok = np.full((64, 64, 3), 128, np.uint8), np.full((64, 64, 3), 128, np.uint8)
    nok[4:10, 4:10] = 255  # 36 px defect
    nok[40:42, 40:42] = ok[40:42, 40:42] = 255  # 4 px speck on both
    frames = [Frame("cam1", i, time.time(), time.monotonic(), img) for i, img in enumerate((nok, ok))]
    headers = [result_header(r, i + 1) for i, r in enumerate(judge_frames(model, frames))]
    ctx = zmq.Context()
    pub = ResultPublisher("tcp://127.0.0.1:*", 100)
    sub = sub_socket(ctx, pub.endpoint, camera_prefix("cam1"))
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not sub.poll(50):
            pub.publish_result(headers[0], None)
        got = {}
        while len(got) < 2 and time.monotonic() < deadline:
            for h in headers:
                pub.publish_result(h, None)
            while sub.poll(50):
                msg = decode_message(sub.recv_multipart())  # checked against the schema on receipt
                got[msg.seq] = msg.header
    finally:
        sub.close()
        ctx.term()
        pub.close()
    assert got[1]["verdict"] == "NOK" and got[1]["regions_total"] == 2 and got[1]["defect_regions"] == 1
    assert [(r["area"], r["defect"]) for r in got[1]["regions"]] == [(36, True), (4, False)]
    assert got[2]["verdict"] == "OK" and got[2]["regions_total"] == 1 and got[2]["defect_regions"] == 0
    assert [(r["area"], r["defect"]) for r in got[2]["regions"]] == [(4, False)]


@pytest.mark.unit
def test_defect_fields_are_additive_and_checked():
    speck = {"bbox": [1, 1, 2, 2], "area": 4, "peak": 0.6}
    big = {"bbox": [5, 5, 6, 6], "area": 36, "peak": 0.9}
    old = wire(header_for("cam1", 1, regions=[big, speck], regions_total=2))  # a daemon before the fields
    assert check_result_header(old).defect_regions is None and old["regions"][0]["defect"] is None
    new = header_for(
        "cam1", 1, regions=[big | {"defect": True}, speck | {"defect": False}], regions_total=2, defect_regions=1
    )
    assert check_result_header(wire(new)).defect_regions == 1
    with pytest.raises(ValueError, match="that is NOK"):
        header_for("cam1", 1, verdict="OK", regions=[big | {"defect": True}], defect_regions=1)
    with pytest.raises(ValueError, match="listed before the specks"):
        header_for("cam1", 1, regions=[big | {"defect": False}, speck | {"defect": True}], regions_total=2)
    with pytest.raises(ValueError, match="does not match"):
        header_for(
            "cam1", 1, regions=[big | {"defect": True}, speck | {"defect": False}], regions_total=2, defect_regions=2
        )
    with pytest.raises(ValueError, match="exceeds regions_total"):
        header_for("cam1", 1, defect_regions=3)
