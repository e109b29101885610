"""Anomaly map + calibration -> OK/NOK and the defect regions behind it (torch-free, called per frame).

A pixel is anomalous when `map > pixel_threshold` (strictly, the rule the calibration's quantile is defined for).
Anomalous pixels are grouped into 8-connected regions; the part is NOK when one region has at least
max(1, min_defect_area) pixels (a *defect region*: what made the verdict), or when an image threshold is set and
the image score exceeds it. Smaller regions are *specks*: listed and in the mask, but they never fail a part, so
readers and pictures must be able to tell the two apart (`Region.defect`).
Non-finite maps or scores raise ValueError: the daemon reports them as ERROR, never as a verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import cv2
import numpy as np

from linewatch.protocol.wire import MAX_REGIONS, Verdict


class CalibrationLike(Protocol):
    """What `judge` reads of a calibration (linewatch.calibrate.store.Calibration, or any object with these)."""

    @property
    def pixel_threshold(self) -> float: ...

    @property
    def image_threshold(self) -> float | None: ...

    @property
    def min_defect_area(self) -> int: ...


@dataclass(frozen=True)
class Region:
    bbox: tuple[int, int, int, int]  # x, y, w, h in anomaly-map (model input) pixels
    area: int
    peak: float
    defect: bool = False  # area >= max(1, min_defect_area): this region failed the part; False: a speck


@dataclass(frozen=True)
class Judgement:
    """The verdict and what it rests on. `mask` is the thresholded map the regions were found in (the published
    mask); `regions` are the largest ones, cut for reporting, `regions_total` counts them all and
    `defect_regions` counts those big enough to fail the part. Largest first puts every defect region before
    every speck, so the cut drops specks before defects."""

    verdict: Verdict
    mask: np.ndarray  # bool H×W: map > pixel threshold
    regions: list[Region] = field(default_factory=list)
    regions_total: int = 0
    image_score: float = 0.0
    reasons: list[str] = field(default_factory=list)
    defect_regions: int = 0


def judge(
    anomaly_map: np.ndarray, image_score: float, calibration: CalibrationLike, max_regions: int = MAX_REGIONS
) -> Judgement:
    """OK/NOK for one H×W anomaly map; `calibration` needs pixel_threshold, image_threshold, min_defect_area."""
    amap = np.asarray(anomaly_map)
    if amap.ndim != 2 or amap.size == 0:
        raise ValueError(f"anomaly map must be a non-empty H×W array, got shape {amap.shape}")
    top, bottom = float(amap.max()), float(amap.min())  # NaN propagates through max/min: one pass finds it
    if not (math.isfinite(top) and math.isfinite(bottom)):
        raise ValueError(f"anomaly map has non-finite values (max {top}, min {bottom})")
    image_score = float(image_score)
    if not math.isfinite(image_score):
        raise ValueError(f"image score is not finite: {image_score}")

    threshold = float(calibration.pixel_threshold)
    min_area = max(1, int(calibration.min_defect_area))
    mask = amap > threshold
    reasons: list[str] = []
    regions: list[Region] = []
    total = big = 0
    if top > threshold:
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
        areas = stats[1:, cv2.CC_STAT_AREA]
        total = n - 1
        for i in np.argsort(-areas, kind="stable")[:max_regions]:
            x, y, w, h, area = (int(v) for v in stats[i + 1, :5])
            window = amap[y : y + h, x : x + w]
            peak = float(window[labels[y : y + h, x : x + w] == i + 1].max())
            regions.append(Region((x, y, w, h), area, peak, area >= min_area))
        big = int(np.count_nonzero(areas >= min_area))
        if big:
            reasons.append(
                f"{big} region(s) above pixel threshold {threshold:.6g} with >= {min_area} px "
                f"(largest {int(areas.max())} px)"
            )
    image_threshold = calibration.image_threshold
    if image_threshold is not None and image_score > float(image_threshold):
        reasons.append(f"image score {image_score:.6g} > image threshold {float(image_threshold):.6g}")
    return Judgement(Verdict.NOK if reasons else Verdict.OK, mask, regions, total, image_score, reasons, big)


def defect_mask(mask: np.ndarray, min_defect_area: int) -> np.ndarray:
    """The pixels of `mask` that lie in defect regions (8-connected, >= max(1, min_defect_area) px), specks
    removed: what pictures outline, so a good part with a few noisy pixels shows no defect."""
    binary = np.ascontiguousarray(np.asarray(mask).astype(np.uint8))
    if binary.ndim != 2:
        raise ValueError(f"mask must be H×W, got shape {binary.shape}")
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8, ltype=cv2.CV_32S)
    keep = stats[:, cv2.CC_STAT_AREA] >= max(1, int(min_defect_area))
    keep[0] = False  # the background
    out: np.ndarray = keep[labels]
    return out
