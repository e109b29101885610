"""Anomaly-map overlays for eval, the calibration report and the demo (torch-free, OpenCV).

The map is coloured over a fixed range [vmin, vmax] shared by all images of a run (not per image), so a good image
stays uncoloured instead of having its noise stretched to full red. Colour opacity follows the normalised score.
Only defect regions (what fails a part: at least the calibration's min defect area above the pixel threshold) are
outlined; specks below that area are left to the heat map, so a good part never shows a defect outline.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from linewatch.errors import DataError
from linewatch.images import as_bgr
from linewatch.line.verdict import defect_mask

TRUTH_COLOUR = (0, 255, 0)  # BGR green: ground-truth outline
DEFECT_COLOUR = (0, 0, 255)  # BGR red: the regions that failed the part
MAX_ALPHA = 0.7
LEGEND = "red outline: defect region (failed the part); green: true defect; specks below the min area: not outlined"


def display_range(good_maps: np.ndarray, all_maps: np.ndarray, percentile: float = 99.9) -> tuple[float, float]:
    """(vmin, vmax): the good images' high percentile (normal noise stays clear) up to the largest score seen."""
    vmin = float(np.percentile(good_maps, percentile)) if np.size(good_maps) else float(np.min(all_maps))
    vmax = float(np.max(all_maps))
    if not vmax > vmin:
        vmax = vmin + 1e-6
    return vmin, vmax


def overlay(
    image_bgr: np.ndarray,
    anomaly_map: np.ndarray,
    vmin: float,
    vmax: float,
    mask: np.ndarray | None = None,
    threshold: float | None = None,
    min_defect_area: int = 0,
    defects: np.ndarray | None = None,
) -> np.ndarray:
    """Image with the JET-coloured map blended in (opacity grows with the score), the ground-truth `mask` outlined
    in green and the defect regions outlined in red: `defects` as given (e.g. from a published mask), else the
    regions of `map > threshold` with at least `min_defect_area` px (counted at map resolution, as the verdict
    does). Map and masks are resized to the image if needed."""
    image = as_bgr(np.asarray(image_bgr))
    amap = np.asarray(anomaly_map, np.float32)
    if amap.ndim != 2:
        raise DataError(f"overlay: anomaly map must be H×W, got shape {amap.shape}")
    if not vmax > vmin:
        raise DataError(f"overlay: need vmax > vmin, got {vmin}..{vmax}")
    h, w = image.shape[:2]
    if defects is None and threshold is not None:
        defects = defect_mask(amap > threshold, min_defect_area)
    if amap.shape != (h, w):
        amap = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
    level = np.clip((amap - vmin) / (vmax - vmin), 0.0, 1.0)
    heat = cv2.applyColorMap((level * 255).astype(np.uint8), cv2.COLORMAP_JET).astype(np.float32)
    alpha = (MAX_ALPHA * level)[..., None]
    out = (image.astype(np.float32) * (1 - alpha) + heat * alpha).round().astype(np.uint8)
    thickness = max(1, round(min(h, w) / 200))
    if defects is not None:
        _outline(out, _at_size(defects, h, w), DEFECT_COLOUR, thickness)
    if mask is not None:
        _outline(out, _at_size(mask, h, w), TRUTH_COLOUR, thickness)
    return out


def _at_size(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    region = np.asarray(mask).astype(bool)
    if region.shape != (h, w):
        region = cv2.resize(region.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    return region


def _outline(image: np.ndarray, region: np.ndarray, colour: tuple[int, int, int], thickness: int) -> None:
    contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(image, contours, -1, colour, thickness)


def grid(
    tiles: list[np.ndarray], labels: list[str] | None = None, tile: int = 160, columns: int | None = None
) -> np.ndarray:
    """One BGR image with the tiles resized to `tile` px and laid out row by row, each captioned."""
    if not tiles:
        raise DataError("overlay grid: no images")
    columns = columns or min(len(tiles), max(1, math.ceil(math.sqrt(len(tiles)))))
    rows = math.ceil(len(tiles) / columns)
    caption = 14 if labels else 0
    sheet = np.full((rows * (tile + caption), columns * tile, 3), 255, np.uint8)
    for i, img in enumerate(tiles):
        r, c = divmod(i, columns)
        y, x = r * (tile + caption), c * tile
        sheet[y : y + tile, x : x + tile] = cv2.resize(as_bgr(img), (tile, tile), interpolation=cv2.INTER_AREA)
        if labels:
            cv2.putText(
                sheet,
                labels[i][: tile // 7],
                (x + 2, y + tile + caption - 3),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.35,
                (0, 0, 0),
                1,
                cv2.LINE_AA,
            )
    return sheet
