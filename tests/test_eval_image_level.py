"""`linewatch eval` on an image-level set (test/good and test/<type>, no ground_truth/): image ROC-AUC checked
against scikit-learn on scores computed independently from the pixels, verdicts at the calibrated thresholds by
the daemon's rule (a planted false reject and a planted escape), the plots, and pixel metrics reported as n/a."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from linewatch.errors import BundleError
from linewatch.evaluation.datasets import is_image_level, read_test_set
from linewatch.evaluation.evaluate import eval_calibration
from tests.helpers import calibrated_bundle, grey, with_white_square

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def with_square(level: int, side: int = 8) -> np.ndarray:
    img = grey(128)
    img[20 : 20 + side, 20 : 20 + side] = level
    return img


def image_level_set(root: Path) -> dict[str, list[np.ndarray]]:
    """OK/NOK photos, no masks. The deviation bundle scores max|grey-128|/127: a good part with a white speck of
    9 px is a false reject (threshold 0.5), a dent of grey 170 (0.33) an escape."""
    rng = np.random.default_rng(0)
    sets = {
        "good": [np.clip(grey(128).astype(int) + rng.integers(-20, 21), 0, 255).astype(np.uint8) for _ in range(5)]
        + [with_square(255, 3)],
        "dent": [with_square(255, 8), with_square(0, 8), with_square(170, 8)],
        "scratch": [with_white_square(), with_square(250, 4)],
    }
    for kind, images in sets.items():
        folder = root / "test" / kind
        folder.mkdir(parents=True)
        for i, img in enumerate(images):
            assert cv2.imwrite(str(folder / f"{i:03d}.png"), img)
    return sets


def run_eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "linewatch.cli", "eval", *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_image_level_set_reports_auc_and_the_daemon_verdicts_at_the_calibration(tmp_path):
    bundle_dir = calibrated_bundle(tmp_path / "bundle")  # pixel threshold 0.5, min_defect_area 0
    sets = image_level_set(tmp_path / "cat")
    assert is_image_level(read_test_set(tmp_path / "cat"))
    out_json, plots = tmp_path / "m.json", tmp_path / "plots"
    proc = run_eval(str(bundle_dir), "--data", str(tmp_path / "cat"), "--json", str(out_json), "--plots", str(plots))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out_json.read_text())
    assert result["level"] == "image"
    assert result["overall"]["pixel_roc_auc"] is None and result["overall"]["pro_auc"] is None
    assert "n/a" in proc.stderr and "image-level" in proc.stderr

    def score(img: np.ndarray) -> float:  # independent of the graph: the bundle's formula on the pixels
        return float(np.abs(img.astype(np.float64).mean(axis=2) - 128).max() / 127)

    good = [score(i) for i in sets["good"]]
    for kind in ("dent", "scratch"):
        bad = [score(i) for i in sets[kind]]
        expected = roc_auc_score([0] * len(good) + [1] * len(bad), good + bad)
        assert result["per_type"][kind]["image_roc_auc"] == pytest.approx(expected, abs=1e-6)
    everything = [score(i) for i in sets["dent"] + sets["scratch"]]
    expected = roc_auc_score([0] * len(good) + [1] * len(everything), good + everything)
    assert result["overall"]["image_roc_auc"] == pytest.approx(expected, abs=1e-6)
    assert result["overall"]["image_roc_auc"] < 1.0  # the speck and the faint dent overlap

    v = result["verdicts"]
    assert v["calibration_version"] == 1 and v["pixel_threshold"] == 0.5
    assert (v["n_good"], v["false_rejects"], v["n_defect"], v["escapes"]) == (6, 1, 5, 1)
    assert v["per_type"] == {
        "dent": {"images": 3, "nok": 2, "escapes": 1},
        "scratch": {"images": 2, "nok": 2, "escapes": 0},
    }
    assert "false rejects 1 of 6 good" in proc.stderr and "escapes 1 of 5 defective" in proc.stderr
    for name in ("scores.png", "roc.png"):
        picture = cv2.imread(str(plots / name))
        assert picture is not None and picture.shape[0] > 200 and picture.std() > 10  # a drawn plot, not blank


def test_calibration_choice_uncalibrated_given_file_and_a_foreign_graph(tmp_path, deviation_bundle):
    sets_root = tmp_path / "cat"
    image_level_set(sets_root)
    # an uncalibrated bundle: AUC only, no verdicts
    proc = run_eval(str(deviation_bundle), "--data", str(sets_root), "--json", "-")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["verdicts"] is None
    # a calibration file given explicitly is used for the bundle it was made for
    calibrated = calibrated_bundle(tmp_path / "calibrated")
    copy = tmp_path / "kept_calibration.json"
    shutil.copy(calibrated / "calibration.json", copy)
    cal = eval_calibration(deviation_bundle, str(copy), "onnx", "fp32")  # same graph bytes: same sha256
    assert cal is not None and cal.pixel_threshold == 0.5
    # ... and refused for another graph, naming the file
    other = calibrated_bundle(tmp_path / "other", size=32)
    with pytest.raises(BundleError, match="kept_calibration.json"):
        eval_calibration(other, str(copy), "onnx", "fp32")
    with pytest.raises(BundleError, match="--backend onnx"):
        eval_calibration(deviation_bundle, str(copy), "torch", "fp32")


def test_a_partial_ground_truth_still_needs_every_mask(tmp_path):
    """ground_truth/ present: pixel-level, and a missing mask is still an error (never silently image-level)."""
    image_level_set(tmp_path / "cat")
    (tmp_path / "cat" / "ground_truth" / "dent").mkdir(parents=True)
    from linewatch.errors import DataError

    with pytest.raises(DataError, match="no ground-truth mask"):
        read_test_set(tmp_path / "cat")
