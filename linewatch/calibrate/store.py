"""The calibration file: `calibration.json` format, validation against the bundle's graph, history and rollback.

Writes are atomic (temp + fsync + rename) and versioned, so a reload never reads half a file and every earlier
calibration can be restored. The format is documented in docs/CALIBRATION.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from linewatch import bundle
from linewatch.errors import BundleError

log = logging.getLogger("linewatch.calibrate.store")

SCHEMA = "linewatch-calibration"
SCHEMA_VERSION = 1
HISTORY_NAME = re.compile(r"^calibration_v(\d+)\.json$")


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
_REQUIRED = (
    "schema",
    "schema_version",
    "version",
    "created",
    "model_sha256",
    "pixel_threshold",
    "image_threshold",
    "min_defect_area",
)


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
        raise bad(
            f"unsupported schema_version {data.get('schema_version')!r} (this linewatch reads "
            f"{SCHEMA_VERSION}); recalibrate with this version"
        )
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
        raise BundleError(
            f"{Path(bundle_dir) / bundle.METADATA}: no graph.{sha_key}: the bundle has no {precision} "
            f"graph (run {how} before calibrating)"
        )
    return sha, graph


def graph_sha256(bundle_dir: str | Path, precision: str = "fp32") -> str:
    """sha256 of the bundle's graph of that precision: the model a calibration belongs to."""
    return bundle_graph(bundle_dir, precision)[0]


def read_calibration_file(
    path: str | Path, expected_sha256: str | None, precision: str = "fp32", graph: dict | None = None
) -> Calibration:
    """A validated calibration file; with expected_sha256, refused unless it was set with that graph."""
    path = Path(path)
    cal = calibration_from_dict(bundle.read_json(path, "calibration"), path)
    if expected_sha256 is not None and cal.model_sha256 != expected_sha256:
        other = [p for p, (_, key, _) in bundle.PRECISIONS.items() if (graph or {}).get(key) == cal.model_sha256]
        if other:
            raise BundleError(
                f"{path}: thresholds were set with the bundle's {other[0]} graph, but the model runs "
                f"its {precision} graph: run linewatch calibrate --precision {precision}"
            )
        raise BundleError(
            f"{path}: calibrated for model {cal.model_sha256[:12]}, but the bundle's {precision} graph "
            f"is {expected_sha256[:12]} (re-exported or replaced model): recalibrate"
        )
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


def write_calibration(
    bundle_dir: str | Path,
    pixel_threshold: float,
    image_threshold: float | None = None,
    min_defect_area: int = 0,
    precision: str = "fp32",
    **fields: Any,
) -> Calibration:
    """Write set thresholds (e.g. chosen by hand or by a test) as the next version of the bundle's calibration."""
    bundle_dir = Path(bundle_dir)
    fields.setdefault("settings", {"source_kind": "manual"})
    cal = Calibration(
        version=next_version(bundle_dir),
        model_sha256=graph_sha256(bundle_dir, precision),
        pixel_threshold=float(pixel_threshold),
        image_threshold=None if image_threshold is None else float(image_threshold),
        min_defect_area=int(min_defect_area),
        previous_version=current_version(bundle_dir),
        **fields,
    )
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
        raise BundleError(
            f"{bundle_dir / bundle.CALIBRATION}: version {current.version} has no earlier calibration to roll back to"
        )
    source = history_path(bundle_dir, current.previous_version)
    if not source.is_file():
        raise BundleError(f"cannot roll back: {source} (version {current.previous_version}) is missing")
    old = read_calibration_file(source, sha, precision, graph)
    restored = dataclasses.replace(
        old, version=next_version(bundle_dir), restored_version=old.version, rolled_back_from=current.version
    )
    save_calibration(bundle_dir, restored)
    return restored
