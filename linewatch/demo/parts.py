"""Synthetic parts for the demo and tests: crops of a CC0 brick photo, some with painted defects and exact masks.

Kept in the runtime (cv2 + numpy only) so the demo line needs no dataset and no extra dependency. Crops for
training, calibration and the simulated line come from disjoint regions of the photo, so the model is never
tested on pixels it trained on. The photo has perspective (bricks lean left on the left, right on the right, and
change size from top to bottom), so the regions are laid out to see the same mix: training takes the top and
bottom quarters, calibration and line share the middle half crosswise (each one left and one right region).
Calibrating on good parts that look like the line's, as on a real line, is what makes the false-alarm rate hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import cv2
import numpy as np

# band -> regions (top, bottom, left, right as fractions of the photo); each region holds at least CROP×CROP pixels
BANDS = {
    "train": ((0.0, 0.25, 0.0, 1.0), (0.75, 1.0, 0.0, 1.0)),
    "calibrate": ((0.25, 0.5, 0.0, 0.5), (0.5, 0.75, 0.5, 1.0)),
    "line": ((0.25, 0.5, 0.5, 1.0), (0.5, 0.75, 0.0, 0.5)),
}
CROP = 112  # source pixels per part in every band: the same brick scale everywhere (fits the 128-pixel regions)
DEFECT_KINDS = ("scratch", "stain", "chip")


@dataclass
class Part:
    image: np.ndarray  # uint8 H×W×3 BGR
    mask: np.ndarray  # bool H×W, True on defect pixels
    kind: str  # "good" or a defect kind

    @property
    def defective(self) -> bool:
        return self.kind != "good"


@lru_cache(maxsize=1)
def texture() -> np.ndarray:
    """The photo as grey uint8 (decoded once; callers only read it)."""
    data = resources.files("linewatch.demo") / "data" / "brick.png"
    image = cv2.imdecode(np.frombuffer(data.read_bytes(), np.uint8), cv2.IMREAD_GRAYSCALE)
    return image


def good_crop(rng: np.random.Generator, band: str, size: int, crop: int = CROP) -> np.ndarray:
    """A random crop of `band`, mirrored half of the time. The crop size is the same for every band: a band-
    dependent crop would give the line parts another brick scale than training, i.e. false alarms."""
    tex = texture()
    h, w = tex.shape
    regions = [(int(t * h), int(b * h), int(left * w), int(right * w)) for t, b, left, right in BANDS[band]]
    for top, bottom, left, right in regions:
        if bottom - top < crop or right - left < crop:
            raise ValueError(
                f"band {band!r} has a {right - left}x{bottom - top} region, smaller than the {crop}-pixel crop"
            )
    top, bottom, left, right = regions[int(rng.integers(len(regions)))]
    y = int(rng.integers(top, bottom - crop + 1))
    x = int(rng.integers(left, right - crop + 1))
    patch = tex[y : y + crop, x : x + crop]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    patch = cv2.resize(np.ascontiguousarray(patch), (size, size), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(patch, cv2.COLOR_GRAY2BGR)


def paint_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Returns (defective image, bool mask). Defects cover roughly 0.5-4 % of the part."""
    h, w = image.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    out = image.astype(np.float32)
    s = min(h, w)
    if kind == "scratch":
        pts = [(int(rng.integers(s // 8, w - s // 8)), int(rng.integers(s // 8, h - s // 8)))]
        for _ in range(3):
            x, y = pts[-1]
            pts.append(
                (
                    int(np.clip(x + rng.integers(-s // 4, s // 4), 2, w - 3)),
                    int(np.clip(y + rng.integers(-s // 4, s // 4), 2, h - 3)),
                )
            )
        cv2.polylines(mask, [np.array(pts, np.int32)], False, 1, thickness=max(2, s // 64))
        shade = 235.0 if rng.random() < 0.5 else 25.0
        out[mask > 0] = 0.15 * out[mask > 0] + 0.85 * shade
    elif kind == "stain":
        centre = (int(rng.integers(s // 5, w - s // 5)), int(rng.integers(s // 5, h - s // 5)))
        axes = (int(rng.integers(s // 14, s // 7)), int(rng.integers(s // 14, s // 7)))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        tint = np.array([30.0, 60.0, 140.0]) if rng.random() < 0.5 else np.array([20.0, 20.0, 20.0])
        out[mask > 0] = 0.35 * out[mask > 0] + 0.65 * tint
    elif kind == "chip":
        cx, cy = int(rng.integers(s // 5, w - s // 5)), int(rng.integers(s // 5, h - s // 5))
        angles = np.sort(rng.uniform(0, 2 * np.pi, 6))
        radii = rng.uniform(s / 20, s / 9, 6)
        poly = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).astype(np.int32)
        cv2.fillPoly(mask, [poly], 1)
        out[mask > 0] = rng.uniform(200, 245) + rng.normal(0, 6, (int(mask.sum()), 1))
    else:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {DEFECT_KINDS}")
    return np.clip(out, 0, 255).astype(np.uint8), mask.astype(bool)


def make_parts(n: int, band: str, size: int, defect_rate: float, seed: int) -> list[Part]:
    """n parts from `band`; a `defect_rate` share carry one defect, kinds cycling so every kind appears."""
    rng = np.random.default_rng(seed)
    n_bad = int(round(n * defect_rate))
    bad_slots = set(rng.choice(n, size=n_bad, replace=False).tolist()) if n_bad else set()
    parts, k = [], 0
    for i in range(n):
        image = good_crop(rng, band, size)
        if i in bad_slots:
            kind = DEFECT_KINDS[k % len(DEFECT_KINDS)]
            k += 1
            image, mask = paint_defect(image, kind, rng)
            parts.append(Part(image, mask, kind))
        else:
            parts.append(Part(image, np.zeros(image.shape[:2], bool), "good"))
    return parts
