"""`linewatch eval` on a real ONNX bundle (map = |grey - 128| / 127) and tiny generated MVTec-layout folders,
where the right answer is known (perfect separation) or computed independently (scikit-learn, brute-force PRO)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime
import pytest
from sklearn.metrics import roc_auc_score

from linewatch import bundle
from linewatch.errors import DataError
from linewatch.evaluation.evaluate import evaluate_scorer
from linewatch.evaluation.overlay import overlay
from linewatch.line.engine import Engine
from tests.test_metrics import brute_force_pro_auc

ROOT = Path(__file__).resolve().parents[1]


def make_category(root: Path, size: int = 64, noise: int = 0, defect_offset: int = 127, seed: int = 0) -> Path:
    """Mid-grey parts (± noise) with brighter square defects at even coordinates, 3 good + 2 per defect type."""
    rng = np.random.default_rng(seed)

    def part():
        return np.clip(128 + rng.integers(-noise, noise + 1, (size, size)), 0, 255).astype(np.uint8)

    def save(path, img):
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), img)

    for i in range(3):
        save(root / "train" / "good" / f"{i:03d}.png", part())
        save(root / "test" / "good" / f"{i:03d}.png", part())
    for kind, side in (("big", size // 4), ("small", size // 16)):
        for i in range(2):
            img, mask = part(), np.zeros((size, size), np.uint8)
            y, x = 2 * rng.integers(0, (size - side) // 2, 2)
            mask[y : y + side, x : x + side] = 255
            if kind == "big":  # a second region, so PRO averages over several regions
                mask[2:4, 2:6] = 255
            img = np.where(mask > 0, np.clip(img.astype(int) + defect_offset, 0, 255), img).astype(np.uint8)
            save(root / "test" / kind / f"{i:03d}.png", img)
            save(root / "ground_truth" / kind / f"{i:03d}_mask.png", mask)
    return root


class RawOnnxScorer:
    """The Scorer protocol straight on onnxruntime, independent of linewatch.line.engine."""

    def __init__(self, bundle_dir: Path):
        meta = bundle.read_metadata(bundle_dir)
        self.input_size = (meta["input"]["height"], meta["input"]["width"])
        self.session = onnxruntime.InferenceSession(str(bundle_dir / bundle.GRAPH), providers=["CPUExecutionProvider"])

    def score(self, frames):
        maps, scores = self.session.run([bundle.OUTPUT_MAP, bundle.OUTPUT_SCORE], {bundle.INPUT_NAME: frames})
        return maps, scores


def independent_metrics(cat: Path, types: list[str]) -> dict:
    """Maps recomputed from the files with numpy (|grey - 128| / 127), metrics by scikit-learn and brute force."""

    def load(p):
        return cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)

    good = sorted((cat / "test" / "good").glob("*.png"))
    rows = [(load(p), np.zeros(load(p).shape, bool), 0) for p in good]
    for t in types:
        for p in sorted((cat / "test" / t).glob("*.png")):
            rows.append((load(p), load(cat / "ground_truth" / t / f"{p.stem}_mask.png") > 127, 1))
    maps = np.stack([np.abs(img.astype(np.float32) - 128) / 127 for img, _, _ in rows])
    masks = np.stack([m for _, m, _ in rows])
    labels = np.array([lab for _, _, lab in rows])
    return {
        "pixel_roc_auc": roc_auc_score(masks.ravel(), maps.ravel()),
        "pro_auc": brute_force_pro_auc(maps, masks, 0.3),
        "image_roc_auc": roc_auc_score(labels, maps.max(axis=(1, 2))),
    }


@pytest.mark.integration
def test_perfect_separation_gives_one(tmp_path, deviation_bundle):
    cat = make_category(tmp_path / "cat")
    result = evaluate_scorer(Engine(deviation_bundle), cat, batch=4)
    assert set(result["per_type"]) == {"big", "small"}
    for m in [result["overall"], *result["per_type"].values()]:
        assert m["pixel_roc_auc"] == 1.0
        assert m["pro_auc"] == pytest.approx(1.0)
        assert m["image_roc_auc"] == 1.0
    assert result["overall"]["n_defect"] == 4 and result["overall"]["n_good"] == 3
    assert result["per_type"]["big"]["n_defect"] == 2 and result["per_type"]["big"]["n_good"] == 3


@pytest.mark.integration
def test_larger_images_are_resized_to_the_model_and_masks_follow(tmp_path, deviation_bundle):
    cat = make_category(tmp_path / "cat", size=128)  # 2× the bundle's 64 px, defects on even pixels
    result = evaluate_scorer(RawOnnxScorer(deviation_bundle), cat)
    assert result["input_size"] == [64, 64]
    assert result["overall"]["pixel_roc_auc"] == 1.0
    assert result["overall"]["pro_auc"] == pytest.approx(1.0)


@pytest.mark.integration
@pytest.mark.parametrize("seed", [0, 1])
def test_partial_separation_matches_independent_computation(tmp_path, deviation_bundle, seed):
    # noisy parts with faint defects: good noise overlaps the defect level, so no metric is 1
    cat = make_category(tmp_path / "cat", noise=40, defect_offset=30, seed=seed)
    result = evaluate_scorer(RawOnnxScorer(deviation_bundle), cat, batch=3)
    for name, types in [("overall", ["big", "small"]), ("big", ["big"]), ("small", ["small"])]:
        got = result["overall"] if name == "overall" else result["per_type"][name]
        want = independent_metrics(cat, types)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-6), (name, key)
    assert all(0.3 < result["overall"][key] < 0.9 for key in ("pixel_roc_auc", "pro_auc"))


@pytest.mark.integration
def test_empty_masks_are_an_error(tmp_path, deviation_bundle):
    cat = make_category(tmp_path / "cat")
    for p in (cat / "ground_truth" / "small").iterdir():
        cv2.imwrite(str(p), np.zeros((64, 64), np.uint8))
    with pytest.raises(DataError, match="'small'.*empty"):
        evaluate_scorer(RawOnnxScorer(deviation_bundle), cat)


@pytest.mark.unit
def test_overlay_colours_defects_and_draws_contours():
    image = np.full((32, 32, 3), 128, np.uint8)
    amap = np.zeros((32, 32), np.float32)
    amap[8:16, 8:16] = 1.0
    mask = amap > 0
    out = overlay(image, amap, 0.1, 1.0, mask=mask, threshold=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (out[20:, 20:] == 128).all()  # below vmin: image untouched
    assert tuple(out[12, 12]) != (128, 128, 128)  # inside: coloured
    assert tuple(out[8, 12]) == (0, 255, 0)  # ground-truth outline drawn last, in green
    small = overlay(image, cv2.resize(amap, (16, 16), interpolation=cv2.INTER_NEAREST), 0.1, 1.0)
    assert small.shape == image.shape  # map resized to the image


@pytest.mark.e2e
def test_cli_eval_writes_json_and_overlays(tmp_path, deviation_bundle):
    cat = make_category(tmp_path / "cat")
    out_json, out_dir = tmp_path / "m.json", tmp_path / "overlays"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "linewatch.cli",
            "eval",
            str(deviation_bundle),
            "--data",
            str(cat),
            "--json",
            str(out_json),
            "--overlays",
            str(out_dir),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out_json.read_text())
    assert result["backend"] == "onnx"  # auto: the bundle has a graph
    assert result["overall"]["pixel_roc_auc"] == 1.0
    assert "overall" in proc.stderr and "big" in proc.stderr and "PRO" in proc.stderr
    written = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*.png"))
    assert written == [
        "big/000.png",
        "big/001.png",
        "good/000.png",
        "good/001.png",
        "good/002.png",
        "grid.png",
        "small/000.png",
        "small/001.png",
    ]
    assert cv2.imread(str(out_dir / "big" / "000.png")).shape == (256, 256, 3)  # 64 px model, enlarged to view

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "linewatch.cli",
            "eval",
            str(deviation_bundle),
            "--data",
            str(tmp_path / "missing"),
            "--json",
            "-",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 4 and "not found" in proc.stderr and proc.stdout == ""
