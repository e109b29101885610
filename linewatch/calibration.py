"""Thresholds from good samples, the calibration file format, its history and rollback (torch-free, no scipy).

The maths is small pure functions (exact empirical quantiles, sample-size rule, Clopper-Pearson bounds); the file
side keeps `calibration.json` atomic (temp + fsync + rename), versioned and validated against the bundle's graph.
The format, the rules and when to recalibrate are documented in docs/CALIBRATION.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from . import bundle
from .errors import BundleError

log = logging.getLogger("linewatch.calibration")

SCHEMA = "linewatch-calibration"
SCHEMA_VERSION = 1
# Independent units per good image for the sample-size rule and the holdout bound: anomaly maps are smooth
# (a 4-pixel regional grid seen through receptive fields of 100+ pixels, then upsampled), so neighbouring pixels
# are nowhere near independent. A 4x4 grid of blocks per image is the assumed unit (docs/CALIBRATION.md).
REGIONS_PER_IMAGE = 16
MIN_CALIBRATION_IMAGES = 4
HISTORY_NAME = re.compile(r"^calibration_v(\d+)\.json$")


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
        raise ValueError(f"{what}: {n_nan} NaN and {n_inf} inf value(s) among {flat.size} scores "
                         "(the model produced non-finite output; fix the model/input before calibrating)")
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


def min_samples_for_fpr(fpr: float, regions_per_image: int = REGIONS_PER_IMAGE, min_exceedances: int = 1,
                        min_images: int = MIN_CALIBRATION_IMAGES) -> int:
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


def check_enough_samples(n_images: int, fpr: float, what: str = "pixel",
                         regions_per_image: int = REGIONS_PER_IMAGE) -> None:
    """Raise ValueError with the numbers when `n_images` cannot support a threshold at `fpr`."""
    needed = min_samples_for_fpr(fpr, regions_per_image)
    if n_images < needed:
        unit = f"{regions_per_image} independent regions per image" if regions_per_image > 1 else "one per image"
        raise ValueError(
            f"too few samples for a {what} false-positive rate of {fpr:g}: it needs at least {needed} calibration "
            f"images ({unit}, at least one expected false positive at that rate), got {n_images}; "
            f"give more good images or ask for a higher rate")


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
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
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
    var_cluster = m / (m - 1) * float(((k - p * pixels_per_image) ** 2).sum()) / n_total ** 2
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

    def as_dict(self) -> dict:
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


# --- file format --------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Calibration:
    """The thresholds a bundle is judged with, plus how they were obtained (docs/CALIBRATION.md)."""

    version: int
    model_sha256: str
    pixel_threshold: float
    image_threshold: float | None = None
    min_defect_area: int = 0
    created: str = field(default_factory=_now)
    fpr_target: float | None = None
    image_fpr_target: float | None = None
    n_samples: int = 0
    n_holdout: int = 0
    holdout_pixel_fpr: dict | None = None
    holdout_image_fpr: dict | None = None
    settings: dict = field(default_factory=dict)
    previous_version: int | None = None
    restored_version: int | None = None
    rolled_back_from: int | None = None
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        head = {"schema": data.pop("schema"), "schema_version": data.pop("schema_version")}
        return {**head, **data}


_FIELDS = {f.name: f for f in dataclasses.fields(Calibration)}
_REQUIRED = ("schema", "schema_version", "version", "created", "model_sha256", "pixel_threshold",
             "image_threshold", "min_defect_area")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def calibration_from_dict(data: dict, source: str | Path) -> Calibration:
    """Validate a parsed calibration file; every problem names the file and the key."""
    def bad(msg: str) -> BundleError:
        return BundleError(f"{source}: {msg}")

    if data.get("schema") != SCHEMA:
        raise bad(f"not a linewatch calibration (schema={data.get('schema')!r}, expected {SCHEMA!r})")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise bad(f"unsupported schema_version {data.get('schema_version')!r} (this linewatch reads "
                  f"{SCHEMA_VERSION}); recalibrate with this version")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise bad(f"missing key(s) {', '.join(missing)}")
    if not _is_int(data["version"]) or data["version"] < 1:
        raise bad(f"'version' must be an integer >= 1, got {data['version']!r}")
    if not isinstance(data["model_sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", data["model_sha256"]):
        raise bad("'model_sha256' must be 64 lowercase hex digits")
    if not isinstance(data["created"], str) or not data["created"]:
        raise bad("'created' must be an ISO-8601 string")
    if not _is_real(data["pixel_threshold"]):
        raise bad(f"'pixel_threshold' must be a finite number, got {data['pixel_threshold']!r}")
    if data["image_threshold"] is not None and not _is_real(data["image_threshold"]):
        raise bad(f"'image_threshold' must be a finite number or null, got {data['image_threshold']!r}")
    if not _is_int(data["min_defect_area"]) or data["min_defect_area"] < 0:
        raise bad(f"'min_defect_area' must be an integer >= 0, got {data['min_defect_area']!r}")
    for key in ("fpr_target", "image_fpr_target"):
        if data.get(key) is not None and not (_is_real(data[key]) and 0 <= data[key] < 1):
            raise bad(f"'{key}' must be a rate in [0, 1) or null, got {data[key]!r}")
    for key in ("n_samples", "n_holdout"):
        if key in data and not (_is_int(data[key]) and data[key] >= 0):
            raise bad(f"'{key}' must be an integer >= 0, got {data[key]!r}")
    for key in ("previous_version", "restored_version", "rolled_back_from"):
        if data.get(key) is not None and not (_is_int(data[key]) and data[key] >= 1):
            raise bad(f"'{key}' must be an integer >= 1 or null, got {data[key]!r}")
    for key in ("holdout_pixel_fpr", "holdout_image_fpr"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise bad(f"'{key}' must be an object or null")
    if "settings" in data and not isinstance(data["settings"], dict):
        raise bad("'settings' must be an object")
    # keys unknown to this version are additive fields of a newer writer: ignored (schema_version guards breaks)
    values = {k: v for k, v in data.items() if k in _FIELDS}
    values["pixel_threshold"] = float(values["pixel_threshold"])
    if values["image_threshold"] is not None:
        values["image_threshold"] = float(values["image_threshold"])
    return Calibration(**values)


def bundle_graph(bundle_dir: str | Path, precision: str = "fp32") -> tuple[str, dict]:
    """(sha256 of the bundle's graph of that precision, the metadata's whole 'graph' section).

    Thresholds bind to the graph that computed them: an int8 graph's scores differ from fp32's by up to a few
    per cent of the range, enough to move a false-positive rate set at 0.5 %."""
    _, sha_key, how = bundle.PRECISIONS[bundle.check_precision(precision)]
    graph = bundle.read_metadata(bundle_dir).get("graph") or {}
    sha = graph.get(sha_key)
    if not isinstance(sha, str) or not sha:
        raise BundleError(f"{Path(bundle_dir) / bundle.METADATA}: no graph.{sha_key}: the bundle has no {precision} "
                          f"graph (run {how} before calibrating)")
    return sha, graph


def graph_sha256(bundle_dir: str | Path, precision: str = "fp32") -> str:
    """sha256 of the bundle's graph of that precision: the model a calibration belongs to."""
    return bundle_graph(bundle_dir, precision)[0]


def read_calibration_file(path: str | Path, expected_sha256: str | None, precision: str = "fp32",
                          graph: dict | None = None) -> Calibration:
    """A validated calibration file; with expected_sha256, refused unless it was set with that graph."""
    path = Path(path)
    cal = calibration_from_dict(bundle.read_json(path, "calibration"), path)
    if expected_sha256 is not None and cal.model_sha256 != expected_sha256:
        other = [p for p, (_, key, _) in bundle.PRECISIONS.items() if (graph or {}).get(key) == cal.model_sha256]
        if other:
            raise BundleError(f"{path}: thresholds were set with the bundle's {other[0]} graph, but the model runs "
                              f"its {precision} graph: run linewatch calibrate --precision {precision}")
        raise BundleError(f"{path}: calibrated for model {cal.model_sha256[:12]}, but the bundle's {precision} graph "
                          f"is {expected_sha256[:12]} (re-exported or replaced model): recalibrate")
    return cal


def load_calibration(bundle_dir: str | Path, precision: str = "fp32") -> Calibration:
    """The bundle's current calibration, validated against the schema and the hash of the graph that runs."""
    bundle_dir = Path(bundle_dir)
    sha, graph = bundle_graph(bundle_dir, precision)
    return read_calibration_file(bundle_dir / bundle.CALIBRATION, sha, precision, graph)


def history_dir(bundle_dir: str | Path) -> Path:
    return Path(bundle_dir) / bundle.CALIBRATION_HISTORY


def history_path(bundle_dir: str | Path, version: int) -> Path:
    return history_dir(bundle_dir) / f"calibration_v{version:06d}.json"


def history_versions(bundle_dir: str | Path) -> list[int]:
    folder = history_dir(bundle_dir)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := HISTORY_NAME.match(p.name)))


def current_version(bundle_dir: Path) -> int | None:
    """Version of the current file if it parses at all (hash not checked: the number still must not repeat)."""
    try:
        v = json.loads((bundle_dir / bundle.CALIBRATION).read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        return None
    return v if _is_int(v) and v >= 1 else None


def next_version(bundle_dir: str | Path) -> int:
    """One above every version the bundle has seen, so the daemon always sees a new calibration as new."""
    bundle_dir = Path(bundle_dir)
    seen = history_versions(bundle_dir) + [v for v in [current_version(bundle_dir)] if v is not None]
    return max(seen, default=0) + 1


def _archive_current(bundle_dir: Path) -> None:
    """Copy the current file into the history before it is replaced (a copy, so calibration.json never vanishes)."""
    current = bundle_dir / bundle.CALIBRATION
    if not current.is_file():
        return
    data = current.read_bytes()
    version = current_version(bundle_dir)
    if version is None:
        target = history_dir(bundle_dir) / f"invalid_{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}.json"
        log.warning("current %s is not a valid calibration; kept as %s", current, target)
    else:
        target = history_path(bundle_dir, version)
        if target.is_file() and target.read_bytes() == data:
            return
    bundle.atomic_write_bytes(target, data)


def save_calibration(bundle_dir: str | Path, cal: Calibration) -> Path:
    """Archive the current calibration, then atomically replace it with `cal` (validated before writing)."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / bundle.CALIBRATION
    data = cal.to_dict()
    calibration_from_dict(json.loads(json.dumps(data)), f"{path} (about to be written)")
    current = current_version(bundle_dir)
    if current is not None and cal.version <= current:
        raise BundleError(f"{path}: new calibration version {cal.version} must be above the current {current}")
    _archive_current(bundle_dir)
    bundle.atomic_write_json(path, data)
    log.info("calibration v%d written to %s", cal.version, path)
    return path


def write_calibration(bundle_dir: str | Path, pixel_threshold: float, image_threshold: float | None = None,
                      min_defect_area: int = 0, precision: str = "fp32", **fields: Any) -> Calibration:
    """Write set thresholds (e.g. chosen by hand or by a test) as the next version of the bundle's calibration."""
    bundle_dir = Path(bundle_dir)
    fields.setdefault("settings", {"source_kind": "manual"})
    cal = Calibration(version=next_version(bundle_dir), model_sha256=graph_sha256(bundle_dir, precision),
                      pixel_threshold=float(pixel_threshold),
                      image_threshold=None if image_threshold is None else float(image_threshold),
                      min_defect_area=int(min_defect_area), previous_version=current_version(bundle_dir), **fields)
    save_calibration(bundle_dir, cal)
    return cal


def rollback(bundle_dir: str | Path, precision: str = "fp32") -> Calibration:
    """Restore the calibration that was active before the current one, under a new version number.

    The restored file keeps the old thresholds and statistics, gets version = next_version (so a running daemon
    sees a change), `restored_version` = the version it copies and `rolled_back_from` = the version it replaces.
    Its `previous_version` is the restored one's, so repeated rollbacks walk further back in time.
    """
    bundle_dir = Path(bundle_dir)
    sha, graph = bundle_graph(bundle_dir, precision)
    current = read_calibration_file(bundle_dir / bundle.CALIBRATION, sha, precision, graph)
    if current.previous_version is None:
        raise BundleError(f"{bundle_dir / bundle.CALIBRATION}: version {current.version} has no earlier "
                          "calibration to roll back to")
    source = history_path(bundle_dir, current.previous_version)
    if not source.is_file():
        raise BundleError(f"cannot roll back: {source} (version {current.previous_version}) is missing")
    old = read_calibration_file(source, sha, precision, graph)
    restored = dataclasses.replace(old, version=next_version(bundle_dir), restored_version=old.version,
                                   rolled_back_from=current.version)
    save_calibration(bundle_dir, restored)
    return restored
