"""Image gating (issue 18, item 3): too dark, too bright, out of focus and no part present are ERROR results with
the reason and counted per reason, never scored. The measures on real pictures, the gate object, the Prometheus
family, and the daemon as a subprocess on a folder camera with the deviation bundle (tests/bundles.py)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from prometheus_client import generate_latest

from linewatch.errors import ConfigError
from linewatch.line.config import GatingConfig
from linewatch.line.frames import Frame
from linewatch.line.gating import (
    NO_PART,
    OUT_OF_FOCUS,
    TOO_BRIGHT,
    TOO_DARK,
    FrameGate,
    brightness,
    difference,
    sharpness,
    small,
)
from linewatch.validation import validate
from tests.test_daemon import Subscriber, daemon_log, start_daemon, status_fields, stop, write_config

SIZE = 96


def part(size: int = SIZE) -> np.ndarray:
    """A sharp part: a checkerboard of greys 96/160 (deviation 0.25 < the test calibration's 0.5: OK if judged)."""
    yy, xx = np.mgrid[:size, :size]
    board = np.where(((yy // 8) + (xx // 8)) % 2 == 0, 96, 160).astype(np.uint8)
    return np.dstack([board] * 3)


def empty_station(size: int = SIZE) -> np.ndarray:
    """The station without a part: a darker plate (deviation 0.45: OK if judged) with a fixture."""
    img = np.full((size, size, 3), 72, np.uint8)
    cv2.rectangle(img, (10, 10), (30, 80), (110, 110, 110), -1)  # a fixture, always there
    return img


def blurred(img: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), 5)


def noisy(img: np.ndarray, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, 2.0, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


GATING = {
    "min_mean": 40,
    "max_mean": 220,
    "focus_min_ratio": 0.3,
    "presence_min_diff": 8,
}


def gating_cfg(tmp_path, **extra) -> GatingConfig:
    cv2.imwrite(str(tmp_path / "sharp.png"), part())
    cv2.imwrite(str(tmp_path / "empty.png"), empty_station())
    data = {**GATING, "focus_reference": "sharp.png", "empty_reference": "empty.png", **extra}
    return validate(GatingConfig, data, "test", context={"base": tmp_path})


# --- the measures ---------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_brightness_sharpness_and_difference_measure_what_they_say():
    grey = cv2.cvtColor(part(), cv2.COLOR_BGR2GRAY)
    b = brightness(grey)
    assert b.mean == pytest.approx(128.0, abs=0.01) and b.dark == 0.0 and b.bright == 0.0
    half = np.zeros((10, 10), np.uint8)
    half[:, 5:] = 255
    b = brightness(half)
    assert b.mean == pytest.approx(127.5) and b.dark == pytest.approx(0.5) and b.bright == pytest.approx(0.5)
    assert sharpness(cv2.GaussianBlur(grey, (0, 0), 5)) < 0.1 * sharpness(grey)
    assert sharpness(np.full((32, 32), 77, np.uint8)) == 0.0
    assert small(np.zeros((480, 640), np.uint8)).shape == (120, 160)
    a, c = np.full((8, 8), 100, np.uint8), np.full((8, 8), 110, np.uint8)
    assert difference(a, c) == pytest.approx(10.0)


@pytest.mark.unit
def test_gate_names_each_reason_counts_it_and_lets_good_frames_through(tmp_path):
    gate = FrameGate("cam1", gating_cfg(tmp_path, max_clipped=0.5))
    assert gate.check(noisy(part())) is None
    dark = gate.check(part() // 10)
    assert dark is not None and dark.reason == TOO_DARK and "mean grey" in dark.text and dark.text.startswith("gated:")
    assert gate.check(np.full((SIZE, SIZE, 3), 240, np.uint8)).reason == TOO_BRIGHT
    assert gate.check(noisy(empty_station(), 1)).reason == NO_PART
    blur = gate.check(blurred(part()))
    assert blur is not None and blur.reason == OUT_OF_FOCUS and "reference" in blur.text
    # a frame at another size than the reference: the reference is compared at the frame's size
    big = cv2.resize(part(), (2 * SIZE, 2 * SIZE), interpolation=cv2.INTER_NEAREST)
    assert gate.check(big) is None and gate.check(blurred(big)).reason == OUT_OF_FOCUS
    # half the pixels saturated, mean still in bounds: clipped highlights
    clipped = np.full((SIZE, SIZE, 3), 20, np.uint8)
    clipped[:, : SIZE // 2 + 8] = 255
    assert gate.check(clipped).reason == TOO_BRIGHT
    assert gate.snapshot() == {TOO_DARK: 1, TOO_BRIGHT: 2, NO_PART: 1, OUT_OF_FOCUS: 2}
    assert gate.passed == 2


@pytest.mark.unit
def test_absolute_focus_floor_and_config_errors(tmp_path):
    gate = FrameGate("cam1", validate(GatingConfig, {"focus_min": 50.0}, "test"))
    assert gate.check(part()) is None
    verdict = gate.check(blurred(part()))
    assert verdict is not None and verdict.reason == OUT_OF_FOCUS and "focus_min 50" in verdict.text
    with pytest.raises(ConfigError, match="focus_reference"):
        validate(GatingConfig, {"focus_min_ratio": 0.5}, "cfg.yaml")
    with pytest.raises(ConfigError, match="empty_reference"):
        validate(GatingConfig, {"presence_min_diff": 5}, "cfg.yaml")
    with pytest.raises(ConfigError, match="max_mean"):
        validate(GatingConfig, {"min_mean": 100, "max_mean": 50}, "cfg.yaml")
    with pytest.raises(ConfigError, match="empty_reference"):
        validate(GatingConfig, {"empty_reference": "missing.png"}, "cfg.yaml", context={"base": tmp_path})
    (tmp_path / "broken.png").write_bytes(b"not a png")
    cfg = validate(
        GatingConfig, {"empty_reference": "broken.png", "presence_min_diff": 3}, "c", context={"base": tmp_path}
    )
    with pytest.raises(ConfigError, match="gating.empty_reference"):
        FrameGate("cam1", cfg)
    assert not validate(GatingConfig, {}, "c").enabled


@pytest.mark.unit
def test_gated_counts_are_a_prometheus_family_per_camera_and_reason():
    from linewatch.line.prometheus import DaemonMetrics

    metrics = DaemonMetrics()
    metrics.watch_gating(lambda: {"cam1": {TOO_DARK: 3, NO_PART: 0}})
    text = generate_latest(metrics.registry).decode()
    assert 'linewatch_gated_frames_total{camera="cam1",reason="too_dark"} 3.0' in text
    assert 'linewatch_gated_frames_total{camera="cam1",reason="no_part"} 0.0' in text


# --- end to end: the daemon as a subprocess ------------------------------------------------------------------


@pytest.mark.e2e
def test_daemon_publishes_gated_frames_as_error_with_reasons_and_counts_them(calibrated, tmp_path):
    from linewatch.line.inference import judge_frames, load_model

    frames = {
        "0_good.png": noisy(part(), 2),
        "1_dark.png": part() // 10,
        "2_blurred.png": blurred(part()),
        "3_empty.png": noisy(empty_station(), 3),
        "4_bright.png": np.full((SIZE, SIZE, 3), 235, np.uint8),
        "5_good.png": noisy(part(), 4),
    }
    # the point of the gate: a blurred frame and an empty station would pass if they were scored
    model = load_model(calibrated, ("cpu",))
    scored = judge_frames(model, [Frame("c", i, 0.0, 0.0, img) for i, img in enumerate(frames.values())])
    assert [r.verdict for r in scored] == ["OK", "NOK", "OK", "OK", "NOK", "OK"]

    folder = tmp_path / "frames"
    folder.mkdir()
    for name, img in frames.items():
        cv2.imwrite(str(folder / name), img)
    cv2.imwrite(str(tmp_path / "sharp.png"), part())
    cv2.imwrite(str(tmp_path / "empty.png"), empty_station())
    gating = {**GATING, "focus_reference": str(tmp_path / "sharp.png"), "empty_reference": str(tmp_path / "empty.png")}
    config, endpoint = write_config(
        tmp_path,
        calibrated,
        [{"name": "cam1", "kind": "folder", "source": str(folder), "loop": True, "fps": 20, "gating": gating}],
    )
    sub = Subscriber(endpoint)
    proc = start_daemon(config, tmp_path)
    try:
        sub.until(lambda: len(sub.results) >= 14, 30, "14 results")
        assert stop(proc) == 0, daemon_log(tmp_path)[-3000:]
        sub.poll(0.5)
    finally:
        stop(proc)
        sub.close()
    expected = ["OK", "too dark", "out of focus", "no part", "too bright", "OK"]
    for h in sub.results:
        want = expected[(h["frame_index"] - 1) % len(expected)]
        if want == "OK":
            assert h["verdict"] == "OK" and h["error"] is None, h
        else:  # never scored: no score, no regions, the reason
            assert h["verdict"] == "ERROR" and h["error"].startswith(f"gated: {want}: "), h
            assert h["image_score"] is None and h["regions"] == [], h
    final = status_fields(sub.status("cam1"))
    kinds = [expected[i % len(expected)] for i in range(final["captured"])]
    assert final["gated"] == {
        "too_dark": kinds.count("too dark"),
        "too_bright": kinds.count("too bright"),
        "no_part": kinds.count("no part"),
        "out_of_focus": kinds.count("out of focus"),
    }
    assert final["verdicts"]["ERROR"] == sum(final["gated"].values()) and final["verdicts"]["NOK"] == 0
    assert final["verdicts"]["OK"] == kinds.count("OK") and final["results"] == final["captured"]
    assert final["frame_errors"] == 0 and final["last_error"] is None  # the camera is fine; the pictures were not
    log = daemon_log(tmp_path)
    assert "frames gated: gated: too dark" in log and "pass the gate again" in log
