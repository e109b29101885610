"""Verdicts: regions against an independent labelling (scikit-image), area/strictness/image-score rules, speed."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
from skimage import measure

from linewatch.calibrate.store import (
    Calibration,
    load_calibration,
    write_calibration,
)
from linewatch.line.verdict import defect_mask, judge


def cal(pixel=0.5, image=None, area=0):
    return Calibration(
        version=1, model_sha256="0" * 64, pixel_threshold=pixel, image_threshold=image, min_defect_area=area
    )


@pytest.mark.unit
@pytest.mark.parametrize("seed", range(4))
def test_regions_match_an_independent_8_connected_labelling(seed):
    rng = np.random.default_rng(seed)
    amap = (rng.random((40, 56)) ** 6).astype(np.float32)  # sparse bright pixels, many small regions
    j = judge(amap, float(amap.max()), cal(0.4, area=3), max_regions=10_000)
    props = measure.regionprops(measure.label(amap > 0.4, connectivity=2), intensity_image=amap)
    expected = sorted(
        ((p.bbox[1], p.bbox[0], p.bbox[3] - p.bbox[1], p.bbox[2] - p.bbox[0]), int(p.area), float(p.intensity_max))
        for p in props
    )
    got = sorted((r.bbox, r.area, r.peak) for r in j.regions)
    assert got == expected and len(got) > 5
    assert j.verdict == ("NOK" if any(a >= 3 for _, a, _ in expected) else "OK")
    assert [r.area for r in j.regions] == sorted((r.area for r in j.regions), reverse=True)


@pytest.mark.unit
def test_regions_are_cut_at_100_largest_first_and_counted_in_full():
    amap = np.zeros((64, 256), np.float32)
    sizes = {}
    for i in range(250):  # 250 separate squares (1 or 2 px wide), 4 px apart
        y, x = divmod(i, 62)
        side = 2 if i % 3 == 0 else 1
        amap[4 * y + 1 : 4 * y + 1 + side, 4 * x + 1 : 4 * x + 1 + side] = 0.9
        sizes[i] = side * side
    j = judge(amap, 0.9, cal(0.5))
    assert j.regions_total == 250 and len(j.regions) == 100
    assert [r.area for r in j.regions] == sorted(sizes.values(), reverse=True)[:100]
    assert j.mask.dtype == np.bool_ and j.mask.shape == amap.shape
    np.testing.assert_array_equal(j.mask, amap > 0.5)


@pytest.mark.unit
def test_min_defect_area_counts_8_connected_pixels():
    amap = np.zeros((20, 20), np.float32)
    amap[2, 2] = amap[3, 3] = amap[4, 4] = 0.9  # a diagonal line: one region of 3 under 8-connectivity
    assert judge(amap, 0.9, cal(area=0)).verdict == "NOK"  # 0 = any pixel
    assert judge(amap, 0.9, cal(area=1)).verdict == "NOK"
    assert judge(amap, 0.9, cal(area=3)).verdict == "NOK"
    j = judge(amap, 0.9, cal(area=4))
    assert j.verdict == "OK" and [(r.bbox, r.area) for r in j.regions] == [((2, 2, 3, 3), 3)]


@pytest.mark.unit
def test_threshold_is_strict_and_a_clean_map_has_no_regions():
    amap = np.full((16, 16), 0.5, np.float32)
    j = judge(amap, 0.5, cal(0.5))
    assert (j.verdict, j.regions, j.reasons) == ("OK", [], [])
    assert j.regions_total == 0 and not j.mask.any() and j.mask.shape == (16, 16)
    amap[8, 8] = np.nextafter(np.float32(0.5), np.float32(1))
    j = judge(amap, float(amap.max()), cal(0.5))
    assert j.verdict == "NOK" and j.regions[0].bbox == (8, 8, 1, 1) and "pixel threshold" in j.reasons[0]


@pytest.mark.unit
def test_image_threshold():
    amap = np.zeros((16, 16), np.float32)
    assert judge(amap, 0.7, cal(image=None)).verdict == "OK"
    assert judge(amap, 0.7, cal(image=0.7)).verdict == "OK"
    j = judge(amap, 0.71, cal(image=0.7))
    assert j.verdict == "NOK" and j.regions == [] and "image score" in j.reasons[0] and j.image_score == 0.71


@pytest.mark.unit
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_map_or_score_raises(bad):
    amap = np.zeros((16, 16), np.float32)
    amap[3, 4] = bad
    with pytest.raises(ValueError, match="non-finite"):
        judge(amap, 0.1, cal())
    with pytest.raises(ValueError, match="not finite"):
        judge(np.zeros((16, 16), np.float32), bad, cal())


@pytest.mark.integration
def test_judges_with_a_calibration_read_from_the_bundle(deviation_bundle, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(deviation_bundle, model)
    write_calibration(model, 0.5, min_defect_area=4)
    amap = np.zeros((64, 64), np.float32)
    amap[10:12, 10:12] = 0.8
    assert judge(amap, 0.8, load_calibration(model)).verdict == "NOK"
    amap[10:12, 11] = 0
    assert judge(amap, 0.8, load_calibration(model)).verdict == "OK"


@pytest.mark.unit
def test_fast_enough_for_100_fps_at_256():
    rng = np.random.default_rng(0)
    amap = (rng.random((256, 256)) * 0.3).astype(np.float32)
    amap[100:130, 40:90] = 0.9
    amap[200:204, 200:204] = 0.7
    c = cal(0.5, area=10)
    judge(amap, 0.9, c)
    n = 300
    start = time.perf_counter()
    for _ in range(n):
        j = judge(amap, 0.9, c)
    per_call = (time.perf_counter() - start) / n
    assert j.verdict == "NOK" and len(j.regions) == 2
    assert per_call < 2e-3, f"{per_call * 1e3:.2f} ms per 256x256 map"


@pytest.mark.unit
def test_defect_regions_are_told_apart_from_specks():
    amap = np.zeros((32, 32), np.float32)
    amap[2:8, 2:8] = 0.9  # 36 px: at least min_defect_area, fails the part
    amap[20:22, 20:22] = 0.8  # 4 px: a speck
    j = judge(amap, 0.9, cal(0.5, area=10))
    assert j.verdict == "NOK" and j.regions_total == 2 and j.defect_regions == 1
    assert [(r.area, r.defect) for r in j.regions] == [(36, True), (4, False)]
    np.testing.assert_array_equal(defect_mask(j.mask, 10), amap == np.float32(0.9))
    amap[2:8, 2:8] = 0  # only the speck is left: OK, and it says the speck judged nothing
    j = judge(amap, 0.8, cal(0.5, area=10))
    assert j.verdict == "OK" and j.regions_total == 1 and j.defect_regions == 0
    assert [(r.area, r.defect) for r in j.regions] == [(4, False)]
    assert not defect_mask(j.mask, 10).any() and j.mask.sum() == 4
    assert defect_mask(j.mask, 0).sum() == 4  # min area 0 = any pixel, as in judge


@pytest.mark.unit
def test_the_reporting_cut_keeps_the_defect_regions_first():
    amap = np.zeros((16, 64), np.float32)
    for i in range(6):  # six 1-px specks, then two 3x3 defects further right
        amap[1, 2 + 3 * i] = 0.9
    amap[8:11, 30:33] = amap[8:11, 50:53] = 0.9
    j = judge(amap, 0.9, cal(0.5, area=5), max_regions=3)
    assert j.regions_total == 8 and j.defect_regions == 2
    assert [(r.area, r.defect) for r in j.regions] == [(9, True), (9, True), (1, False)]
