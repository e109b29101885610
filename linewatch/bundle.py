"""The model bundle: one directory holding the graph, its metadata and the calibration (torch-free).

Layout (metadata fields: docs/DESIGN.md, "Bundle metadata"; calibration: docs/CALIBRATION.md):
  metadata.json        what the runtime needs: input size/layout, DFR settings, weights, training set, versions
  model.pt             build side: torch checkpoint (CAE weights + settings); not needed on a line PC
  model.onnx           the fused graph (uint8 N×H×W×3 BGR -> anomaly_map N×H×W, image_score N)
  model_fp16.onnx      optional fp16 graph
  model_int8.onnx      optional int8 graph (CPU)
  calibration.json     current thresholds (written by `linewatch calibrate`)
  calibration_history/ previous calibrations, for rollback
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from linewatch.errors import BundleError, ConfigError

log = logging.getLogger("linewatch.bundle")

FORMAT = "linewatch-bundle"
FORMAT_VERSION = 1
METADATA = "metadata.json"
CHECKPOINT = "model.pt"
GRAPH = "model.onnx"
GRAPH_FP16 = "model_fp16.onnx"
GRAPH_INT8 = "model_int8.onnx"
# graph precision -> (metadata graph keys for its file and sha256, how to get it)
PRECISIONS = {
    "fp32": ("file", "sha256", "linewatch export"),
    "fp16": ("fp16_file", "fp16_sha256", "linewatch export --fp16"),
    "int8": ("int8_file", "int8_sha256", "linewatch export --int8"),
}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    return precision


CALIBRATION = "calibration.json"
CALIBRATION_HISTORY = "calibration_history"
INPUT_NAME = "frames"
OUTPUT_MAP = "anomaly_map"
OUTPUT_SCORE = "image_score"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _create_temp(path: Path) -> tuple[int, Path]:
    """An exclusive new temp file next to `path`, created with mode 0666 so the kernel applies the umask (and a
    default ACL) exactly as for any new file; mkstemp's fixed 0600 would hide the result from the daemon's user."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name next to {path}")


def _keep_mode_and_owner(fd: int, old: os.stat_result) -> None:
    """Give the new file the replaced file's owner and mode: `sudo linewatch calibrate` must not turn a
    linewatch-readable calibration.json into root:root 0600. A non-root writer keeps what it may (its group)."""
    if old.st_uid != os.geteuid() or old.st_gid != os.getegid():
        try:
            os.fchown(fd, old.st_uid if os.geteuid() == 0 else -1, old.st_gid)
        except PermissionError:
            log.warning("cannot give the new file the owner %d:%d of the file it replaces", old.st_uid, old.st_gid)
    os.fchmod(fd, stat.S_IMODE(old.st_mode))  # after chown, which may clear set-id bits


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via temp file + fsync + rename, so a crash never leaves a half-written file at `path`.

    A replaced file keeps its mode and owner; a new file gets 0666 & ~umask, like any file the user creates."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        old: os.stat_result | None = path.stat()
    except FileNotFoundError:
        old = None
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            if old is not None:
                _keep_mode_and_owner(f.fileno(), old)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | Path, what: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_bytes())  # bytes: json detects UTF-8/16/32 itself, whatever the locale
    except RecursionError:  # json gives up on deep nesting with RecursionError, not a decode error
        raise BundleError(f"{what} is nested too deeply to be valid: {path}") from None
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, bad UTF-8, an integer of over 4300 digits
        raise BundleError(f"{what} is not valid JSON: {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{what} must be a JSON object: {path}")
    return data


def read_metadata(bundle_dir: str | Path) -> dict[str, Any]:
    """Metadata of a bundle, checked for the fields every consumer relies on."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"model bundle directory not found: {bundle_dir}")
    meta = read_json(bundle_dir / METADATA, "bundle metadata")
    path = bundle_dir / METADATA
    if meta.get("format") != FORMAT:
        raise BundleError(f"{path}: not a linewatch bundle (format={meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{path}: unsupported format_version {meta.get('format_version')!r} (this linewatch reads {FORMAT_VERSION})"
        )
    inp = meta.get("input")
    if not isinstance(inp, dict) or not all(type(inp.get(k)) is int and inp[k] > 0 for k in ("height", "width")):
        raise BundleError(f"{path}: 'input' must give positive integer height and width")
    return meta


def write_metadata(bundle_dir: str | Path, meta: dict[str, Any]) -> None:
    meta = dict(meta)
    meta["format"] = FORMAT
    meta["format_version"] = FORMAT_VERSION
    atomic_write_json(Path(bundle_dir) / METADATA, meta)


def model_id(meta: dict[str, Any]) -> str:
    """Short id of the exported graph (its hash), published with every result."""
    graph = meta.get("graph") or {}
    return str(graph.get("sha256", meta.get("training", {}).get("checkpoint_sha256", "untrained")))[:12]
