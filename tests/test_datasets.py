"""MVTec layout reader: samples, masks, and clear errors for broken layouts."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from linewatch.errors import DataError
from linewatch.evaluation.datasets import GOOD, good_image_folder, read_test_set

pytestmark = pytest.mark.unit


def write(path: Path, value: int = 128, size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((size, size), value, np.uint8))
    return path


def make_category(root: Path) -> Path:
    for i in range(3):
        write(root / "train" / "good" / f"{i:03d}.png")
    for i in range(2):
        write(root / "test" / "good" / f"{i:03d}.png")
    for kind in ("scratch", "hole"):
        for i in range(2):
            write(root / "test" / kind / f"{i:03d}.png")
            write(root / "ground_truth" / kind / f"{i:03d}_mask.png", 255)
    return root


def test_reads_good_and_defect_samples_with_their_masks(tmp_path):
    cat = make_category(tmp_path / "cat")
    samples = read_test_set(cat)
    assert [(s.defect_type, s.path.name) for s in samples] == [
        ("good", "000.png"),
        ("good", "001.png"),
        ("hole", "000.png"),
        ("hole", "001.png"),
        ("scratch", "000.png"),
        ("scratch", "001.png"),
    ]
    for s in samples:
        if s.defect_type == GOOD:
            assert s.mask_path is None and not s.is_anomalous
        else:
            assert s.is_anomalous
            assert s.mask_path == cat / "ground_truth" / s.defect_type / f"{s.path.stem}_mask.png"


def test_defect_image_without_mask_is_an_error(tmp_path):
    cat = make_category(tmp_path / "cat")
    (cat / "ground_truth" / "hole" / "001_mask.png").unlink()
    with pytest.raises(DataError, match=r"hole/001\.png has no ground-truth mask.*001_mask\.png"):
        read_test_set(cat)


@pytest.mark.parametrize(
    "broken, message",
    [
        ("test", "no test/ folder"),
        ("test/good", "no good test images"),
    ],
)
def test_missing_folders_are_errors(tmp_path, broken, message):
    import shutil

    cat = make_category(tmp_path / "cat")
    shutil.rmtree(cat / broken)
    with pytest.raises(DataError, match=message):
        read_test_set(cat)


def test_empty_sets_are_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_test_set(tmp_path / "nope")
    cat = make_category(tmp_path / "cat")
    for p in (cat / "test" / "hole").iterdir():
        p.unlink()
    with pytest.raises(DataError, match="no images"):
        read_test_set(cat)
    only_good = tmp_path / "only_good"
    write(only_good / "test" / "good" / "a.png")
    (only_good / "ground_truth").mkdir()
    with pytest.raises(DataError, match="no defect types"):
        read_test_set(only_good)


def test_good_image_folder_accepts_plain_folder_or_category(tmp_path):
    cat = make_category(tmp_path / "cat")
    assert good_image_folder(cat) == cat / "train" / "good"
    plain = tmp_path / "plain"
    write(plain / "a.png")
    assert good_image_folder(plain) == plain
    with pytest.raises(DataError, match="no images"):
        good_image_folder(tmp_path / "cat" / "ground_truth")  # holds only folders
    import shutil

    shutil.rmtree(cat / "train")
    with pytest.raises(DataError, match="MVTec category but has no"):
        good_image_folder(cat)
    with pytest.raises(DataError, match="not found"):
        good_image_folder(tmp_path / "missing")
