"""The demo report's pictures and tables, from its own functions on real OpenCV images: good parts with specks show
no defect outline, failed parts show their defect regions in red, timings are a table (HTML and console)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from linewatch.demo.run import TILE, LinePart, overlay_grid, report_html, timings_html, timings_text
from linewatch.evaluation.overlay import DEFECT_COLOUR, TRUTH_COLOUR, overlay

SIZE = TILE  # part images at the grid's tile size: the sheet holds each tile's pixels unresized
MIN_AREA = 20


def part_and_result(number: int, kind: str, blobs: list[tuple[slice, slice, float]], truth=None):
    image = np.full((SIZE, SIZE, 3), 128, np.uint8)
    amap = np.zeros((SIZE, SIZE), np.float32)
    for ys, xs, value in blobs:
        amap[ys, xs] = value
    mask = np.zeros((SIZE, SIZE), bool) if truth is None else truth
    published = ((amap > 0.5) * 255).astype(np.uint8)  # the daemon's mask: every pixel above the threshold
    verdict = "NOK" if kind != "good" else "OK"
    part = LinePart(number, number + 5, kind, image, mask)
    return part, amap, {"header": {"verdict": verdict}, "mask": published}


def sheets(parts_results):
    parts = [p for p, _, _ in parts_results]
    maps = np.stack([m for _, m, _ in parts_results])
    results = {p.number: r for p, _, r in parts_results}
    blank = {n: {**r, "mask": np.zeros_like(r["mask"])} for n, r in results.items()}
    cal_maps = np.zeros((2, SIZE, SIZE), np.float32)
    drawn = overlay_grid(parts, results, maps, 0.5, cal_maps, MIN_AREA)
    bare = overlay_grid(parts, blank, maps, 0.5, cal_maps, MIN_AREA)  # the same heat maps, nothing outlined
    return drawn, bare


def heat_tile(sheet: np.ndarray, index: int) -> np.ndarray:
    """The i-th part's heat-map tile (tiles run image, heat, image, heat, … in one row)."""
    x = (2 * index + 1) * TILE
    return sheet[:TILE, x : x + TILE]


@pytest.mark.integration
def test_a_good_part_with_specks_has_no_defect_outline_and_a_failed_part_shows_its_defect_in_red():
    truth = np.zeros((SIZE, SIZE), bool)
    truth[56:84, 56:84] = True  # the painted defect: a little larger than what the map lights up
    good = part_and_result(1, "good", [(slice(20, 23), slice(30, 33), 0.8), (slice(150, 152), slice(9, 13), 0.7)])
    bad = part_and_result(
        2, "scratch", [(slice(60, 80), slice(60, 80), 0.9), (slice(150, 152), slice(9, 13), 0.7)], truth
    )
    assert 0 < good[2]["mask"].astype(bool).sum() < MIN_AREA  # the good part's published mask holds specks only
    drawn, bare = sheets([good, bad])

    ok_tile = heat_tile(drawn, 0)
    np.testing.assert_array_equal(ok_tile, heat_tile(bare, 0))  # pixel for pixel: no outline at all
    assert not (ok_tile == DEFECT_COLOUR).all(axis=2).any()

    nok_tile, nok_bare = heat_tile(drawn, 1), heat_tile(bare, 1)
    red = (nok_tile == DEFECT_COLOUR).all(axis=2)
    ys, xs = np.nonzero(red)
    assert red.sum() >= 4 * 19  # the 20×20 defect region's outline
    assert ys.min() >= 59 and ys.max() <= 80 and xs.min() >= 59 and xs.max() <= 80  # around it, not the speck
    assert (nok_tile == TRUTH_COLOUR).all(axis=2).any()  # the truth, green
    np.testing.assert_array_equal(nok_tile[140:160, :30], nok_bare[140:160, :30])  # its speck: not outlined


@pytest.mark.unit
def test_overlay_outlines_defect_regions_at_map_resolution_and_skips_specks():
    image = np.full((64, 64, 3), 128, np.uint8)
    amap = np.zeros((16, 16), np.float32)
    amap[2:6, 2:6] = 1.0  # 16 px at map resolution: a defect at min area 10
    amap[12, 12] = 1.0  # 1 px: a speck
    out = overlay(image, amap, 0.1, 1.0, threshold=0.5, min_defect_area=10)
    red = (out == DEFECT_COLOUR).all(axis=2)
    ys, xs = np.nonzero(red)
    assert red.any() and ys.max() < 32 and xs.max() < 32  # the defect (upscaled ×4), never the speck at (48, 48)
    plain = overlay(image, amap, 0.1, 1.0, threshold=0.5, min_defect_area=17)  # now both are specks
    assert not (plain == DEFECT_COLOUR).all(axis=2).any()


def summary(timings: dict[str, float]) -> dict:
    counts = dict(parts=0, defective=0, good=0, detected=0, missed=0, false_alarms=0, correct_passes=0, errors=0)
    return {
        "counts": {**counts, "detection_rate": None, "false_alarm_rate": None},
        "parts": [],
        "calibration": {
            "pixel_threshold": 0.5,
            "reject_rate_target": 0.02,
            "holdout_part_reject_rate": None,
            "min_defect_area": 200,
            "version": 1,
        },
        "timings_s": timings,
    }


@pytest.mark.unit
def test_timings_are_a_table_in_the_report_and_aligned_on_the_console():
    timings = {"line": 0.4, "model": 61.3, "inspection": 9.0}
    page = report_html(summary(timings), b"\xff\xd8")
    table = re.search(r"<table class='timings'>(.*?)</table>", page, re.S)
    assert table, page
    rows = re.findall(r"<tr><td>(\w+)</td><td>([\d.]+)</td></tr>", table.group(1))
    assert rows == [("line", "0.4"), ("model", "61.3"), ("inspection", "9.0"), ("total", "70.7")]
    assert '"line"' not in page and "{" not in table.group(0)  # no raw dict
    assert timings_html({}) == "<table class='timings'><tr><th>step</th><th>seconds</th></tr></table>"
    assert "red outlines" in page and "magenta" not in page  # the legend says what the colours mean

    text = timings_text(timings).splitlines()
    assert [line.split() for line in text] == [
        ["step", "seconds"],
        ["line", "0.4"],
        ["model", "61.3"],
        ["inspection", "9.0"],
        ["total", "70.7"],
    ]
    assert len({len(line) for line in text}) == 1  # seconds right-aligned in one column
