"""Issue 13, the command: part-level calibration (the rate the line feels), carried-over settings, contamination,
rollback --to and the old-vs-new table, on the real deviation ONNX bundle (map = |grey - 128| / 127) with generated
parts (the maths: test_calibration_part_maths.py)."""

from __future__ import annotations

import json
import logging
import shutil

import cv2
import numpy as np
import pytest

from linewatch import bundle
from linewatch.calibrate.store import Calibration, load_calibration, rollback, write_calibration
from linewatch.cli import main
from linewatch.errors import BundleError
from linewatch.line.verdict import judge
from linewatch.protocol.wire import Verdict
from tests.test_calibrate_cli import SIZE, good_part, write_defects, write_good


def nok(amap: np.ndarray, t: float, area: int) -> bool:
    cal = Calibration(version=1, model_sha256="0" * 64, pixel_threshold=float(t), min_defect_area=area)
    return judge(amap, float(amap.max()), cal).verdict == Verdict.NOK


# --- the command ------------------------------------------------------------------------------------------------


@pytest.fixture
def model(deviation_bundle, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(deviation_bundle, dst)
    return dst


def calibrate(model, *argv: str) -> int:
    return main(["calibrate", str(model), *argv])


def deviation_maps(folder, names):
    grey = [cv2.imread(str(folder / n)).astype(np.float32).mean(axis=2, dtype=np.float32) for n in names]
    return np.stack([np.abs(g - np.float32(128)) / np.float32(127) for g in grey])


@pytest.mark.integration
def test_reject_rate_mode_bounds_the_share_of_good_parts_the_daemon_rejects(model, tmp_path):
    """Item 0: --fpr alone rejects most good parts at a small area; --reject-rate holds the part rate, reports it
    on held-out parts with its bound, and the escape rate with --defects."""
    good = write_good(tmp_path / "good", 60, seed=21)
    defects = write_defects(tmp_path / "defects", 6, seed=22)
    out = tmp_path / "r.json"
    assert (
        calibrate(
            model,
            "--good",
            str(good),
            "--reject-rate",
            "0.05",
            "--min-defect-area",
            "3",
            "--json",
            str(out),
            "--defects",
            str(defects),
        )
        == 0
    )
    result = json.loads(out.read_text())
    cal = load_calibration(model)
    assert (cal.mode, cal.reject_rate_target, cal.fpr_target, cal.min_defect_area) == ("reject_rate", 0.05, None, 3)
    calib = deviation_maps(good, result["calibration_split"]["images"])
    fails = [nok(m, cal.pixel_threshold, 3) for m in calib]
    assert sum(fails) <= int(0.05 * len(calib)) and result["calibration_split"]["part_reject_rate"] == np.mean(fails)
    held = deviation_maps(good, result["holdout_images"])
    rate = cal.holdout_part_reject_rate
    assert rate["rate"] == np.mean([nok(m, cal.pixel_threshold, 3) for m in held]) and rate["n_effective"] == 18
    assert rate["lower"] <= rate["rate"] <= rate["upper"] < 1
    assert result["defects"]["escape_rate"] == 0.0
    md = (model / "calibration_report" / "report.md").read_text()
    assert "| part reject rate | 0.05 |" in md and "escape rate" in md

    # the same parts at a pixel FPR: the part reject rate it leads to is reported too (and is far higher)
    assert calibrate(model, "--good", str(good), "--fpr", "0.03", "--json", str(out), "--force") == 0
    pixel = load_calibration(model)
    assert pixel.mode == "fpr" and pixel.min_defect_area == 3  # carried over
    assert pixel.holdout_part_reject_rate["rate"] > 0.5


@pytest.mark.integration
def test_too_few_parts_for_the_reject_rate_is_refused_with_the_numbers(model, tmp_path, caplog):
    good = write_good(tmp_path / "good", 30, seed=23)
    with caplog.at_level(logging.ERROR):
        assert calibrate(model, "--good", str(good)) == 2  # the default: --reject-rate 0.02
    assert "part reject rate of 0.02: it needs at least 50 calibration parts" in caplog.text
    assert "got 21" in caplog.text and not (model / bundle.CALIBRATION).exists()


@pytest.mark.integration
def test_settings_not_given_are_carried_over_and_a_first_area_is_derived_never_zero(model, tmp_path, caplog):
    """Item 1: `calibrate MODEL --good DIR --fpr R` used to reset the min area to 0 (every speck fails a part)."""
    good = write_good(tmp_path / "good", 40, seed=24)
    with caplog.at_level(logging.INFO, logger="linewatch.calibrate.command"):
        assert calibrate(model, "--good", str(good), "--fpr", "0.01") == 0
    first = load_calibration(model)
    assert first.min_defect_area >= 2 and first.settings["origin"]["min_defect_area"].startswith("derived: ")
    assert "derived: the smallest area" in caplog.text
    # derived so that at most 2 % of the calibration parts fail at this threshold (here: none of 28)
    calib = deviation_maps(good, sorted(p.name for p in good.iterdir()))
    assert first.holdout_part_reject_rate is not None

    assert (
        calibrate(
            model,
            "--good",
            str(good),
            "--fpr",
            "0.01",
            "--min-defect-area",
            "12",
            "--holdout",
            "0.25",
            "--image-fpr",
            "0.05",
        )
        == 0
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="linewatch.calibrate.command"):
        assert calibrate(model, "--good", str(good)) == 0
    third = load_calibration(model)
    assert (third.mode, third.fpr_target, third.min_defect_area, third.image_fpr_target) == ("fpr", 0.01, 12, 0.05)
    assert third.settings["holdout"] == 0.25 and third.n_holdout == 10
    assert third.settings["origin"] == {
        "mode": "carried over from v2",
        "min_defect_area": "carried over from v2",
        "image_fpr": "carried over from v2",
        "holdout": "carried over from v2",
    }
    assert caplog.text.count("carried over from v2") >= 4
    good_parts = [nok(m, third.pixel_threshold, third.min_defect_area) for m in calib]
    assert np.mean(good_parts) < 0.5


@pytest.mark.integration
def test_an_old_calibration_file_loads_and_its_settings_carry_over(model, tmp_path):
    good = write_good(tmp_path / "good", 40, seed=25)
    old = {  # written by linewatch before issue 13: no mode, no part rates, no scores
        "schema": "linewatch-calibration",
        "schema_version": 1,
        "version": 4,
        "created": "2026-01-01T00:00:00+00:00",
        "model_sha256": bundle.read_metadata(model)["graph"]["sha256"],
        "pixel_threshold": 0.3,
        "image_threshold": None,
        "min_defect_area": 9,
        "fpr_target": 0.02,
        "image_fpr_target": None,
        "settings": {"holdout": 0.3, "input_size": [SIZE, SIZE]},
    }
    (model / bundle.CALIBRATION).write_text(json.dumps(old))
    cal = load_calibration(model)
    assert cal.effective_mode == "fpr" and cal.mode is None and cal.good_image_scores is None
    assert calibrate(model, "--good", str(good)) == 0
    new = load_calibration(model)
    assert (new.version, new.mode, new.fpr_target, new.min_defect_area) == (5, "fpr", 0.02, 9)


def write_stream(folder, n, defective, seed):
    """Camera frames: good parts, `defective` of them with a bright disc (map ~0.96 where good noise is < 0.5)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    bad = set(rng.choice(n, defective, replace=False).tolist())
    for i in range(n):
        img = good_part(rng)
        if i in bad:
            cv2.circle(img, (int(rng.integers(12, 52)), int(rng.integers(12, 52))), 5, (250, 250, 250), -1)
        cv2.imwrite(str(folder / f"frame_{i:03d}.png"), img)
    return folder, sorted(bad)


@pytest.mark.integration
def test_defective_frames_in_a_camera_calibration_are_excluded_and_cannot_raise_the_threshold(model, tmp_path, caplog):
    """Item 2: 30 % defective frames used to move the threshold above the defects, which then passed OK."""
    clean, _ = write_stream(tmp_path / "clean", 40, 0, seed=31)
    assert calibrate(model, "--good", str(clean), "--fpr", "0.005", "--min-defect-area", "5") == 0
    v1 = load_calibration(model)
    dirty, bad = write_stream(tmp_path / "dirty", 40, 12, seed=32)
    config = tmp_path / "line1.yaml"
    config.write_text(
        f"model: {{bundle: {model}}}\ncameras:\n  - {{name: cam1, kind: folder, source: {dirty}, loop: false}}\n"
    )
    out = tmp_path / "r.json"
    with caplog.at_level(logging.INFO, logger="linewatch.calibrate.command"):
        assert calibrate(model, "--camera", "cam1", "--frames", "40", "--config", str(config), "--json", str(out)) == 0
    result = json.loads(out.read_text())
    v2 = load_calibration(model)
    for i in bad:  # every defective frame of the stream is still judged NOK by the new calibration
        defect = cv2.imread(str(dirty / f"frame_{i:03d}.png"))
        amap = np.abs(defect.astype(np.float32).mean(axis=2) - 128) / 127
        assert judge(amap, float(amap.max()), v2).verdict == Verdict.NOK, (i, v1.pixel_threshold, v2.pixel_threshold)
    assert v2.pixel_threshold <= 1.5 * v1.pixel_threshold
    assert sorted(int(e["image"].split("_")[1]) for e in result["excluded"]) == bad
    assert all(e["score"] > 0.9 and "robust z" in e["why"] for e in result["excluded"])
    assert v2.excluded == result["excluded"] and v2.n_samples + v2.n_holdout == 28
    assert f"excluded cam1_{bad[0]:05d}" in caplog.text
    md = (model / "calibration_report" / "report.md").read_text()
    assert "## Excluded images" in md and f"cam1_{bad[0]:05d}" in md
    # item 4 on the way: old vs new side by side, how to apply it, who can read it
    assert "active (v1)" in caplog.text and f"{v1.pixel_threshold:.6g}" in caplog.text
    assert "sudo systemctl reload linewatch@line1" in caplog.text and "## Active vs new" in md
    assert "sudo systemctl reload linewatch@line1" in md and result["readable"] in md


@pytest.mark.integration
def test_a_threshold_jump_is_refused_without_force(model, tmp_path, caplog):
    """Item 2: a stream that is defective throughout (or a changed line) must not silently lift the threshold."""
    assert (
        calibrate(
            model,
            "--good",
            str(write_good(tmp_path / "quiet", 40, seed=33, scale=6.0)),
            "--fpr",
            "0.01",
            "--min-defect-area",
            "5",
        )
        == 0
    )
    v1 = load_calibration(model)
    loud = write_good(tmp_path / "loud", 40, seed=34, scale=20.0)
    with caplog.at_level(logging.ERROR):
        assert calibrate(model, "--good", str(loud)) == 4
    assert "above the 1.5x" in caplog.text and "--force" in caplog.text and f"{v1.pixel_threshold:.6g}" in caplog.text
    assert load_calibration(model) == v1
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert calibrate(model, "--good", str(loud), "--force") == 0
    assert load_calibration(model).pixel_threshold > 1.5 * v1.pixel_threshold and "(--force)" in caplog.text


@pytest.mark.integration
def test_rollback_to_any_version_of_the_same_graph(model, caplog):
    """Item 3: after v1, v2 and a rollback (v3 = v1), v2 could not be reached any more."""
    write_calibration(model, 0.1)
    write_calibration(model, 0.2)
    assert rollback(model).pixel_threshold == 0.1
    with pytest.raises(
        BundleError,
        match=r"no earlier calibration.*versions in the history for this graph: 1, 2 "
        r"\(restore one with --rollback --to N\)",
    ):
        rollback(model)
    with caplog.at_level(logging.INFO):
        assert main(["calibrate", str(model), "--rollback", "--to", "2"]) == 0
    back = load_calibration(model)
    assert (back.version, back.pixel_threshold, back.restored_version, back.rolled_back_from) == (4, 0.2, 2, 3)
    assert "systemctl reload linewatch@NAME" in caplog.text
    with pytest.raises(BundleError, match="version 9.*missing; versions in the history for this graph: 1, 2, 3"):
        rollback(model, to=9)
    with pytest.raises(BundleError, match="version 4: it is the active calibration"):
        rollback(model, to=4)


@pytest.mark.integration
def test_rollback_to_a_version_of_another_graph_is_refused_naming_the_ones_there(model, caplog):
    from tests.bundles import make_deviation_bundle

    write_calibration(model, 0.1)
    make_deviation_bundle(model, 32, 32)  # re-exported: a different graph
    write_calibration(model, 0.2)
    write_calibration(model, 0.3)
    with caplog.at_level(logging.ERROR):
        assert main(["calibrate", str(model), "--rollback", "--to", "1"]) == 3
    assert "calibrated for model" in caplog.text and "versions in the history for this graph: 2" in caplog.text
    with caplog.at_level(logging.ERROR):
        assert main(["calibrate", str(model), "--to", "1"]) == 2
    assert "--to N goes with --rollback" in caplog.text


@pytest.mark.integration
def test_recalibration_shows_old_and_new_side_by_side_and_how_to_apply_it(model, tmp_path, caplog):
    """Item 4: thresholds and settings old vs new, the reload reminder and who can read the file."""
    good = write_good(tmp_path / "good", 30, seed=41)
    assert calibrate(model, "--good", str(good), "--fpr", "0.01", "--min-defect-area", "4") == 0
    v1 = load_calibration(model)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="linewatch.calibrate.command"):
        assert (
            calibrate(model, "--good", str(good), "--fpr", "0.05", "--min-defect-area", "4", "--daemon-user", "nobody")
            == 0
        )
    v2 = load_calibration(model)
    rows = {line.split("  ")[0]: line for line in caplog.text.splitlines()}
    assert "active (v1)" in rows["setting"] and "new" in rows["setting"]
    assert (
        f"{v1.pixel_threshold:.6g}" in rows["pixel threshold"]
        and f"{v2.pixel_threshold:.6g}" in rows["pixel threshold"]
    )
    assert "pixel FPR 0.01" in rows["target"] and "pixel FPR 0.05" in rows["target"] and "given" in rows["target"]
    assert "sudo systemctl reload linewatch@NAME" in caplog.text
    assert "the daemon's user nobody" in caplog.text  # can or cannot read it, depending on this machine's folders
    md = (model / "calibration_report" / "report.md").read_text()
    assert (
        "## Active vs new" in md and "sudo systemctl reload linewatch@NAME" in md and "the daemon's user nobody" in md
    )
