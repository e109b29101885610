"""Ignore masks: regions of the frame that never raise a defect (fixtures, labels, date stamps) (torch-free).

Polygons are fractions (0-1) of the frame after ROI, so one mask fits the anomaly map (model input size), the
preview, the heat map and a calibration image of any resolution alike: the ROI's crop is resized whole to the model
input, so a fraction of the crop is the same fraction of the map. The mask is applied to the anomaly map before
thresholding (ignored pixels set to 0, the image score recomputed as the masked map's maximum, the scoring
contract's `image_score = max(anomaly_map)`), so a defect inside never makes a part NOK, and the published mask and
regions, found in the masked map, exclude it. `linewatch calibrate` applies the same mask to the good parts' maps.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from linewatch.errors import ConfigError

SUBPIXEL_SHIFT = 4  # cv2.fillPoly fixed-point bits: polygon corners to 1/16 pixel

Polygon = Sequence[Sequence[float]]


class IgnoreMask:
    """Polygons and their rasters, one per map size (cached; thread-safe)."""

    def __init__(self, polygons: Sequence[Polygon]):
        self.polygons: tuple[tuple[tuple[float, float], ...], ...] = tuple(
            tuple((float(p[0]), float(p[1])) for p in poly) for poly in polygons
        )
        self._rasters: dict[tuple[int, int], np.ndarray] = {}
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self.polygons)

    def raster(self, height: int, width: int) -> np.ndarray:
        """bool H×W, True where ignored. A pixel is ignored when its centre lies inside a polygon."""
        key = (height, width)
        with self._lock:
            cached = self._rasters.get(key)
        if cached is not None:
            return cached
        canvas = np.zeros((height, width), np.uint8)
        scale = 1 << SUBPIXEL_SHIFT
        # fraction x of the width is x*width in continuous pixel coordinates, x*width - 0.5 in OpenCV's
        # (pixel centres at integers)
        pts = [
            np.array([[round((x * width - 0.5) * scale), round((y * height - 0.5) * scale)] for x, y in poly], np.int32)
            for poly in self.polygons
        ]
        cv2.fillPoly(canvas, pts, 1, lineType=cv2.LINE_8, shift=SUBPIXEL_SHIFT)
        out = canvas.astype(bool)
        out.setflags(write=False)
        with self._lock:
            self._rasters[key] = out
        return out

    def apply(self, anomaly_map: np.ndarray) -> np.ndarray:
        """A copy of an H×W map with the ignored pixels at 0 (anomaly maps are >= 0)."""
        ignored = self.raster(*anomaly_map.shape[-2:])
        out: np.ndarray = np.where(ignored, np.zeros((), anomaly_map.dtype), anomaly_map)
        return out

    def apply_batch(self, maps: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """N×H×W maps masked, and their image scores recomputed as each masked map's maximum."""
        masked = self.apply(maps)
        return masked, masked.reshape(len(masked), -1).max(axis=1).astype(scores.dtype, copy=False)

    def outline(self, image: np.ndarray, colour: tuple[int, int, int] = (255, 0, 255)) -> np.ndarray:
        """The image with the ignored area hatched and outlined (for the operator's preview)."""
        h, w = image.shape[:2]
        out: np.ndarray = image.copy()
        ignored = self.raster(h, w)
        hatch = ((np.add.outer(np.arange(h), np.arange(w)) // 3) % 4 == 0) & ignored
        out[hatch] = colour
        pts = [np.array([[round(x * w - 0.5), round(y * h - 0.5)] for x, y in p], np.int32) for p in self.polygons]
        cv2.polylines(out, pts, True, colour, 1, cv2.LINE_AA)
        return out


def from_config(polygons: Sequence[Polygon] | None) -> IgnoreMask | None:
    return IgnoreMask(polygons) if polygons else None


def load_ignore_mask(path: str | Path) -> IgnoreMask:
    """`linewatch calibrate --ignore-mask FILE`: a YAML/JSON file holding the polygons exactly as a camera's
    `ignore_mask` in the daemon config (a list of polygons, or a mapping with an `ignore_mask` key)."""
    from linewatch.line.config import CameraConfig
    from linewatch.validation import validate

    path = Path(path)
    try:
        data: Any = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read an ignore mask: {exc}") from None
    if isinstance(data, dict):
        data = data.get("ignore_mask")
    cam = validate(CameraConfig, {"name": "mask", "kind": "device", "source": 0, "ignore_mask": data}, path)
    if not cam.ignore_mask:
        raise ConfigError(f"{path}: no polygons (expected a list of polygons of [x, y] fractions, as ignore_mask)")
    return IgnoreMask(cam.ignore_mask)


def _key(polygons: Sequence[Polygon]) -> tuple[tuple[tuple[float, float], ...], ...]:
    return tuple(tuple((float(p[0]), float(p[1])) for p in poly) for poly in polygons)


_CACHE: dict[tuple[tuple[tuple[float, float], ...], ...], IgnoreMask] = {}
_CACHE_LOCK = threading.Lock()
MAX_CACHED = 64


def mask_for(polygons: Sequence[Polygon] | None) -> IgnoreMask | None:
    """The IgnoreMask of these polygons, built once (its rasters are cached per size): the inference thread looks
    a camera's (or a recipe's) mask up per frame."""
    if not polygons:
        return None
    key = _key(polygons)
    with _CACHE_LOCK:
        mask = _CACHE.get(key)
        if mask is None:
            if len(_CACHE) >= MAX_CACHED:
                _CACHE.clear()
            mask = _CACHE[key] = IgnoreMask(key)
    return mask
