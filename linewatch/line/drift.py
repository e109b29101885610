"""Drift watch: are recent parts still scored like the calibration's good parts? (torch-free, no scipy)

The test is distribution-free and two-sided: light, focus and colour changes move scores up or down (a darker or
blurred frame often scores *lower*, and then defects can escape). Each part with a score (OK and NOK; ERROR has
none) counts as *outside* when its image score is above the k-th smallest of the calibration's n good image scores
(k from `quantile`) or below the (n+1-k)-th: outside the central band the calibration's good parts span. Under no
drift a new part is exchangeable with the calibration sample, so the probability P of outside is
Beta(2(n+1-k), 2k-n-1) distributed over calibration samples (the mass outside two order statistics). The test is
designed at p0, the `confidence` upper quantile of that Beta: the stated false-alarm bound holds for at least that
fraction of calibrations, not just on average.

A Bernoulli CUSUM then accumulates the log-likelihood ratio of "outside rate p1" against "p0", on an integer
lattice (+up per part outside, -down otherwise, floored at 0), so the in-control average run length (ARL0, parts
until a false alarm) of the very statistic the daemon runs is computed exactly from its Markov chain, and the warn
and alarm thresholds are the smallest whose ARL0 reaches the configured targets.

NOK parts are included on purpose: a lighting change often pushes good parts over the threshold, and a watch that
ignored NOK parts would go blind exactly then; a burst of defects is worth an alarm too. A steady defect rate d
raises the in-control outside rate to about p0 + d (docs/CALIBRATION.md, "Drift watch").

Alarm latches until the watch is reset (calibration reload or restart); warn clears only once the statistic has
fallen back to 0, so a statistic hovering at the warn line does not flap.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np

from linewatch.calibrate.thresholds import beta_ppf

OK, WARN, ALARM, UNAVAILABLE = "ok", "warn", "alarm", "unavailable"
STATE_CODES = {UNAVAILABLE: -1, OK: 0, WARN: 1, ALARM: 2}  # the Prometheus gauge's values
MIN_GOOD_SCORES = 10  # fewer good scores bound the outside rate too loosely for a useful test
STEP_SCALE = 20  # the larger CUSUM increment in lattice units: the rounding of the up/down ratio is <= 1/40
MAX_STATES = 20_000  # lattice states the ARL solve may take (a design needing more is refused)
ADVICE = (
    "recent parts no longer score like the calibration's good parts (lighting, focus, camera or product changed?): "
    "check the station, then recalibrate (linewatch calibrate)"
)


@dataclass(frozen=True)
class DriftDesign:
    """A CUSUM design for one calibration: the central band, lattice steps and thresholds with their exact ARL0."""

    n_good: int
    low: float  # a part is outside when its image score is below low or above high
    high: float
    p0: float  # in-control outside probability designed for (upper confidence bound)
    p1: float  # outside probability the test is tuned to detect fastest
    up: int
    down: int
    unit: float  # nats of log-likelihood ratio per lattice step
    warn_at: int  # lattice thresholds (statistic >= threshold)
    alarm_at: int
    warn_arl0: float  # exact in-control ARL at p0 of those thresholds
    alarm_arl0: float


def calibration_scores(calibration: Any) -> list[float] | None:
    """The image scores of every part the calibration took as good: `good_image_scores` plus the parts its outlier
    test set aside (all from the top). Leaving those out would trim the sample's upper tail and make new good
    parts land above the band more often than the design says. None for a file without good_image_scores."""
    good = getattr(calibration, "good_image_scores", None)
    if good is None:
        return None
    extra = [e.get("score") for e in getattr(calibration, "excluded", None) or [] if isinstance(e, dict)]
    return [float(v) for v in good] + [float(v) for v in extra if isinstance(v, (int, float)) and math.isfinite(v)]


def band_indices(n: int, quantile: float) -> tuple[int, int]:
    """(j, k), 1-based order statistics bounding the central band (j = n+1-k < k): P(outside) ~ Beta(2j, k-j)."""
    k = min(n, max(1, math.floor(quantile * (n + 1))))
    k = max(k, n // 2 + 1)  # the band is never empty
    return n + 1 - k, k


def lattice_steps(p0: float, p1: float) -> tuple[int, int, float]:
    """(up, down, nats per step) approximating the LLR increments log(p1/p0) and log((1-p1)/(1-p0))."""
    a, b = math.log(p1 / p0), math.log((1 - p0) / (1 - p1))
    if a >= b:
        return STEP_SCALE, max(1, round(STEP_SCALE * b / a)), a / STEP_SCALE
    return max(1, round(STEP_SCALE * a / b)), STEP_SCALE, b / STEP_SCALE


def run_lengths(p: float, up: int, down: int, h: int) -> np.ndarray:
    """Exact expected parts until the statistic reaches h, from every start state 0..h-1 (Markov chain).

    Solves (I - Q) L = 1, where Q moves state i to i+up with probability p and to max(0, i-down) otherwise. The
    matrix is banded (down below the diagonal, up above) and a nonsingular M-matrix, so Gaussian elimination
    without pivoting is stable and stays within the band: a few ms in numpy slices, and no multi-threaded LAPACK
    call that a busy line PC's cores would slow down a hundredfold."""
    if h <= 0:
        return np.zeros(0)
    a = np.eye(h)
    idx = np.arange(h)
    stay = idx + up < h
    a[idx[stay], idx[stay] + up] -= p
    a[idx, np.maximum(idx - down, 0)] -= 1 - p
    b = np.ones(h)
    for k in range(h - 1):
        rows, cols = slice(k + 1, min(h, k + down + 1)), slice(k, min(h, k + up + 1))
        f = a[rows, k] / a[k, k]
        a[rows, cols] -= np.multiply.outer(f, a[k, cols])
        b[rows] -= f * b[k]
    x = np.empty(h)
    for k in range(h - 1, -1, -1):
        end = min(h, k + up + 1)
        x[k] = (b[k] - float(np.sum(a[k, k + 1 : end] * x[k + 1 : end]))) / a[k, k]
    return x


def arl(p: float, up: int, down: int, h: int) -> float:
    """Exact average run length from 0 (a fresh watch) to the threshold h."""
    return 1.0 if h <= 0 else float(run_lengths(p, up, down, h)[0])


def threshold_for_arl(p: float, up: int, down: int, target: float) -> tuple[int, float]:
    """Smallest lattice threshold whose exact ARL at outside probability p reaches `target`, and that ARL."""
    lo, hi = 0, up
    while arl(p, up, down, hi) < target:
        lo, hi = hi, 2 * hi
        if hi > MAX_STATES:
            raise ValueError(f"an ARL of {target:g} needs more than {MAX_STATES} CUSUM states")
    while hi - lo > 1:  # arl(lo) < target <= arl(hi); ARL grows with the threshold
        mid = (lo + hi) // 2
        if arl(p, up, down, mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi, arl(p, up, down, hi)


def design(
    good_scores: Sequence[float] | None,
    quantile: float = 0.9,
    detect_rate: float = 0.3,
    confidence: float = 0.95,
    warn_arl0: float = 1e4,
    alarm_arl0: float = 1e5,
) -> DriftDesign | str:
    """The design for a calibration's good image scores, or why drift cannot be watched with them."""
    if good_scores is None or len(good_scores) == 0:
        return "the calibration has no good_image_scores (written before drift watch existed): recalibrate"
    scores = np.sort(np.asarray(good_scores, dtype=np.float64))
    n = int(scores.size)
    if n < MIN_GOOD_SCORES:
        return f"the calibration holds {n} good image scores; drift watch needs at least {MIN_GOOD_SCORES}"
    j, k = band_indices(n, quantile)
    p0 = beta_ppf(confidence, 2 * j, k - j)
    p1 = min(max(detect_rate, 2 * p0), 0.99)
    if p1 <= p0:
        return f"the outside rate is bounded only at {p0:.2f} with {n} good scores: recalibrate with more parts"
    up, down, unit = lattice_steps(p0, p1)
    warn_at, warn_arl = threshold_for_arl(p0, up, down, warn_arl0)
    alarm_at, alarm_arl = threshold_for_arl(p0, up, down, max(alarm_arl0, warn_arl0))
    low, high = float(scores[j - 1]), float(scores[k - 1])
    return DriftDesign(n, low, high, p0, p1, up, down, unit, warn_at, alarm_at, warn_arl, alarm_arl)


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class DriftWatch:
    """One camera's CUSUM. `update` is called from the publishing thread, `snapshot` from the main thread."""

    def __init__(self, plan: DriftDesign | str):
        self.design = plan if isinstance(plan, DriftDesign) else None
        self.reason = plan if isinstance(plan, str) else None
        self._lock = threading.Lock()
        self.statistic = 0  # lattice units
        self.parts = 0
        self.above = 0  # parts outside the band, by side: tells the operator which way scores moved
        self.below = 0
        self.state = OK if self.design is not None else UNAVAILABLE
        self.since = _now_iso()

    def update(self, score: float) -> tuple[str, str] | None:
        """Count one scored part; (old state, new state) when this part changed it."""
        d = self.design
        if d is None or not math.isfinite(score):
            return None
        with self._lock:
            self.parts += 1
            if score > d.high or score < d.low:
                if score > d.high:
                    self.above += 1
                else:
                    self.below += 1
                self.statistic += d.up
            else:
                self.statistic = max(0, self.statistic - d.down)
            old = self.state
            if old == ALARM or self.statistic >= d.alarm_at:
                new = ALARM
            elif self.statistic >= d.warn_at or (old == WARN and self.statistic > 0):
                new = WARN
            else:
                new = OK
            if new == old:
                return None
            self.state, self.since = new, _now_iso()
            return old, new

    def snapshot(self) -> dict[str, Any]:
        """The status topic's `drift` field."""
        d = self.design
        with self._lock:
            if d is None:
                return {"state": UNAVAILABLE, "reason": self.reason, "since": self.since}
            return {
                "state": self.state,
                "statistic": round(self.statistic * d.unit, 3),
                "warn_at": round(d.warn_at * d.unit, 3),
                "alarm_at": round(d.alarm_at * d.unit, 3),
                "since": self.since,
                "parts": self.parts,
                "above": self.above,
                "below": self.below,
                "band": [d.low, d.high],
                "warn_arl0": round(d.warn_arl0),
                "alarm_arl0": round(d.alarm_arl0),
                "advice": None if self.state == OK else ADVICE,
            }

    def gauge(self) -> tuple[int, float]:
        """(state code, statistic in nats; NaN when unavailable) for Prometheus."""
        d = self.design
        with self._lock:
            return STATE_CODES[self.state], (math.nan if d is None else self.statistic * d.unit)
