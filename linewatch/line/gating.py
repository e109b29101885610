"""Image gating: frames unfit to be judged become ERROR results with the reason, never scores (torch-free).

A model trained on good parts says nothing sensible about a black frame, a blurred one or an empty station: the
anomaly map may well stay under the threshold and the part would pass. So the camera thread checks each frame
(after ROI, before it is queued) against the camera's `gating` config, cheapest test first:

- brightness: one 256-bin grey histogram gives the mean and the clipped fractions (too dark / too bright),
- presence: mean absolute grey difference to an empty-station reference at 160 px width (no part),
- focus: variance of the Laplacian of the grey frame, against an absolute floor and/or a ratio to a sharp
  reference frame's value (out of focus).

The first failed test is the frame's reason; reasons are counted per camera (status `gated`, Prometheus
`linewatch_gated_frames_total{camera,reason}`). The functions are pure; `FrameGate` holds one camera's references
and counts. Cost per 640x480 frame: docs/BENCHMARKS.md, "Image gating".
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import cv2
import numpy as np

from linewatch.errors import ConfigError, DataError
from linewatch.images import read_image
from linewatch.line.config import GatingConfig

log = logging.getLogger("linewatch.line.gating")

TOO_DARK, TOO_BRIGHT, NO_PART, OUT_OF_FOCUS = "too_dark", "too_bright", "no_part", "out_of_focus"
REASONS = (TOO_DARK, TOO_BRIGHT, NO_PART, OUT_OF_FOCUS)
GATED_PREFIX = "gated: "
CLIP_LOW, CLIP_HIGH = 5, 250  # grey levels counted as clipped shadows / highlights
PRESENCE_WIDTH = 160  # presence is compared at this width: robust to noise, cheap


def grey_of(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


@dataclass(frozen=True)
class Brightness:
    mean: float
    dark: float  # fraction of pixels <= CLIP_LOW
    bright: float  # fraction of pixels >= CLIP_HIGH


def brightness(grey: np.ndarray) -> Brightness:
    """Mean grey level and clipped fractions, from one histogram."""
    hist = cv2.calcHist([grey], [0], None, [256], [0, 256]).ravel()
    total = float(hist.sum()) or 1.0
    mean = float(np.dot(hist, np.arange(256, dtype=np.float32))) / total
    return Brightness(mean, float(hist[: CLIP_LOW + 1].sum()) / total, float(hist[CLIP_HIGH:].sum()) / total)


def sharpness(grey: np.ndarray) -> float:
    """Variance of the Laplacian: high for sharp edges, falls as the picture blurs."""
    _, std = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_32F))
    return float(std[0, 0]) ** 2


def small(grey: np.ndarray, width: int = PRESENCE_WIDTH) -> np.ndarray:
    h, w = grey.shape[:2]
    if w <= width:
        return grey
    return cv2.resize(grey, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA)


def difference(grey_small: np.ndarray, reference_small: np.ndarray) -> float:
    """Mean absolute grey difference of two same-size images (0-255)."""
    return float(cv2.mean(cv2.absdiff(grey_small, reference_small))[0])


@dataclass(frozen=True)
class GateVerdict:
    reason: str  # one of REASONS
    detail: str  # what was measured against what

    @property
    def text(self) -> str:
        """The ERROR result's reason."""
        return f"{GATED_PREFIX}{self.reason.replace('_', ' ')}: {self.detail}"


class FrameGate:
    """One camera's gate: its config, its references (read once), its counts per reason."""

    def __init__(self, camera: str, cfg: GatingConfig):
        self.camera = camera
        self.cfg = cfg
        self.counts: dict[str, int] = dict.fromkeys(REASONS, 0)
        self.passed = 0
        self._lock = threading.Lock()
        self._focus_ref = _read_ref(camera, "focus_reference", cfg.focus_reference)
        self._empty_ref = _read_ref(camera, "empty_reference", cfg.empty_reference)
        self._focus_ref_value: dict[tuple[int, int], float] = {}  # frame size -> the reference's sharpness there
        self._empty_small: dict[tuple[int, int], np.ndarray] = {}
        self._last_reason: str | None = None

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    def check(self, image: np.ndarray) -> GateVerdict | None:
        """None: fit to be judged; else why not (counted, and logged when the reason changes)."""
        verdict = self._evaluate(image)
        with self._lock:
            if verdict is None:
                self.passed += 1
            else:
                self.counts[verdict.reason] += 1
        reason = None if verdict is None else verdict.reason
        if reason != self._last_reason:
            if verdict is not None:
                log.warning("camera %s: frames gated: %s", self.camera, verdict.text)
            else:
                log.info("camera %s: frames pass the gate again (was: %s)", self.camera, self._last_reason)
            self._last_reason = reason
        return verdict

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def _evaluate(self, image: np.ndarray) -> GateVerdict | None:
        cfg = self.cfg
        grey = grey_of(image)
        if cfg.min_mean is not None or cfg.max_mean is not None or cfg.max_clipped is not None:
            b = brightness(grey)
            if cfg.min_mean is not None and b.mean < cfg.min_mean:
                return GateVerdict(TOO_DARK, f"mean grey {b.mean:.1f} < min_mean {cfg.min_mean:g}")
            if cfg.max_mean is not None and b.mean > cfg.max_mean:
                return GateVerdict(TOO_BRIGHT, f"mean grey {b.mean:.1f} > max_mean {cfg.max_mean:g}")
            if cfg.max_clipped is not None:
                if b.bright > cfg.max_clipped:
                    return GateVerdict(TOO_BRIGHT, f"{b.bright:.1%} of pixels saturated > {cfg.max_clipped:g}")
                if b.dark > cfg.max_clipped:
                    return GateVerdict(TOO_DARK, f"{b.dark:.1%} of pixels black > max_clipped {cfg.max_clipped:g}")
        if cfg.presence_min_diff is not None and self._empty_ref is not None:
            g = small(grey)
            diff = difference(g, self._empty_at(g.shape[:2]))
            if diff < cfg.presence_min_diff:
                return GateVerdict(
                    NO_PART,
                    f"{diff:.2f} from the empty station < presence_min_diff {cfg.presence_min_diff:g}",
                )
        if cfg.focus_min is not None or cfg.focus_min_ratio is not None:
            value = sharpness(grey)
            if cfg.focus_min is not None and value < cfg.focus_min:
                return GateVerdict(OUT_OF_FOCUS, f"Laplacian variance {value:.1f} < focus_min {cfg.focus_min:g}")
            if cfg.focus_min_ratio is not None and self._focus_ref is not None:
                ref = self._focus_at(grey.shape[:2])
                if value < cfg.focus_min_ratio * ref:
                    return GateVerdict(
                        OUT_OF_FOCUS,
                        f"Laplacian variance {value:.1f} < {cfg.focus_min_ratio:g} x the reference's {ref:.1f}",
                    )
        return None

    def _focus_at(self, size: tuple[int, int]) -> float:
        """The sharp reference's value at the frame's size (the Laplacian's variance depends on scale)."""
        if size not in self._focus_ref_value:
            assert self._focus_ref is not None
            self._focus_ref_value[size] = sharpness(_fit(self._focus_ref, size))
        return self._focus_ref_value[size]

    def _empty_at(self, size: tuple[int, int]) -> np.ndarray:
        if size not in self._empty_small:
            assert self._empty_ref is not None
            self._empty_small[size] = _fit(self._empty_ref, size)
        return self._empty_small[size]


def _fit(grey: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    if grey.shape[:2] == (h, w):
        return grey
    return cv2.resize(grey, (w, h), interpolation=cv2.INTER_AREA)


def _read_ref(camera: str, key: str, path: object) -> np.ndarray | None:
    if path is None:
        return None
    try:
        return grey_of(read_image(str(path)))
    except DataError as exc:
        raise ConfigError(f"camera {camera!r}: gating.{key}: {exc}") from None
