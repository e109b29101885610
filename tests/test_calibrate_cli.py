"""`linewatch calibrate` end to end on the real deviation ONNX bundle (map = |grey - 128| / 127) and generated parts."""

from __future__ import annotations

import json
import logging
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from linewatch import bundle
from linewatch.calibrate.command import cli_calibrate, set_thresholds
from linewatch.calibrate.store import load_calibration
from linewatch.calibrate.thresholds import holdout_split
from linewatch.cli import build_parser, main
from linewatch.line.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


def good_part(rng, scale: float = 14.0, smooth: bool = False) -> np.ndarray:
    """Mid-grey part with per-channel Laplace noise (smooth: blurred, so false positives come in blobs)."""
    noise = rng.laplace(0.0, scale, (SIZE, SIZE, 3))
    if smooth:
        noise = cv2.GaussianBlur(noise, (0, 0), 3) * 3.0
    return np.clip(np.rint(128 + noise), 0, 255).astype(np.uint8)


def write_good(folder: Path, n: int, seed: int, scale: float = 14.0) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        cv2.imwrite(str(folder / f"good_{i:03d}.png"), good_part(rng, scale))
    return folder


def write_defects(root: Path, n: int, seed: int) -> Path:
    """MVTec layout: test/blob with bright discs and their masks, test/good without masks."""
    rng = np.random.default_rng(seed)
    for sub in ("test/blob", "test/good", "ground_truth/blob"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        img = good_part(rng)
        mask = np.zeros((SIZE, SIZE), np.uint8)
        cv2.circle(mask, (int(rng.integers(12, 52)), int(rng.integers(12, 52))), int(rng.integers(4, 8)), 255, -1)
        img[mask > 0] = 250
        cv2.imwrite(str(root / "test/blob" / f"{i:03d}.png"), img)
        cv2.imwrite(str(root / "ground_truth/blob" / f"{i:03d}_mask.png"), mask)
        cv2.imwrite(str(root / "test/good" / f"{i:03d}.png"), good_part(rng))
    return root


def deviation_maps(paths) -> np.ndarray:
    """The test bundle's anomaly map computed with NumPy instead of ONNX Runtime (float32, as the graph does)."""
    grey = [cv2.imread(str(p)).astype(np.float32).mean(axis=2, dtype=np.float32) for p in paths]
    return np.stack([np.abs(g - np.float32(128)) / np.float32(127) for g in grey])


@pytest.fixture
def model(deviation_bundle, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(deviation_bundle, dst)
    return dst


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", "linewatch.cli", "calibrate", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.mark.e2e
def test_cli_calibrates_reports_recalibrates_and_rolls_back(model, tmp_path):
    good = write_good(tmp_path / "good", 30, seed=1)
    defects = write_defects(tmp_path / "defects", 4, seed=2)
    out = tmp_path / "result.json"
    proc = run_cli(
        str(model),
        "--good",
        str(good),
        "--fpr",
        "0.01",
        "--image-fpr",
        "0.1",
        "--min-defect-area",
        "4",
        "--defects",
        str(defects),
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    cal = load_calibration(model)
    result = json.loads(out.read_text())
    assert cal.to_dict() == result["calibration"] and cal.version == 1
    assert (cal.n_samples, cal.n_holdout, cal.fpr_target, cal.min_defect_area) == (21, 9, 0.01, 4)
    assert cal.settings["source"] == str(good.resolve()) and cal.settings["n_images"] == 30

    # thresholds and realised rates, checked against maps computed without the engine
    calib = deviation_maps([good / n for n in result["calibration_split"]["images"]])
    held = deviation_maps([good / n for n in result["holdout_images"]])
    assert (calib > cal.pixel_threshold).mean() <= 0.01 < (calib >= cal.pixel_threshold).mean()
    rate = cal.holdout_pixel_fpr
    assert rate["rate"] == pytest.approx((held > cal.pixel_threshold).mean(), abs=1e-12)
    assert rate["lower"] <= 0.01 <= rate["upper"] and rate["upper"] - rate["lower"] < 0.01
    img = cal.holdout_image_fpr
    assert img["rate"] == pytest.approx((held.max(axis=(1, 2)) > cal.image_threshold).mean())
    assert img["lower"] <= 0.1 <= img["upper"]

    report = model / "calibration_report"
    png = cv2.imread(str(report / "distributions.png"))
    assert png is not None and png.shape[0] > 300 and png.shape[1] > 800
    assert json.loads((report / "report.json").read_text())["calibration"] == result["calibration"]
    md = (report / "report.md").read_text()
    assert f"{cal.pixel_threshold:.6g}" in md and "detection rate" in md and "distributions.png" in md
    d = result["defects"]
    assert d["defect_images"] == 4 and d["detection_rate"] == 1.0 and d["gt_regions"] == 4
    assert d["pro_at_threshold"] == pytest.approx(1.0)  # the discs (map 0.96) are far above the threshold
    assert d["good_images"] == 4 and d["good_reject_rate"] is not None
    assert d["overlays"] and all(cv2.imread(str(report / name)) is not None for name in d["overlays"])

    proc = run_cli(str(model), "--good", str(good), "--fpr", "0.05", "--report", str(tmp_path / "r2"))
    assert proc.returncode == 0, proc.stderr
    second = load_calibration(model)
    assert second.version == 2 and second.pixel_threshold < cal.pixel_threshold
    # not given, so carried over from v1 (and said so)
    assert (second.image_fpr_target, second.min_defect_area, second.settings["holdout"]) == (0.1, 4, 0.3)
    assert second.settings["origin"]["min_defect_area"] == "carried over from v1"
    assert "carried over from v1" in proc.stderr
    assert (tmp_path / "r2" / "report.md").is_file()

    proc = run_cli(str(model), "--rollback")
    assert proc.returncode == 0, proc.stderr
    back = load_calibration(model)
    assert (back.version, back.pixel_threshold, back.image_threshold, back.restored_version) == (
        3,
        cal.pixel_threshold,
        cal.image_threshold,
        1,
    )
    assert "rolled back" in proc.stderr


@pytest.mark.e2e
def test_too_few_samples_for_the_rate_is_refused(model, tmp_path):
    good = write_good(tmp_path / "good", 3, seed=3)
    proc = run_cli(str(model), "--good", str(good), "--fpr", "0.001")
    assert proc.returncode == 2
    assert "too few samples" in proc.stderr and "at least 63 calibration images" in proc.stderr
    assert not (model / bundle.CALIBRATION).exists()


@pytest.mark.integration
@pytest.mark.parametrize("smooth", [False, True], ids=["iid-noise", "blob-noise"])
def test_realised_fpr_on_held_out_parts_lands_within_the_reported_bound(deviation_bundle, smooth):
    """Ten independent calibrations: the interval covers the target, and the true rate of the chosen threshold
    (measured on 300 further parts) — also when false positives come in blobs, where a per-pixel binomial
    interval would be far too narrow."""
    engine = Engine(deviation_bundle, providers="cpu")
    rng = np.random.default_rng(100 + smooth)
    fresh_maps, _ = engine.score(np.stack([good_part(rng, smooth=smooth) for _ in range(300)]))
    fpr, covers_target, covers_truth, n_eff = 0.01, 0, 0, []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        maps, scores = engine.score(np.stack([good_part(rng, smooth=smooth) for _ in range(40)]))
        th = set_thresholds(maps, scores, fpr, None, 0.3, seed=seed)
        assert (maps[th.calib_idx] > th.pixel).mean() <= fpr
        held = th.hold_pixel
        truth = (fresh_maps > th.pixel).mean()
        covers_target += held.lower <= fpr <= held.upper
        covers_truth += held.lower <= truth <= held.upper
        n_eff.append(held.n_effective)
    print(
        f"smooth={smooth}: target covered {covers_target}/10, true rate covered {covers_truth}/10, "
        f"mean effective n {np.mean(n_eff):.0f} of {12 * SIZE * SIZE} pixels"
    )
    assert covers_target >= 8 and covers_truth >= 8, (covers_target, covers_truth)
    pixels = 12 * SIZE * SIZE
    if smooth:
        assert np.mean(n_eff) < 0.2 * pixels  # blobs: far fewer independent units than pixels
    else:
        assert np.mean(n_eff) > 0.5 * pixels


@pytest.mark.integration
def test_missed_target_warns_in_log_and_report(model, tmp_path, caplog):
    n = 30
    _, hold = holdout_split(n, 0.3, 0)
    folder = tmp_path / "good"
    folder.mkdir()
    rng = np.random.default_rng(4)
    for i in range(n):  # the held-out parts are noisier than the rest: a drift the check must catch (not so
        # much noisier that their image scores mark them as defective: those would be excluded, see below)
        cv2.imwrite(str(folder / f"good_{i:03d}.png"), good_part(rng, 20.0 if i in set(hold) else 10.0))
    args = build_parser().parse_args(["calibrate", str(model), "--good", str(folder), "--fpr", "0.01"])
    with caplog.at_level(logging.WARNING, logger="linewatch.calibrate.command"):
        assert cli_calibrate(args) == 0
    report = json.loads((model / "calibration_report" / "report.json").read_text())
    assert len(report["warnings"]) == 1 and "MORE false alarms" in report["warnings"][0]
    assert "MORE false alarms" in caplog.text
    assert load_calibration(model).holdout_pixel_fpr["lower"] > 0.01


@pytest.mark.integration
def test_camera_source_from_the_daemon_config(model, tmp_path):
    good = write_good(tmp_path / "frames", 20, seed=5)
    config = tmp_path / "linewatch.yaml"
    config.write_text(
        f"model: {{bundle: {model}}}\ncameras:\n  - {{name: cam1, kind: folder, source: {good}, loop: false}}\n"
    )
    args = build_parser().parse_args(
        [
            "calibrate",
            str(model),
            "--camera",
            "cam1",
            "--frames",
            "20",
            "--config",
            str(config),
            "--fpr",
            "0.01",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert cli_calibrate(args) == 0
    cal = load_calibration(model)
    assert cal.settings["source_kind"] == "camera" and cal.settings["source"] == "cam1"
    assert cal.n_samples + cal.n_holdout == 20
    # the same frames from the folder give the same threshold
    folder_maps = deviation_maps(sorted(good.iterdir()))
    calib = folder_maps[holdout_split(20, 0.3, 0)[0]]
    assert (calib > cal.pixel_threshold).mean() <= 0.01 < (calib >= cal.pixel_threshold).mean()


@pytest.mark.integration
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--fpr", "0.01"], "exactly one source"),
        (["--camera", "cam1"], "--camera needs --config"),
        (["--good", "x", "--fpr", "1.0"], "--fpr must be in"),
        (["--good", "x", "--holdout", "0.95"], "--holdout must be in"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(model, argv, message, caplog):
    from linewatch.cli import main

    with caplog.at_level(logging.ERROR):
        assert main(["calibrate", str(model), *argv]) == 2
    assert message in caplog.text and not (model / bundle.CALIBRATION).exists()


@pytest.fixture
def open_model(deviation_bundle):
    """A bundle in a folder every user may enter (pytest's own tmp root is 0700, private to the runner)."""
    top = Path(tempfile.mkdtemp(prefix="linewatch-calibrate-"))
    top.chmod(0o755)
    shutil.copytree(deviation_bundle, top / "model")
    (top / "model").chmod(0o755)
    yield top / "model"
    shutil.rmtree(top)


def calibrate_args(model: Path, good: Path, *extra: str):
    return build_parser().parse_args(["calibrate", str(model), "--good", str(good), "--fpr", "0.01", *extra])


@pytest.mark.integration
def test_warns_when_the_daemons_user_could_not_read_the_calibration(open_model, tmp_path, caplog, monkeypatch):
    """`sudo linewatch calibrate` under a strict umask: the daemon's next reload would be refused, so say so."""
    good = write_good(tmp_path / "good", 20, seed=6)
    path = open_model / bundle.CALIBRATION
    saved = os.umask(0o077)
    try:
        with caplog.at_level(logging.WARNING, logger="linewatch.calibrate.command"):
            assert cli_calibrate(calibrate_args(open_model, good, "--daemon-user", "nobody")) == 0
    finally:
        os.umask(saved)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert f"user nobody cannot read {path}" in caplog.text and "-rw-------" in caplog.text
    report = json.loads((open_model / "calibration_report" / "report.json").read_text())
    assert any("could not load" in w for w in report["warnings"])

    caplog.clear()
    path.chmod(0o644)  # fixed by the operator: the next calibration keeps the mode, no warning
    monkeypatch.setattr("linewatch.calibrate.command.DAEMON_USER", "nobody")  # the default user, when it exists
    with caplog.at_level(logging.WARNING, logger="linewatch.calibrate.command"):
        assert cli_calibrate(calibrate_args(open_model, good)) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and "cannot" not in caplog.text

    open_model.chmod(0o700)  # a folder on the way the daemon may not enter
    with caplog.at_level(logging.WARNING, logger="linewatch.calibrate.command"):
        assert main(["calibrate", str(open_model), "--rollback", "--daemon-user", "nobody"]) == 0
    if os.geteuid() != pwd.getpwnam("nobody").pw_uid:
        assert f"user nobody cannot enter {open_model}" in caplog.text


@pytest.mark.integration
def test_an_unknown_daemon_user_is_a_usage_error(model, tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        assert main(["calibrate", str(model), "--rollback", "--daemon-user", "no-such-user-here"]) == 2
    assert "no-such-user-here: no such user" in caplog.text
