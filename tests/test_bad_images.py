"""A folder with several unusable images is reported in full, in one run, before any long work starts: by
`linewatch train` (before feature extraction), `linewatch eval` and `linewatch calibrate`, as real subprocesses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from linewatch.errors import EXIT_CODES
from tests.helpers import write_bad_images

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
DATA_ERROR = next(code for code, text in EXIT_CODES.items() if "data" in text)


def linewatch(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "linewatch.cli", *args],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def good_parts(folder: Path, n: int = 6, size: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        assert cv2.imwrite(str(folder / f"part{i:02d}.png"), rng.integers(100, 156, (size, size, 3), np.uint8))
    return folder


def assert_names_all(proc: subprocess.CompletedProcess, bad: list[Path]) -> None:
    assert proc.returncode == DATA_ERROR, proc.stderr[-3000:]
    assert f"{len(bad)} of" in proc.stderr and "cannot be used" in proc.stderr, proc.stderr[-3000:]
    for path in bad:
        assert str(path) in proc.stderr, (path, proc.stderr[-3000:])


def test_train_names_every_bad_image_before_extracting_features(tmp_path):
    data = good_parts(tmp_path / "good")
    bad = write_bad_images(data)
    out = tmp_path / "model"
    started = time.monotonic()
    proc = linewatch(
        "train", "--data", str(data), "--out", str(out), "--random-init", "--size", "64", "--layers", "1:2"
    )
    assert_names_all(proc, bad)
    assert "features" not in proc.stderr and "feature scale" not in proc.stderr  # extraction never began
    assert not out.exists() or not any(out.iterdir())
    assert time.monotonic() - started < 60


def test_eval_names_every_bad_image_and_mask(tmp_path, deviation_bundle):
    from tests.test_evaluate import make_category

    cat = make_category(tmp_path / "cat")
    bad = write_bad_images(cat / "test" / "good")
    mask = cat / "ground_truth" / "big" / "000_mask.png"
    mask.write_bytes(mask.read_bytes()[:40])  # a mask cut short
    proc = linewatch("eval", str(deviation_bundle), "--data", str(cat), "--backend", "onnx")
    assert_names_all(proc, [*bad, mask])


def test_calibrate_names_every_bad_good_image(tmp_path, deviation_bundle):
    model = tmp_path / "model"
    shutil.copytree(deviation_bundle, model)
    data = good_parts(tmp_path / "fresh", n=8)
    bad = write_bad_images(data)
    proc = linewatch("calibrate", str(model), "--good", str(data))
    assert_names_all(proc, bad)
