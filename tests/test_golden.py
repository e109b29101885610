"""Golden-sample verification (linewatch/verify.py): `linewatch verify` as a subprocess on a good and a bad golden
set, the layout rules, and `linewatch calibrate --golden` refusing a calibration that fails its set unless forced.
Real bundles (tests/bundles.py: map = |grey - 128| / 127), real image files, real ONNX Runtime."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from linewatch.calibrate import load_calibration
from linewatch.calibrate.store import write_calibration
from linewatch.cli import main
from linewatch.errors import DataError
from linewatch.verify import golden_items
from tests.helpers import grey, with_white_square

ROOT = Path(__file__).resolve().parents[1]


def write_golden(root: Path, good: dict[str, np.ndarray], defect: dict[str, np.ndarray]) -> Path:
    for kind, images in (("good", good), ("defect", defect)):
        (root / kind).mkdir(parents=True, exist_ok=True)
        for name, img in images.items():
            assert cv2.imwrite(str(root / kind / name), img)
    return root


@pytest.fixture
def model(deviation_bundle, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(deviation_bundle, dst)
    write_calibration(dst, 0.5, min_defect_area=4)
    return dst


def verify(model: Path, golden: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "linewatch.cli", "verify", str(model), "--golden", str(golden), "--json", "-"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.e2e
def test_verify_passes_a_good_golden_set_and_fails_a_bad_one_naming_each_wrong_part(model, tmp_path):
    good_set = write_golden(
        tmp_path / "golden_ok",
        {"plain.png": grey(), "plain_too.png": grey(126)},
        {"square.png": with_white_square(), "dark_square.png": 255 - with_white_square()},
    )
    ok = verify(model, good_set)
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["passed"] is True and report["failed"] == []
    assert report["good"] == {"ok": 2, "total": 2} and report["defect"] == {"nok": 2, "total": 2}
    assert report["calibration_version"] == 1 and report["recipe"] == "default"
    assert "PASSED" in ok.stderr

    bad_set = write_golden(
        tmp_path / "golden_bad",
        {"plain.png": grey(), "really_a_defect.png": with_white_square()},
        {"square.png": with_white_square(), "really_good.png": grey()},
    )
    (bad_set / "defect" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    bad = verify(model, bad_set)
    assert bad.returncode == 1, bad.stderr
    report = json.loads(bad.stdout)
    assert report["passed"] is False
    failed = {Path(f["image"]).name: f for f in report["failed"]}
    assert set(failed) == {"really_a_defect.png", "really_good.png", "truncated.png"}
    assert failed["really_a_defect.png"]["expected"] == "OK" and failed["really_a_defect.png"]["verdict"] == "NOK"
    assert failed["really_good.png"]["expected"] == "NOK" and failed["really_good.png"]["verdict"] == "OK"
    assert failed["truncated.png"]["verdict"] == "ERROR" and "cannot read" in failed["truncated.png"]["reason"]
    assert "FAILED" in bad.stderr and "really_good.png: expected NOK, got OK" in bad.stderr

    uncalibrated = tmp_path / "uncalibrated"
    shutil.copytree(model, uncalibrated)
    (uncalibrated / "calibration.json").unlink()
    none = verify(uncalibrated, good_set)  # nothing judged: every part ERROR, never a pass
    assert none.returncode == 1 and "uncalibrated" in none.stderr


@pytest.mark.unit
def test_a_golden_set_needs_good_and_defective_parts_and_may_hold_camera_folders(tmp_path):
    with pytest.raises(DataError, match="golden set not found"):
        golden_items(tmp_path / "nowhere")
    only_good = write_golden(tmp_path / "only_good", {"a.png": grey()}, {})
    with pytest.raises(DataError, match="no defect images"):
        golden_items(only_good)
    root = write_golden(tmp_path / "set", {"a.png": grey()}, {})
    write_golden(root / "cam1", {}, {"b.png": with_white_square()})
    write_golden(root / "cam9", {"c.png": grey()}, {"d.png": with_white_square()})
    items = golden_items(root, ["cam1", "cam2"])  # cam9 is no camera of this daemon: left out (warned)
    assert [(i.camera, i.kind, i.path.name) for i in items] == [(None, "good", "a.png"), ("cam1", "defect", "b.png")]
    assert len(golden_items(root)) == 4


def write_good(folder: Path, n: int, seed: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = np.clip(np.rint(128 + rng.laplace(0.0, 14.0, (64, 64, 3))), 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"good_{i:03d}.png"), img)
    return folder


@pytest.mark.integration
def test_calibrate_refuses_a_calibration_that_fails_its_golden_set_unless_forced(model, tmp_path):
    good = write_good(tmp_path / "fresh_good", 20, seed=3)
    passing = write_golden(tmp_path / "golden_ok", {"plain.png": grey()}, {"square.png": with_white_square()})
    failing = write_golden(tmp_path / "golden_bad", {"plain.png": grey()}, {"not_a_defect.png": grey()})
    args = ["calibrate", str(model), "--good", str(good), "--fpr", "0.01", "--report", str(tmp_path / "r")]

    assert main([*args, "--golden", str(failing)]) == 1
    assert load_calibration(model).version == 1  # refused: the active calibration stays

    assert main([*args, "--golden", str(passing)]) == 0
    assert load_calibration(model).version == 2
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["golden"]["passed"] is True and report["golden"]["defect"] == {"nok": 1, "total": 1}

    assert main([*args, "--golden", str(failing), "--force"]) == 0  # forced: written, the failure reported
    assert load_calibration(model).version == 3
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["golden"]["passed"] is False
    assert [Path(f["image"]).name for f in report["golden"]["failed"]] == ["not_a_defect.png"]
