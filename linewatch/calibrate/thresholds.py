"""Thresholds from good samples: exact quantiles, the sample-size rule, realised-rate bounds (torch-free, no scipy).

Small pure functions, so each can be checked against brute force; the rules and when to recalibrate are documented
in docs/CALIBRATION.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction
from statistics import NormalDist

import cv2
import numpy as np

# Independent units per good image for the sample-size rule and the holdout bound: anomaly maps are smooth
# (a 4-pixel regional grid seen through receptive fields of 100+ pixels, then upsampled), so neighbouring pixels
# are nowhere near independent. A 4x4 grid of blocks per image is the assumed unit (docs/CALIBRATION.md).
REGIONS_PER_IMAGE = 16
MIN_CALIBRATION_IMAGES = 4


# --- maths --------------------------------------------------------------------------------------------------


def check_finite_scores(scores: np.ndarray, what: str = "scores") -> np.ndarray:
    """Scores as a flat float array; NaN/inf mean the model failed, so they are refused, never ignored."""
    flat = np.asarray(scores).ravel()
    if flat.size == 0:
        raise ValueError(f"{what}: no scores given")
    if not np.issubdtype(flat.dtype, np.floating) and not np.issubdtype(flat.dtype, np.integer):
        raise ValueError(f"{what}: scores must be numbers, got dtype {flat.dtype}")
    finite = np.isfinite(flat)
    if not finite.all():
        n_nan = int(np.isnan(flat).sum())
        n_inf = int(flat.size - finite.sum()) - n_nan
        raise ValueError(
            f"{what}: {n_nan} NaN and {n_inf} inf value(s) among {flat.size} scores "
            "(the model produced non-finite output; fix the model/input before calibrating)"
        )
    return flat


def _exact(rate: float) -> Fraction:
    """The rate the user typed (0.3 means 3/10, not the binary float just below it)."""
    return Fraction(repr(float(rate)))


def allowed_exceedances(fpr: float, n: int) -> int:
    """Largest k with k/n <= fpr, computed exactly (no float rounding at k/n == fpr)."""
    if not (0.0 <= fpr < 1.0) or math.isnan(fpr):
        raise ValueError(f"false-positive rate must be in [0, 1), got {fpr}")
    return int(_exact(fpr) * n)  # floor of an exact rational


def pixel_threshold_for_fpr(scores: np.ndarray, fpr: float) -> float:
    """Lowest threshold t with (#scores > t) / n <= fpr, for the rule `score > t` used by the verdict.

    With s sorted ascending and k = floor(fpr·n) the answer is the order statistic s[n-1-k]: every lower value
    leaves at least k+1 scores above it. Ties at s[n-1-k] cannot be split, so fewer than k scores may lie above
    (the realised rate is then below fpr, never above). When k = 0 (fpr 0, or fpr < 1/n) the threshold is the next
    float above the maximum (in the scores' precision, float32 for anomaly maps), so no sample is flagged whichever
    comparison a consumer uses.
    """
    flat = check_finite_scores(scores)
    n = flat.size
    k = allowed_exceedances(fpr, n)
    if k == 0:
        # next float in the scores' own precision: NumPy compares float32 maps with a Python float in float32
        top = flat.max() if np.issubdtype(flat.dtype, np.floating) else np.float64(flat.max())
        return float(np.nextafter(top, top.dtype.type(np.inf)))
    idx = n - 1 - k
    return float(np.partition(flat, idx)[idx])


def exceedance_rate(scores: np.ndarray, threshold: float) -> float:
    flat = np.asarray(scores).ravel()
    return float(np.count_nonzero(flat > threshold)) / flat.size


def min_samples_for_fpr(
    fpr: float,
    regions_per_image: int = REGIONS_PER_IMAGE,
    min_exceedances: int = 1,
    min_images: int = MIN_CALIBRATION_IMAGES,
) -> int:
    """Images needed to set a threshold at `fpr`: at least `min_exceedances` expected independent exceedances.

    Pixels of one image are strongly correlated, so the unit is an image region (`regions_per_image` per image;
    1 for image-score thresholds): n_images * regions_per_image * fpr >= min_exceedances. Below that the threshold
    is an extrapolation past the largest independent observation and the rate cannot be promised.
    fpr 0 asks for "above everything seen", which needs only `min_images`.
    """
    if not (0.0 <= fpr < 1.0):
        raise ValueError(f"false-positive rate must be in [0, 1), got {fpr}")
    if regions_per_image < 1 or min_exceedances < 1 or min_images < 1:
        raise ValueError("regions_per_image, min_exceedances and min_images must be >= 1")
    if fpr == 0.0:
        return min_images
    needed = math.ceil(Fraction(min_exceedances) / (_exact(fpr) * regions_per_image))
    return max(min_images, needed)


def check_enough_samples(
    n_images: int, fpr: float, what: str = "pixel", regions_per_image: int = REGIONS_PER_IMAGE
) -> None:
    """Raise ValueError with the numbers when `n_images` cannot support a threshold at `fpr`."""
    needed = min_samples_for_fpr(fpr, regions_per_image)
    if n_images < needed:
        unit = f"{regions_per_image} independent regions per image" if regions_per_image > 1 else "one per image"
        raise ValueError(
            f"too few samples for a {what} false-positive rate of {fpr:g}: it needs at least {needed} calibration "
            f"images ({unit}, at least one expected false positive at that rate), got {n_images}; "
            f"give more good images or ask for a higher rate"
        )


def _betacf(a: float, b: float, x: float, max_iter: int = 100000, eps: float = 1e-15) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            delta = c * d
            h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def beta_cdf(x: float, a: float, b: float) -> float:
    """Regularised incomplete beta I_x(a, b) for real a, b > 0."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """Inverse of beta_cdf by bisection (monotone, so it always converges)."""
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if beta_cdf(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def fpr_confidence_bound(k: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval (lower, upper) for a rate with k events in n trials.

    k and n may be non-integer (effective counts of correlated pixels, see effective_pixel_count); the beta
    quantile form of Clopper-Pearson is defined for real arguments.
    """
    if not (0.0 < confidence < 1.0):
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not (n > 0) or not (0 <= k <= n):
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    alpha = 1.0 - confidence
    lower = 0.0 if k == 0 else beta_ppf(alpha / 2, k, n - k + 1)
    upper = 1.0 if k == n else beta_ppf(1 - alpha / 2, k + 1, n - k)
    return lower, upper


def t_quantile(q: float, dof: float) -> float:
    """Student-t quantile for q in (0.5, 1), via the incomplete beta (no scipy at runtime)."""
    x = beta_ppf(2.0 * (1.0 - q), dof / 2.0, 0.5)
    return math.sqrt(dof * (1.0 - x) / x)


def effective_pixel_count(exceed_per_image: np.ndarray, pixels_per_image: int, confidence: float = 0.95) -> float:
    """Effective number of independent pixels from the spread of per-image exceedance counts.

    Cluster-robust (ratio-estimator) variance of the pooled rate over images, turned into the binomial sample
    size with the same variance, shrunk by (z/t)^2 with m-1 degrees of freedom because that variance is itself
    estimated from only m images, and clipped to [n_images, n_pixels]: i.i.d. pixels give ~n_pixels, maps whose
    false positives come in blobs give far fewer. No exceedances at all (or a single image) carry no spread to
    measure: then each image counts once, the most conservative choice.
    """
    k = np.asarray(exceed_per_image, np.float64)
    m = k.size
    n_total = float(m * pixels_per_image)
    p = k.sum() / n_total
    if m < 2 or p <= 0.0 or p >= 1.0:
        return float(m)
    var_cluster = m / (m - 1) * float(((k - p * pixels_per_image) ** 2).sum()) / n_total**2
    if var_cluster <= 0.0:
        return n_total
    q = 0.5 + confidence / 2.0
    z, t = NormalDist().inv_cdf(q), t_quantile(q, m - 1)
    n_eff = p * (1.0 - p) / var_cluster * (z / t) ** 2
    return float(min(max(n_eff, m), n_total))


@dataclass(frozen=True)
class RealisedRate:
    """A false-positive rate measured on held-out good samples, with its Clopper-Pearson interval."""

    rate: float
    lower: float
    upper: float
    n_effective: float
    confidence: float

    def misses(self, target: float) -> bool:
        return not (self.lower <= target <= self.upper)

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def realised_pixel_fpr(maps: np.ndarray, threshold: float, confidence: float = 0.95) -> RealisedRate:
    maps = np.asarray(maps)
    m = maps.shape[0]
    pixels = int(np.prod(maps.shape[1:]))
    exceed = np.count_nonzero(maps.reshape(m, -1) > threshold, axis=1)
    rate = float(exceed.sum()) / (m * pixels)
    n_eff = effective_pixel_count(exceed, pixels, confidence)
    lower, upper = fpr_confidence_bound(rate * n_eff, n_eff, confidence)
    return RealisedRate(rate, lower, upper, n_eff, confidence)


def realised_image_fpr(scores: np.ndarray, threshold: float, confidence: float = 0.95) -> RealisedRate:
    scores = np.asarray(scores).ravel()
    k = int(np.count_nonzero(scores > threshold))
    lower, upper = fpr_confidence_bound(k, scores.size, confidence)
    return RealisedRate(k / scores.size, lower, upper, float(scores.size), confidence)


def holdout_split(n: int, holdout: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(calibration indices, holdout indices), a seeded shuffle so a rerun on the same images is identical."""
    if not (0.0 <= holdout < 1.0):
        raise ValueError(f"holdout fraction must be in [0, 1), got {holdout}")
    n_hold = int(round(holdout * n))
    if holdout > 0 and n >= 2:
        n_hold = min(max(n_hold, 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


# --- part level: the rate the line feels ----------------------------------------------------------------------

# Modified z-score cut for calibration images that look defective (Iglewicz & Hoaglin's 3.5 for outliers).
OUTLIER_Z = 3.5
MAD_TO_SIGMA = 0.6745  # z = 0.6745 (x - median) / MAD is ~N(0, 1) for a normal bulk


def part_fails(anomaly_map: np.ndarray, threshold: float, min_area: int) -> bool:
    """The daemon's pixel rule (linewatch.line.verdict.judge): a region of `map > t`, 8-connected, >= max(1, A) px."""
    mask = np.asarray(anomaly_map) > threshold
    if not mask.any():
        return False
    need = max(1, int(min_area))
    if need == 1:
        return True
    _, _, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    return bool(stats[1:, cv2.CC_STAT_AREA].max() >= need)


def part_critical_value(anomaly_map: np.ndarray, min_area: int) -> float:
    """The smallest threshold t at which the part passes the pixel rule: it fails at every t below, passes at every
    t at or above (superlevel sets are nested, so regions only grow as t falls).

    It is one of the map's own values (between two values the mask does not change), found by bisection over the
    sorted distinct values: about log2(#values) connected-component passes, 16 for a 256² map."""
    values = np.unique(np.asarray(anomaly_map))
    if max(1, int(min_area)) == 1:
        return float(values[-1])  # any pixel above fails the part: only t >= max passes
    lo, hi = 0, values.size - 1  # invariant: passes at values[hi]; answer in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if part_fails(anomaly_map, float(values[mid]), min_area):
            lo = mid + 1
        else:
            hi = mid
    return float(values[hi])


def part_critical_values(maps: np.ndarray, min_area: int) -> np.ndarray:
    """part_critical_value of each map, in the maps' precision (so thresholds compare as the daemon does)."""
    maps = np.asarray(maps)
    dtype = maps.dtype if np.issubdtype(maps.dtype, np.floating) else np.float64
    return np.array([part_critical_value(m, min_area) for m in maps], dtype=dtype)


def pixel_threshold_for_reject_rate(maps: np.ndarray, reject_rate: float, min_area: int) -> float:
    """Lowest pixel threshold at which at most floor(R·n) of the n good parts fail the daemon's pixel rule.

    A part fails at t exactly when t < its critical value c, so this is the exact quantile rule of
    pixel_threshold_for_fpr applied to the parts' critical values (ties and R·n < 1 handled as there)."""
    return pixel_threshold_for_fpr(part_critical_values(check_maps(maps), min_area), reject_rate)


def check_maps(maps: np.ndarray) -> np.ndarray:
    maps = np.asarray(maps)
    if maps.ndim != 3 or maps.shape[0] == 0:
        raise ValueError(f"anomaly maps must be N×H×W with N >= 1, got shape {maps.shape}")
    check_finite_scores(maps, "anomaly maps")
    return maps


def min_parts_for_rate(reject_rate: float, min_images: int = MIN_CALIBRATION_IMAGES) -> int:
    """Calibration parts needed for a part reject rate R: ceil(1/R) (one expected reject), at least `min_images`."""
    return min_samples_for_fpr(reject_rate, regions_per_image=1, min_images=min_images)


def check_enough_parts(n_parts: int, reject_rate: float) -> None:
    """Raise ValueError with the numbers when `n_parts` good parts cannot support a part reject rate R."""
    needed = min_parts_for_rate(reject_rate)
    if n_parts < needed:
        raise ValueError(
            f"too few samples for a part reject rate of {reject_rate:g}: it needs at least {needed} calibration "
            f"parts (one part per image, at least one expected reject at that rate), got {n_parts}; "
            f"give more good images or ask for a higher rate"
        )


def realised_part_rate(nok: np.ndarray, confidence: float = 0.95) -> RealisedRate:
    """Share of parts judged NOK (a bool per part) with its Clopper-Pearson interval: parts are independent."""
    flags = np.asarray(nok, bool).ravel()
    if flags.size == 0:
        raise ValueError("no parts to measure a reject rate on")
    k = int(np.count_nonzero(flags))
    lower, upper = fpr_confidence_bound(k, flags.size, confidence)
    return RealisedRate(k / flags.size, lower, upper, float(flags.size), confidence)


def min_area_for_reject_rate(maps: np.ndarray, threshold: float, reject_rate: float) -> int:
    """Smallest minimum defect area at which at most floor(R·n) of these good parts fail at pixel threshold t.

    Each part's largest region above t is a_i; the part fails with area A exactly when a_i >= A, so A is one more
    than the exact quantile of the a_i (never below 1)."""
    largest = np.array([largest_region(m, threshold) for m in check_maps(maps)], np.float64)
    k = allowed_exceedances(reject_rate, largest.size)
    if k == 0:
        return int(largest.max()) + 1
    idx = largest.size - 1 - k
    return max(1, int(np.partition(largest, idx)[idx]) + 1)


def largest_region(anomaly_map: np.ndarray, threshold: float) -> int:
    mask = np.asarray(anomaly_map) > threshold
    if not mask.any():
        return 0
    _, _, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    return int(stats[1:, cv2.CC_STAT_AREA].max())


# --- contamination: calibration images that are not good ----------------------------------------------------------


@dataclass(frozen=True)
class Outlier:
    """A calibration image whose score says it is probably not a good part."""

    index: int
    score: float
    z: float
    why: str


def log_scores(scores: np.ndarray) -> np.ndarray:
    """Image scores on a log scale (defects multiply the score); zeros are kept finite."""
    flat = np.asarray(scores, np.float64).ravel()
    floor = max(float(np.abs(flat).max()) * 1e-9, 1e-12) if flat.size else 1e-12
    return np.log(np.maximum(flat, floor))


def robust_z(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Modified z-scores of `values` against `reference`: 0.6745 (x - median) / MAD.

    A MAD of 0 (over half the reference equal) falls back to 1.2533 × the mean absolute deviation; if that is 0
    too, anything above the constant bulk is infinitely far and anything at it is 0."""
    ref = np.asarray(reference, np.float64)
    med = float(np.median(ref))
    mad = float(np.median(np.abs(ref - med)))
    diff = np.asarray(values, np.float64) - med
    if mad > 0:
        return MAD_TO_SIGMA * diff / mad
    mean_ad = float(np.mean(np.abs(ref - med)))
    if mean_ad > 0:
        return diff / (1.2533 * mean_ad)
    return np.where(diff > 0, np.inf, 0.0)


def contamination_outliers(
    scores: np.ndarray, previous: np.ndarray | None = None, cut: float = OUTLIER_Z
) -> tuple[list[Outlier], str | None]:
    """Images whose log image score lies more than `cut` robust z above the bulk of this batch, or above the good
    image scores of the previous calibration (`previous`), and a note when the whole batch moved.

    Only high scores are flagged (a defect raises the score). Median and MAD stand up to just under half the
    batch being defective. The comparison with the previous calibration catches a batch so contaminated that its
    own bulk is off; when most of the batch lies above the previous distribution, the good parts themselves have
    changed (new lighting, new material: the reason to recalibrate), so those are not excluded, only noted."""
    flat = check_finite_scores(scores, "image scores")
    logs = log_scores(flat)
    z_bulk = robust_z(logs, logs)
    flagged: dict[int, Outlier] = {
        int(i): Outlier(int(i), float(flat[i]), float(z_bulk[i]), f"robust z {z_bulk[i]:.1f} > {cut:g} above the batch")
        for i in np.flatnonzero(z_bulk > cut)
    }
    note = None
    if previous is not None and np.asarray(previous).size >= MIN_CALIBRATION_IMAGES:
        z_prev = robust_z(logs, log_scores(np.asarray(previous)))
        above = z_prev > cut
        if np.count_nonzero(above) * 2 > flat.size:
            note = (
                f"{int(np.count_nonzero(above))} of {flat.size} images score above the previous calibration's good "
                f"parts (robust z > {cut:g}): the good parts look different now (lighting, material, camera?); "
                "not excluded as defects"
            )
        else:
            for i in np.flatnonzero(above):
                if int(i) not in flagged:
                    flagged[int(i)] = Outlier(
                        int(i),
                        float(flat[i]),
                        float(z_prev[i]),
                        f"robust z {z_prev[i]:.1f} > {cut:g} above the previous calibration's good parts",
                    )
    return [flagged[i] for i in sorted(flagged)], note
