"""Drift watch (linewatch/line/drift.py): the exact ARL of the CUSUM against seeded simulations of the watch itself,
the stated false-alarm bound over calibration samples, detection of shifted streams both ways, the state rules, and
the daemon as a subprocess whose camera turns darker than its calibration."""

from __future__ import annotations

import json
import math
import shutil
import signal
import urllib.request

import cv2
import numpy as np
import pytest

from linewatch.calibrate.store import write_calibration
from linewatch.calibrate.thresholds import beta_ppf
from linewatch.line import drift
from linewatch.line.engine import Engine
from tests.helpers import free_port, grey, write_video
from tests.test_daemon import Subscriber, daemon_log, start_daemon, status_fields, stop, write_config


def normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def outside_probability(plan: drift.DriftDesign, mean: float = 0.0) -> float:
    """True P(outside the band) for N(mean, 1) parts: the band's order statistics came from N(0, 1)."""
    return normal_cdf(plan.low - mean) + 1 - normal_cdf(plan.high - mean)


def parts_until_alarm(watch: drift.DriftWatch, rng: np.random.Generator, mean: float, limit: int) -> int:
    for i in range(1, limit + 1):
        watch.update(float(rng.normal(mean)))
        if watch.state == drift.ALARM:
            return i
    return limit


# --- the maths -------------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_exact_arl_matches_the_watch_run_on_seeded_streams():
    rng = np.random.default_rng(1)
    good = rng.normal(size=60)
    plan = drift.design(good, warn_arl0=30, alarm_arl0=120)
    assert isinstance(plan, drift.DriftDesign)
    p = outside_probability(plan)
    expected = drift.arl(p, plan.up, plan.down, plan.alarm_at)
    runs = np.array([parts_until_alarm(drift.DriftWatch(plan), rng, 0.0, 100_000) for _ in range(400)])
    se = runs.std(ddof=1) / math.sqrt(runs.size)
    assert abs(runs.mean() - expected) < 4 * se, (runs.mean(), expected, se)


@pytest.mark.unit
def test_thresholds_are_the_smallest_that_reach_the_target_arl():
    plan = drift.design(np.random.default_rng(2).normal(size=200))
    assert isinstance(plan, drift.DriftDesign)
    for h, target, got in ((plan.warn_at, 1e4, plan.warn_arl0), (plan.alarm_at, 1e5, plan.alarm_arl0)):
        assert drift.arl(plan.p0, plan.up, plan.down, h) == pytest.approx(got)
        assert got >= target > drift.arl(plan.p0, plan.up, plan.down, h - 1)
    # fewer parts outside than designed for: longer runs (the bound holds for every p <= p0)
    ps = [plan.p0 * f for f in (1.0, 0.8, 0.5)]
    arls = [drift.arl(p, plan.up, plan.down, plan.alarm_at) for p in ps]
    assert arls == sorted(arls)


@pytest.mark.unit
def test_the_outside_rate_is_bounded_for_the_stated_share_of_calibrations():
    """P(outside) <= p0 for `confidence` of calibration samples (so ARL0 >= the target there), no more, no less."""
    rng = np.random.default_rng(3)
    n, quantile, confidence = 50, 0.9, 0.9
    j, k = drift.band_indices(n, quantile)
    p0 = beta_ppf(confidence, 2 * j, k - j)
    trials = 3000
    covered = 0
    for _ in range(trials):
        good = np.sort(rng.normal(size=n))
        true_p = normal_cdf(good[j - 1]) + 1 - normal_cdf(good[k - 1])
        covered += true_p <= p0
    share, se = covered / trials, math.sqrt(confidence * (1 - confidence) / trials)
    assert abs(share - confidence) < 4 * se, share


@pytest.mark.unit
@pytest.mark.parametrize("mean", [1.5, -1.5])
def test_a_shifted_stream_alarms_within_tens_of_parts_either_way(mean):
    rng = np.random.default_rng(4)
    plan = drift.design(rng.normal(size=200))
    assert isinstance(plan, drift.DriftDesign)
    runs = [parts_until_alarm(drift.DriftWatch(plan), rng, mean, 5000) for _ in range(30)]
    expected = drift.arl(outside_probability(plan, mean), plan.up, plan.down, plan.alarm_at)
    assert max(runs) < 100 and expected < 60, (runs, expected)
    in_control = [parts_until_alarm(drift.DriftWatch(plan), rng, 0.0, 2000) for _ in range(5)]
    assert in_control == [2000] * 5  # no alarm in 5 x 2000 good parts (ARL0 >= 1e5)


@pytest.mark.unit
def test_warn_clears_only_at_zero_and_alarm_latches_until_reset():
    plan = drift.design(np.linspace(0.0, 1.0, 101))
    assert isinstance(plan, drift.DriftDesign)
    watch = drift.DriftWatch(plan)
    changes = []
    while watch.state == drift.OK:
        changes.append(watch.update(5.0))
    assert changes[-1] == (drift.OK, drift.WARN) and watch.snapshot()["above"] == len(changes)
    assert watch.snapshot()["advice"] and "recalibrate" in watch.snapshot()["advice"]
    steps = 0
    while watch.state == drift.WARN:
        assert watch.update(0.5) in (None, (drift.WARN, drift.OK))
        steps += 1
    assert watch.statistic == 0 and steps == math.ceil(len(changes) * plan.up / plan.down)
    while watch.state != drift.ALARM:
        watch.update(-3.0)  # below the band counts too
    assert watch.snapshot()["below"] > 0
    for _ in range(1000):
        watch.update(0.5)
    assert watch.state == drift.ALARM and watch.statistic == 0
    assert drift.DriftWatch(plan).state == drift.OK  # what a reload does: a fresh watch
    assert watch.gauge() == (2, 0.0)


@pytest.mark.unit
def test_without_good_scores_drift_is_unavailable_and_never_fails():
    for scores in (None, [], [0.1] * 9):
        plan = drift.design(scores)
        assert isinstance(plan, str) and "good" in plan
        watch = drift.DriftWatch(plan)
        assert watch.update(1.0) is None and watch.update(float("nan")) is None
        snap = watch.snapshot()
        assert snap["state"] == drift.UNAVAILABLE and snap["reason"] == plan
        code, value = watch.gauge()
        assert code == -1 and math.isnan(value)


# --- the daemon ------------------------------------------------------------------------------------------------


def grey_levels(folder, levels):
    folder.mkdir()
    for i, level in enumerate(levels):
        assert cv2.imwrite(str(folder / f"{i:03d}.png"), grey(level))
    return folder


def video_frames(path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while (got := cap.read())[0]:
        frames.append(got[1])
    cap.release()
    assert frames
    return frames


@pytest.mark.e2e
def test_daemon_reports_drift_when_a_camera_turns_darker_and_resets_on_reload(deviation_bundle, tmp_path):
    """Calibrated on parts of grey 120..136 (scores up to 8/127); camera `dark` sees grey 90 (score 0.30, still
    OK under the pixel threshold 0.5), camera `steady` the calibration's own parts. Default drift settings."""
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(deviation_bundle, bundle_dir)
    levels = np.random.default_rng(5).integers(120, 137, 100).tolist()
    steady = grey_levels(tmp_path / "steady", levels)
    engine = Engine(bundle_dir, providers="cpu", threads=1)
    _, good = engine.score(np.stack([grey(level) for level in levels]))
    write_calibration(bundle_dir, 0.5, min_defect_area=4, good_image_scores=sorted(float(s) for s in good))
    video = write_video(tmp_path / "dark.avi", [grey(90)] * 4)
    metrics_port = free_port()
    config, endpoint = write_config(
        tmp_path,
        bundle_dir,
        [
            {"name": "dark", "kind": "video", "source": str(video), "loop": True, "fps": 50},
            {"name": "steady", "kind": "folder", "source": str(steady), "loop": True, "fps": 50},
        ],
        metrics={"enabled": True, "port": metrics_port},
    )
    sub = Subscriber(endpoint)
    proc = start_daemon(config, tmp_path)
    try:
        sub.until(lambda: (sub.field("dark", "drift") or {}).get("state") == "alarm", 20, "dark camera's alarm")
        seen = {status_fields(s)["drift"]["state"] for s in sub.statuses if s["camera"] == "dark"}
        assert "warn" in seen or "ok" in seen  # it got there from ok, not at start
        dark = sub.field("dark", "drift")
        assert dark["above"] == dark["parts"] > 0 and dark["statistic"] >= dark["alarm_at"]
        assert "recalibrate" in dark["advice"] and dark["since"]
        sub.until(lambda: (sub.field("steady", "drift") or {}).get("parts", 0) >= 100, 20, "100 steady parts")
        assert sub.field("steady", "drift")["state"] == "ok"
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert 'linewatch_drift_state{camera="dark"} 2.0' in text
        assert 'linewatch_drift_state{camera="steady"} 0.0' in text
        assert 'linewatch_drift_statistic{camera="dark"}' in text
        log = daemon_log(tmp_path)
        assert "camera dark: drift ok -> warn" in log and "camera dark: drift warn -> alarm" in log
        assert log.count("camera dark: drift warn -> alarm") == 1 and "recalibrate" in log

        # recalibrated with the dark parts among the good ones: the watch starts afresh and stays ok
        _, dark_scores = engine.score(np.stack(video_frames(video) * 10))  # as the camera decodes them
        write_calibration(
            bundle_dir, 0.5, min_defect_area=4, good_image_scores=sorted([*map(float, good), *map(float, dark_scores)])
        )
        proc.send_signal(signal.SIGHUP)
        sub.until(lambda: sub.field("dark", "calibration_version") == 2, 15, "reload to calibration 2")
        sub.until(lambda: (sub.field("dark", "drift") or {}).get("parts", 0) >= 60, 20, "60 dark parts after reload")
        assert sub.field("dark", "drift")["state"] == "ok", sub.field("dark", "drift")

        # an older calibration file without good_image_scores: unavailable, inspection goes on
        write_calibration(bundle_dir, 0.5, min_defect_area=4)
        proc.send_signal(signal.SIGHUP)
        sub.until(lambda: sub.field("dark", "calibration_version") == 3, 15, "reload to calibration 3")
        n = len(sub.results)
        sub.until(lambda: len(sub.results) > n + 10, 10, "results after the reload")
        drift_now = sub.field("dark", "drift")
        assert drift_now["state"] == "unavailable" and "good_image_scores" in drift_now["reason"], drift_now
        assert {r["verdict"] for r in sub.results[n:]} == {"OK"}
        assert proc.poll() is None
    finally:
        stop(proc)
        sub.close()
    assert json.dumps(sub.statuses[-1])  # the status topic stayed plain JSON throughout
