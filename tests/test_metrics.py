"""Metrics against independent computations: scikit-learn's ROC-AUC and a brute-force PRO on tiny masks."""

from __future__ import annotations

import time

import numpy as np
import pytest
from skimage import measure
from sklearn.metrics import roc_auc_score

from linewatch.errors import DataError
from linewatch.evaluation.metrics import image_roc_auc, pixel_roc_auc, pro_auc, roc_auc

pytestmark = pytest.mark.unit


def brute_force_pro_auc(maps, masks, fpr_limit=0.3):
    """PRO-AUC from the definition: every distinct threshold, overlaps counted per region, clipped trapezoids."""
    regions = []
    for i, mask in enumerate(masks):
        lab = measure.label(mask, connectivity=2)
        regions += [(i, lab == k) for k in range(1, lab.max() + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        pred = maps >= t
        fpr = (pred & normal).sum() / normal.sum()
        pro = np.mean([(pred[i] & r).sum() / r.sum() for i, r in regions])
        points.append((float(fpr), float(pro)))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def random_masks(rng, n, h, w, blobs=3):
    masks = np.zeros((n, h, w), bool)
    for i in range(n):
        for _ in range(rng.integers(0, blobs + 1)):
            y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
            masks[i, y : y + rng.integers(1, 4), x : x + rng.integers(1, 4)] = True
    masks[0, 0, 0] = True  # at least one region
    return masks


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_equals_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(500) < 0.3
    scores = rng.integers(0, 6, 500) + 1.5 * labels * rng.random(500)  # many ties, partial separation
    scores = np.round(scores, 1)
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_roc_auc(scores, labels.astype(int)) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_roc_auc_extremes():
    labels = np.array([0, 0, 1, 1], bool)
    assert roc_auc(np.array([0.1, 0.2, 0.3, 0.4]), labels) == 1.0
    assert roc_auc(np.array([0.4, 0.3, 0.2, 0.1]), labels) == 0.0
    assert roc_auc(np.array([0.5, 0.5, 0.5, 0.5]), labels) == 0.5


@pytest.mark.parametrize("seed", range(3))
def test_pixel_roc_auc_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    masks = random_masks(rng, 4, 12, 16)
    maps = (rng.integers(0, 8, masks.shape) + 3 * masks * rng.random(masks.shape)).astype(np.float32)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_roc_auc(maps, masks) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_pro_auc_equals_brute_force(seed, limit):
    rng = np.random.default_rng(seed)
    masks = random_masks(rng, 3, 10, 12)
    maps = (rng.integers(0, 10, masks.shape) + 4 * masks * rng.random(masks.shape)).astype(np.float32)
    if seed % 2:
        maps = np.round(maps)  # heavy ties
    assert pro_auc(maps, masks, limit) == pytest.approx(brute_force_pro_auc(maps, masks, limit), abs=1e-9)


def test_pro_weighs_regions_not_pixels():
    # a big region found first and a 1-pixel region scored like the background: PRO at low FPR is 1/2, not 9/10
    masks = np.zeros((1, 10, 10), bool)
    masks[0, :3, :3] = True
    masks[0, 8, 8] = True
    maps = np.zeros((1, 10, 10), np.float32)
    maps[0, :3, :3] = 1.0
    assert pro_auc(maps, masks, 0.3) == pytest.approx(brute_force_pro_auc(maps, masks, 0.3))
    assert pro_auc(maps, masks, 0.3) < 0.6
    assert pixel_roc_auc(maps, masks) > 0.9


def test_diagonal_pixels_are_one_region():
    # 8-connectivity: a diagonal line is one region, so finding half of it gives PRO 0.5, not a mean over 4 regions
    masks = np.zeros((1, 8, 8), bool)
    idx = np.arange(4)
    masks[0, idx, idx] = True
    maps = np.zeros((1, 8, 8), np.float32)
    maps[0, 0, 0] = maps[0, 1, 1] = 1.0
    # threshold 1.0: pro 0.5 at fpr 0; then every other pixel at fpr 1 -> area to 0.3 = 0.5*0.3 + 0.5*0.3*0.3/2
    expected = (0.5 * 0.3 + 0.5 * 0.3 * 0.3 / 2) / 0.3
    assert pro_auc(maps, masks, 0.3) == pytest.approx(expected)
    assert brute_force_pro_auc(maps, masks, 0.3) == pytest.approx(expected)


def test_perfect_separation_scores_one():
    rng = np.random.default_rng(0)
    masks = random_masks(rng, 4, 16, 16)
    maps = np.where(masks, 1.0 + rng.random(masks.shape), rng.random(masks.shape)).astype(np.float32)
    assert pixel_roc_auc(maps, masks) == 1.0
    assert pro_auc(maps, masks) == pytest.approx(1.0)


def test_all_normal_is_an_error():
    maps = np.random.default_rng(0).random((2, 8, 8)).astype(np.float32)
    masks = np.zeros((2, 8, 8), bool)
    with pytest.raises(DataError, match="anomalous"):
        pixel_roc_auc(maps, masks)
    with pytest.raises(DataError, match="regions"):
        pro_auc(maps, masks)
    with pytest.raises(DataError, match="anomalous"):
        image_roc_auc(np.array([0.1, 0.2]), np.array([False, False]))


def test_nan_and_shape_errors():
    maps = np.zeros((1, 4, 4), np.float32)
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 0, 0] = True
    maps[0, 2, 2] = np.nan
    with pytest.raises(DataError, match="NaN"):
        pixel_roc_auc(maps, masks)
    with pytest.raises(DataError, match="NaN"):
        pro_auc(maps, masks)
    with pytest.raises(DataError, match="NaN"):
        roc_auc(np.array([0.1, np.inf]), np.array([0, 1]))
    with pytest.raises(DataError, match="shape"):
        pixel_roc_auc(np.zeros((1, 4, 4)), masks[:, :3])
    with pytest.raises(DataError, match="fpr_limit"):
        pro_auc(np.zeros((1, 4, 4)), masks, 0.0)


def test_hundred_maps_of_256_in_seconds():
    rng = np.random.default_rng(0)
    masks = np.zeros((100, 256, 256), bool)
    masks[::2, 100:140, 60:90] = True
    maps = (rng.random(masks.shape, dtype=np.float32) + 0.5 * masks).astype(np.float32)
    t0 = time.perf_counter()
    auc = pixel_roc_auc(maps, masks)
    pro = pro_auc(maps, masks)
    elapsed = time.perf_counter() - t0
    # uniform noise shifted by 0.5 inside the masks: ROC-AUC = 1 - 0.5**2/2 = 0.875 analytically
    assert auc == pytest.approx(0.875, abs=2e-3)
    assert 0.0 < pro < 1.0
    assert elapsed < 30, f"{elapsed:.1f} s"
