"""The calibration file: `calibration.json` format, validation against the bundle's graph, history and rollback.

Writes are atomic (temp + fsync + rename) and versioned, so a reload never reads half a file and every earlier
calibration can be restored. The format is documented in docs/CALIBRATION.md.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, ConfigDict, Field, StrictInt, StrictStr, ValidationInfo, model_validator

from linewatch import bundle
from linewatch.errors import BundleError
from linewatch.validation import Problem, TolerantModel, expected, validate

log = logging.getLogger("linewatch.calibrate.store")

SchemaName = Literal["linewatch-calibration"]
SchemaVersion = Literal[1]
SCHEMA: SchemaName = "linewatch-calibration"
SCHEMA_VERSION: SchemaVersion = 1
HISTORY_NAME = re.compile(r"^calibration_v(\d+)\.json$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def _sha256_hex(value: str) -> str:
    if not SHA256_HEX.match(value):
        raise expected("64 lowercase hex digits (the graph's sha256)", value)
    return value


# --- file format --------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Rate = Annotated[FiniteFloat, Field(ge=0, lt=1)]
Version = Annotated[StrictInt, Field(ge=1)]
Count = Annotated[StrictInt, Field(ge=0)]
# fpr: the pixel threshold holds a pixel false-positive rate; reject_rate: it holds a part reject rate under the
# daemon's verdict rule; manual: set by hand (write_calibration)
Mode = Literal["fpr", "reject_rate", "manual"]

# keys a file must spell out even where code may leave them to a default: a reader must not guess a threshold
FILE_KEYS = (
    "schema",
    "schema_version",
    "version",
    "created",
    "model_sha256",
    "pixel_threshold",
    "image_threshold",
    "min_defect_area",
)


class Calibration(TolerantModel):
    """The thresholds a bundle is judged with, plus how they were obtained (docs/CALIBRATION.md).

    Tolerant: keys unknown to this version are additive fields of a newer writer and are ignored
    (schema_version guards breaking changes)."""

    model_config = ConfigDict(protected_namespaces=())

    schema_name: SchemaName = Field(SCHEMA, alias="schema")  # "schema" would shadow BaseModel.schema()
    schema_version: SchemaVersion = SCHEMA_VERSION
    version: Version
    model_sha256: Annotated[StrictStr, AfterValidator(_sha256_hex)]
    pixel_threshold: FiniteFloat
    image_threshold: Union[FiniteFloat, None] = None
    min_defect_area: Count = 0
    created: StrictStr = Field(default_factory=_now, min_length=1)
    fpr_target: Union[Rate, None] = None
    image_fpr_target: Union[Rate, None] = None
    n_samples: Count = 0
    n_holdout: Count = 0
    holdout_pixel_fpr: Union[dict[str, Any], None] = None
    holdout_image_fpr: Union[dict[str, Any], None] = None
    settings: dict[str, Any] = Field(default_factory=dict)
    previous_version: Union[Version, None] = None
    restored_version: Union[Version, None] = None
    rolled_back_from: Union[Version, None] = None
    # additive (older files load without them): how the pixel threshold was chosen, what the line feels
    mode: Union[Mode, None] = None
    reject_rate_target: Union[Rate, None] = None
    holdout_part_reject_rate: Union[dict[str, Any], None] = None
    good_image_scores: Union[list[FiniteFloat], None] = None  # sorted, of the good parts kept (contamination, drift)
    excluded: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def effective_mode(self) -> str:
        """`mode`, or for a file written before it existed: fpr when it has a pixel FPR target, else manual."""
        return self.mode or ("fpr" if self.fpr_target is not None else "manual")

    @model_validator(mode="before")
    @classmethod
    def _a_calibration_file(cls, data: Any, info: ValidationInfo) -> Any:
        """For a file (context file=True): ours, of our version and with FILE_KEYS spelled out, before anything
        else in it means something. Code that builds a Calibration may leave those keys to their defaults."""
        if not (info.context or {}).get("file") or not isinstance(data, dict):
            return data
        if data.get("schema") != SCHEMA:
            raise expected(f"{SCHEMA!r} (not a linewatch calibration)", data.get("schema"), ("schema",))
        version = data.get("schema_version")
        if type(version) is not int or version != SCHEMA_VERSION:
            raise Problem(
                f"unsupported schema_version {version!r} (this linewatch reads {SCHEMA_VERSION}); "
                "recalibrate with this version",
                ("schema_version",),
            )
        missing = [key for key in FILE_KEYS if key not in data]
        if missing:
            raise Problem("required key missing", (missing[0],))
        return data

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True)


def calibration_from_dict(data: dict[str, Any], source: str | Path) -> Calibration:
    """Validate a parsed calibration file; every problem names the file and the key."""
    return validate(Calibration, data, source, error=BundleError, context={"file": True})


def bundle_graph(bundle_dir: str | Path, precision: str = "fp32") -> tuple[str, dict[str, Any]]:
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
    path: str | Path, expected_sha256: str | None, precision: str = "fp32", graph: dict[str, Any] | None = None
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
        v = json.loads((bundle_dir / bundle.CALIBRATION).read_bytes()).get("version")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    return v if type(v) is int and v >= 1 else None


def next_version(bundle_dir: str | Path) -> int:
    """One above every version the bundle has seen, so the daemon always sees a new calibration as new."""
    bundle_dir = Path(bundle_dir)
    seen = history_versions(bundle_dir) + [v for v in [current_version(bundle_dir)] if v is not None]
    return max(seen, default=0) + 1


def _archive_current(bundle_dir: Path) -> None:
    """Copy the current file into the history before it is replaced (a copy, so calibration.json never vanishes).

    Only a valid calibration goes under its version's name, and never over a different file already there: the
    history is what rollback restores, so a corrupt or hand-edited current file must not replace a good entry.
    """
    current = bundle_dir / bundle.CALIBRATION
    if not current.is_file():
        return
    data = current.read_bytes()
    version = current_version(bundle_dir) if _is_calibration(data, current) else None
    target = None if version is None else history_path(bundle_dir, version)
    if target is not None and target.is_file() and target.read_bytes() == data:
        return
    if target is None or target.exists():
        target = history_dir(bundle_dir) / f"invalid_{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}.json"
        log.warning("current %s is not a calibration this bundle wrote; kept as %s", current, target)
    bundle.atomic_write_bytes(target, data)


def _is_calibration(data: bytes, source: Path) -> bool:
    """`data` is a calibration by this schema (the graph hash is not checked: an old graph's entry is history too)."""
    try:
        obj = json.loads(data)
        calibration_from_dict(obj if isinstance(obj, dict) else {}, source)
    except (ValueError, RecursionError, BundleError):
        return False
    return True


def save_calibration(bundle_dir: str | Path, cal: Calibration) -> Path:
    """Archive the current calibration, then atomically replace it with `cal` (validated before writing).

    The new version also goes into the history at once, so its number is taken for good: even if calibration.json
    is later damaged or replaced by hand, the next calibration gets a new number and a version never names two
    different calibrations.
    """
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / bundle.CALIBRATION
    data = cal.to_dict()
    calibration_from_dict(json.loads(json.dumps(data)), f"{path} (about to be written)")
    current = current_version(bundle_dir)
    if current is not None and cal.version <= current:
        raise BundleError(f"{path}: new calibration version {cal.version} must be above the current {current}")
    if cal.version in history_versions(bundle_dir):
        raise BundleError(f"{path}: calibration version {cal.version} is already in {history_dir(bundle_dir)}")
    _archive_current(bundle_dir)
    bundle.atomic_write_json(path, data)
    bundle.atomic_write_json(history_path(bundle_dir, cal.version), data)
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
    fields.setdefault("mode", "manual")
    values = dict(
        version=next_version(bundle_dir),
        model_sha256=graph_sha256(bundle_dir, precision),
        pixel_threshold=float(pixel_threshold),
        image_threshold=None if image_threshold is None else float(image_threshold),
        min_defect_area=int(min_defect_area),
        previous_version=current_version(bundle_dir),
        **fields,
    )
    cal = validate(Calibration, values, f"{bundle_dir / bundle.CALIBRATION} (about to be written)", BundleError)
    save_calibration(bundle_dir, cal)
    return cal


def rollback(bundle_dir: str | Path, precision: str = "fp32", to: int | None = None) -> Calibration:
    """Restore an earlier calibration under a new version number: by default the one active before the current
    one, with `to` any version in the history that was made for the same graph.

    The restored file keeps the old thresholds and statistics, gets version = next_version (so a running daemon
    sees a change), `restored_version` = the version it copies and `rolled_back_from` = the version it replaces.
    Its `previous_version` is the restored one's, so repeated rollbacks walk further back in time; `to` reaches
    any version, also one rolled back past by mistake.
    """
    bundle_dir = Path(bundle_dir)
    sha, graph = bundle_graph(bundle_dir, precision)
    current = read_calibration_file(bundle_dir / bundle.CALIBRATION, sha, precision, graph)
    if to is None:
        if current.previous_version is None:
            raise BundleError(
                f"{bundle_dir / bundle.CALIBRATION}: version {current.version} has no earlier calibration to roll "
                f"back to; {restorable_text(bundle_dir, sha, current.version)}"
            )
        to = current.previous_version
    elif to == current.version:
        raise BundleError(f"cannot roll back to version {to}: it is the active calibration")
    source = history_path(bundle_dir, to)
    if not source.is_file():
        raise BundleError(
            f"cannot roll back: {source} (version {to}) is missing; {restorable_text(bundle_dir, sha, current.version)}"
        )
    try:
        old = read_calibration_file(source, sha, precision, graph)
    except BundleError as exc:
        raise BundleError(f"{exc}; {restorable_text(bundle_dir, sha, current.version)}") from None
    restored = old.model_copy(
        update={
            "version": next_version(bundle_dir),
            "restored_version": old.version,
            "rolled_back_from": current.version,
        }
    )
    save_calibration(bundle_dir, restored)
    return restored


def restorable_versions(bundle_dir: str | Path, sha256: str) -> list[int]:
    """History versions that are valid calibrations made for the graph with this hash (what rollback can restore)."""
    found = []
    for version in history_versions(bundle_dir):
        path = history_path(bundle_dir, version)
        try:
            cal = calibration_from_dict(bundle.read_json(path, "calibration"), path)
        except (BundleError, ValueError, OSError):
            continue
        if cal.model_sha256 == sha256:
            found.append(version)
    return found


def restorable_text(bundle_dir: str | Path, sha256: str, current: int) -> str:
    versions = [v for v in restorable_versions(bundle_dir, sha256) if v != current]
    if not versions:
        return "the history holds no other calibration for this graph"
    return (
        f"versions in the history for this graph: {', '.join(map(str, versions))} (restore one with --rollback --to N)"
    )
