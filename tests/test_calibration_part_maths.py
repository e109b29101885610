"""Issue 13 maths: part-level thresholds, min area, part sample-size rule and interval, contamination outliers;
against brute force with the daemon's own `judge` and against scipy."""

from __future__ import annotations

from fractions import Fraction

import cv2
import numpy as np
import pytest
from scipy import stats

from linewatch.calibrate.store import Calibration
from linewatch.calibrate.thresholds import (
    check_enough_parts,
    contamination_outliers,
    min_area_for_reject_rate,
    part_critical_value,
    part_critical_values,
    pixel_threshold_for_reject_rate,
    realised_part_rate,
)
from linewatch.line.verdict import judge
from linewatch.protocol.wire import Verdict


def smooth_maps(n: int, seed: int, size: int = 32) -> np.ndarray:
    """Blobby float32 maps like a DFR map (coarse grid, upsampled), with ties from rounding."""
    rng = np.random.default_rng(seed)
    coarse = rng.gamma(2.0, 1.0, (n, size // 4, size // 4)).astype(np.float32)
    maps = np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_LINEAR) for c in coarse])
    return np.round(maps, 2).astype(np.float32)


def nok(amap: np.ndarray, t: float, area: int) -> bool:
    cal = Calibration(version=1, model_sha256="0" * 64, pixel_threshold=float(t), min_defect_area=area)
    return judge(amap, float(amap.max()), cal).verdict == Verdict.NOK


# --- maths ----------------------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("area", [0, 1, 5, 40, 200])
def test_critical_value_is_where_judge_turns_ok(area):
    for amap in smooth_maps(12, seed=area):
        c = part_critical_value(amap, area)
        values = np.unique(amap)
        assert c in values and not nok(amap, c, area)
        lower = values[values < c]
        if lower.size:  # just below it the daemon fails the part
            assert nok(amap, float(lower[-1]), area)
            assert nok(amap, float(np.nextafter(np.float32(c), np.float32(-np.inf))), area)


@pytest.mark.unit
@pytest.mark.parametrize("rate", [0.02, 0.05, 0.1, 0.25, 0.5])
@pytest.mark.parametrize("area", [1, 30])
def test_reject_rate_threshold_equals_brute_force_over_judge(rate, area):
    maps = smooth_maps(40, seed=7)
    t = pixel_threshold_for_reject_rate(maps, rate, area)
    allowed = int(Fraction(repr(rate)) * len(maps))
    fails = sum(nok(m, t, area) for m in maps)
    assert fails <= allowed
    # brute force: every distinct map value below t fails more parts than allowed
    candidates = np.unique(maps)
    below = candidates[candidates < t]
    best = next((float(v) for v in candidates if sum(nok(m, float(v), area) for m in maps) <= allowed), None)
    assert best is not None
    if allowed >= 1:
        assert t == best
    else:  # no part may fail: just above the highest critical value (as pixel_threshold_for_fpr at rate 0)
        assert t == float(np.nextafter(part_critical_values(maps, area).max(), np.float32(np.inf)))
    if below.size:
        assert sum(nok(m, float(below[-1]), area) for m in maps) > allowed or allowed == 0


@pytest.mark.unit
def test_min_area_for_a_part_rate_equals_brute_force():
    maps = smooth_maps(30, seed=3)
    t = float(np.quantile(maps, 0.97))
    for rate in (0.0, 0.05, 0.1, 0.3):
        area = min_area_for_reject_rate(maps, t, rate)
        allowed = int(Fraction(repr(rate)) * len(maps))
        assert sum(nok(m, t, area) for m in maps) <= allowed
        assert area == 1 or sum(nok(m, t, area - 1) for m in maps) > allowed


@pytest.mark.unit
def test_part_sample_size_rule_refuses_with_the_numbers():
    with pytest.raises(ValueError, match="at least 50 calibration parts.*got 49"):
        check_enough_parts(49, 0.02)
    check_enough_parts(50, 0.02)
    with pytest.raises(ValueError, match="at least 4 calibration parts"):
        check_enough_parts(3, 0.5)


@pytest.mark.unit
@pytest.mark.parametrize("k, n", [(0, 20), (3, 40), (20, 20)])
def test_part_reject_rate_interval_is_clopper_pearson(k, n):
    rate = realised_part_rate(np.arange(n) < k)
    lo = 0.0 if k == 0 else stats.beta.ppf(0.025, k, n - k + 1)
    hi = 1.0 if k == n else stats.beta.ppf(0.975, k + 1, n - k)
    assert rate.rate == k / n and rate.n_effective == n
    assert rate.lower == pytest.approx(lo, abs=1e-9) and rate.upper == pytest.approx(hi, abs=1e-9)


@pytest.mark.unit
def test_outliers_against_the_batch_and_the_previous_calibration():
    rng = np.random.default_rng(0)
    good = np.exp(rng.normal(0.5, 0.1, 70))
    bad = np.exp(rng.normal(2.5, 0.5, 30))  # 30 % defective: scores several times higher
    scores = np.r_[good, bad]
    found, note = contamination_outliers(scores)
    assert {o.index for o in found} == set(range(70, 100)) and note is None
    assert all("above the batch" in o.why and o.z > 3.5 for o in found)
    assert contamination_outliers(good)[0] == []
    # against the previous good scores: a batch where every image is a little high is a change of the good parts
    # (noted, nothing excluded); a few high ones among normal ones are defects
    shifted, note = contamination_outliers(good * 3, previous=good)
    assert shifted == [] and "look different" in note
    few = np.r_[good[:20], good[:3] * 2.5]
    found, note = contamination_outliers(few, previous=good)
    assert {o.index for o in found} == {20, 21, 22} and note is None


@pytest.mark.unit
def test_outliers_above_a_constant_bulk_are_found_and_stored_as_json(tmp_path):
    from linewatch.calibrate.command import exclude_contamination

    scores = np.r_[np.full(20, 2.0), 2.0, 9.0]  # a saturated bulk: MAD and mean deviation 0 but for the outlier
    keep, excluded, note = exclude_contamination(scores, [f"img{i}" for i in range(22)], None)
    assert [e["image"] for e in excluded] == ["img21"] and list(keep) == list(range(21)) and note is None
    import json

    assert json.loads(json.dumps(excluded, allow_nan=False))[0]["score"] == 9.0


@pytest.mark.unit
def test_calibration_report_overlay_outlines_defect_regions_and_not_specks():
    """The report's pictures must show what fails a part: a 2-px speck above the threshold is not outlined when the
    minimum defect area is larger, the 100-px region is (red = BGR 0, 0, 255)."""
    from linewatch.calibrate.command import overlay_image

    frame = np.full((64, 64, 3), 128, np.uint8)
    amap = np.zeros((64, 64), np.float32)
    amap[40:50, 40:50] = 5.0  # a defect region of 100 px
    amap[5, 5:7] = 5.0  # a speck of 2 px
    red = lambda img: (img[..., 2] == 255) & (img[..., 0] == 0) & (img[..., 1] == 0)  # noqa: E731
    out = overlay_image(frame, amap, 1.0, None, min_defect_area=50)
    assert red(out)[38:52, 38:52].any()
    assert not red(out)[:20, :20].any()
    everything = overlay_image(frame, amap, 1.0, None, min_defect_area=1)
    assert red(everything)[:20, :20].any()  # with a 1-px minimum the speck is a defect and is drawn
