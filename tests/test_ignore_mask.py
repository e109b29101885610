"""Ignore masks (issue 18, item 4): polygons (fractions of the frame after ROI) zero the anomaly map before
thresholding, so a defect inside never fails a part nor shows in the published mask and regions; the preview shows
the ignored area; `linewatch calibrate` leaves the same area out of the thresholds. Real ONNX engine (the
deviation bundle: |grey - 128| / 127), the daemon as a subprocess on a folder camera, real ZeroMQ sockets."""

from __future__ import annotations

import json
import shutil
import time

import cv2
import numpy as np
import pytest
import yaml

from linewatch.calibrate.command import cli_calibrate
from linewatch.calibrate.store import load_calibration
from linewatch.cli import build_parser
from linewatch.errors import ConfigError
from linewatch.line.config import CameraConfig
from linewatch.line.ignore_mask import IgnoreMask, load_ignore_mask, mask_for
from linewatch.protocol.wire import decode_mask_png
from linewatch.validation import validate
from tests.test_daemon import daemon_log, start_daemon, stop, write_calibration, write_config
from tests.test_preview import RawSub

SIZE = 96
LEFT_TOP = [[0.0, 0.0], [0.3, 0.0], [0.3, 0.3], [0.0, 0.3]]  # x, y < 28.8 px of 96


def two_defects(inside: bool = True, outside: bool = True) -> np.ndarray:
    img = np.full((SIZE, SIZE, 3), 128, np.uint8)
    if inside:
        img[8:20, 8:20] = 255  # a label under the ignore mask
    if outside:
        img[60:72, 60:72] = 255  # a real defect
    return img


# --- the mask itself ------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_raster_follows_the_polygon_at_any_size_and_apply_zeroes_only_inside():
    mask = IgnoreMask([LEFT_TOP])
    for h, w in ((64, 64), (480, 640), (10, 20)):
        r = mask.raster(h, w)
        assert r.shape == (h, w)
        ys, xs = np.nonzero(r)
        # pixel centres (i + 0.5) inside 0.3 of the side
        assert xs.max() + 0.5 <= 0.3 * w + 0.5 and xs.max() + 1.5 > 0.3 * w
        assert ys.max() + 0.5 <= 0.3 * h + 0.5 and ys.max() + 1.5 > 0.3 * h
        assert r.mean() == pytest.approx(0.09, abs=2.5 / min(h, w))
    triangle = IgnoreMask([[[0, 0], [1, 0], [0, 1]]]).raster(100, 100)
    assert triangle.mean() == pytest.approx(0.5, abs=0.02) and triangle[5, 5] and not triangle[95, 95]
    amap = np.random.default_rng(0).random((2, 64, 64)).astype(np.float32) + 1.0
    masked, scores = mask.apply_batch(amap, amap.max(axis=(1, 2)))
    r = mask.raster(64, 64)
    assert (masked[:, r] == 0).all() and (masked[:, ~r] == amap[:, ~r]).all()
    assert scores.dtype == np.float32 and (scores == masked.reshape(2, -1).max(axis=1)).all()
    assert mask_for([LEFT_TOP]) is mask_for([tuple(map(tuple, LEFT_TOP))]) and mask_for(None) is None
    picture = mask.outline(np.zeros((64, 64, 3), np.uint8))
    assert picture[r].any() and not picture[40:, 40:].any()  # hatched inside, untouched outside


@pytest.mark.unit
def test_config_refuses_polygons_outside_the_frame_or_too_small_and_mask_files_load(tmp_path):
    base = {"name": "cam1", "kind": "device", "source": 0}
    with pytest.raises(ConfigError, match=r"ignore_mask\[0\]\[1\]: expected \[x, y\] with 0 <= x, y <= 1"):
        validate(CameraConfig, {**base, "ignore_mask": [[[0, 0], [1.5, 0], [0, 1]]]}, "cfg.yaml")
    with pytest.raises(ConfigError, match="at least 3"):
        validate(CameraConfig, {**base, "ignore_mask": [[[0, 0], [1, 0]]]}, "cfg.yaml")
    (tmp_path / "mask.yaml").write_text(yaml.safe_dump({"ignore_mask": [LEFT_TOP]}))
    (tmp_path / "mask.json").write_text(json.dumps([LEFT_TOP]))
    assert load_ignore_mask(tmp_path / "mask.yaml").polygons == load_ignore_mask(tmp_path / "mask.json").polygons
    (tmp_path / "empty.yaml").write_text("[]\n")
    with pytest.raises(ConfigError, match="no polygons"):
        load_ignore_mask(tmp_path / "empty.yaml")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump([[[0, 0], [2, 0], [0, 1]]]))
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_ignore_mask(tmp_path / "bad.yaml")


@pytest.mark.integration
def test_judge_frames_uses_the_camera_mask_and_a_models_own_replaces_it(deviation_bundle, tmp_path):
    from dataclasses import replace

    from linewatch.line.frames import Frame
    from linewatch.line.inference import judge_frames, load_model

    dst = tmp_path / "bundle"
    shutil.copytree(deviation_bundle, dst)
    write_calibration(dst, 0.5)
    model = load_model(dst, ("cpu",))
    frame = Frame("cam1", 1, time.time(), time.monotonic(), two_defects(outside=False))
    assert judge_frames(model, [frame])[0].verdict == "NOK"
    masked = judge_frames(model, [frame], {"cam1": [LEFT_TOP]})[0]
    assert masked.verdict == "OK" and masked.score == 0.0 and masked.anomaly_map.max() == 0.0
    elsewhere = replace(model, ignore_masks={"cam1": [[[0.5, 0.5], [1, 0.5], [1, 1]]]})  # a recipe's own mask
    assert judge_frames(elsewhere, [frame], {"cam1": [LEFT_TOP]})[0].verdict == "NOK"


# --- end to end: the daemon as a subprocess ------------------------------------------------------------------


@pytest.mark.e2e
def test_a_defect_inside_the_mask_never_fails_a_part_and_one_outside_still_does(calibrated, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    cv2.imwrite(str(folder / "0_both.png"), two_defects())
    cv2.imwrite(str(folder / "1_label_only.png"), two_defects(outside=False))
    preview = {"enabled": True, "max_fps": 100, "width": SIZE, "jpeg_quality": 95, "heatmap_size": 64}
    config, endpoint = write_config(
        tmp_path,
        calibrated,
        [{"name": "cam1", "kind": "folder", "source": str(folder), "fps": 20, "ignore_mask": [LEFT_TOP]}],
        publish={"preview": preview},
    )
    sub = RawSub(endpoint, b"linewatch/cam1/")
    proc = start_daemon(config, tmp_path)
    try:
        end = time.monotonic() + 30
        while sum(m[0].endswith(b"/preview") for m in sub.messages) < 6:
            assert time.monotonic() < end and proc.poll() is None, daemon_log(tmp_path)[-3000:]
            sub.poll(0.1)
    finally:
        assert stop(proc) == 0
        sub.close()
    results = [(json.loads(m[1]), m[2]) for m in sub.messages if m[0].endswith(b"/result")]
    previews = [(json.loads(m[1]), m[2], m[3]) for m in sub.messages if m[0].endswith(b"/preview")]
    assert len(results) >= 4
    ignored = IgnoreMask([LEFT_TOP]).raster(64, 64)
    for header, mask_png in results:
        mask = decode_mask_png(mask_png)
        assert not mask[ignored].any(), "the published mask shows the ignored label"
        if header["frame_index"] % 2 == 1:  # both defects: NOK for the one outside only
            assert header["verdict"] == "NOK" and header["defect_regions"] == 1 and header["regions_total"] == 1
            x, y, w, h = header["regions"][0]["bbox"]
            assert x >= 0.3 * 64 and y >= 0.3 * 64, header["regions"]
            assert mask[40:48, 40:48].all()
        else:  # only the label, under the mask
            assert header["verdict"] == "OK" and header["regions"] == [] and header["image_score"] == 0.0
            assert not mask.any()
    for header, jpeg, heat_png in previews:
        shown = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        inside = shown[: int(0.3 * SIZE) - 2, : int(0.3 * SIZE) - 2].reshape(-1, 3).astype(int)
        magenta = (inside[:, 0] > 180) & (inside[:, 1] < 90) & (inside[:, 2] > 180)
        assert magenta.mean() > 0.1, "the ignored area is not drawn on the preview"
        heat = cv2.imdecode(np.frombuffer(heat_png, np.uint8), cv2.IMREAD_GRAYSCALE)
        assert heat[cv2.resize(ignored.astype(np.uint8), heat.shape[::-1]) > 0].max() == 0  # no heat under it


@pytest.mark.e2e
def test_calibration_leaves_the_ignored_area_out_of_the_thresholds(deviation_bundle, tmp_path):
    rng = np.random.default_rng(7)
    good = tmp_path / "good"
    good.mkdir()
    for i in range(20):
        img = np.clip(np.rint(128 + rng.laplace(0.0, 14.0, (SIZE, SIZE, 3))), 0, 255).astype(np.uint8)
        img[8:20, 8:20] = 255  # the label every good part carries, under the mask
        cv2.imwrite(str(good / f"good_{i:03d}.png"), img)
    (tmp_path / "mask.yaml").write_text(yaml.safe_dump([LEFT_TOP]))
    config = tmp_path / "linewatch.yaml"

    def calibrate(name: str, *extra: str) -> float:
        model = tmp_path / name
        shutil.copytree(deviation_bundle, model)
        config.write_text(
            yaml.safe_dump(
                {
                    "model": {"bundle": str(model)},
                    "cameras": [{"name": "cam1", "kind": "folder", "source": str(good), "ignore_mask": [LEFT_TOP]}],
                }
            )
        )
        args = build_parser().parse_args(["calibrate", str(model), "--fpr", "0.01", *extra])
        assert cli_calibrate(args) == 0
        cal = load_calibration(model)
        return cal.pixel_threshold, cal.settings

    plain, settings = calibrate("plain", "--good", str(good))
    from_file, settings_file = calibrate("file", "--good", str(good), "--ignore-mask", str(tmp_path / "mask.yaml"))
    from_camera, settings_cam = calibrate("camera", "--camera", "cam1", "--frames", "20", "--config", str(config))
    assert plain > 0.95  # the label (deviation 1.0) covers more than 1 % of the pixels: it set the threshold
    assert from_file < 0.6 and from_file == from_camera  # the noise sets it; the camera's mask is the same mask
    assert "ignore_mask" not in settings
    assert settings_file["ignore_mask"] == [LEFT_TOP] and settings_cam["ignore_mask_from"].startswith("camera 'cam1'")
