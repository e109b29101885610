"""Corrections from the line: frames an operator marked on the dashboard, kept for training and evaluation
(torch-free). Reference: docs/FEEDBACK.md.

  FOLDER/.linewatch-feedback                         marker, written on the first save
  FOLDER/false_reject/<camera>/<stamp>_<seq>_<part>.png|jpg   a good part the inspector rejected: training material
  FOLDER/missed_defect/<camera>/<stamp>_<seq>_<part>.png|jpg  a defect it passed: a labelled test image
  ... each with a .json sidecar of the same stem (who, when, why, source, image size and sha256, result header)
  FOLDER/used.json                                   which files `linewatch train` / `linewatch eval` have used

The sidecar is written after the image, so an image without one is an interrupted save and is never used. False
rejects must never reach `linewatch calibrate`: good parts that the model scores high would raise the thresholds
until real defects pass; `is_feedback_folder` is the guard calibrate uses.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from linewatch.bundle import atomic_write_bytes, atomic_write_json, sha256_file
from linewatch.errors import DataError
from linewatch.images import IMAGE_SUFFIXES, header_size, max_image_pixels
from linewatch.protocol.wire import CAMERA_NAME

log = logging.getLogger("linewatch.feedback")

FALSE_REJECT = "false_reject"
MISSED_DEFECT = "missed_defect"
KINDS = (FALSE_REJECT, MISSED_DEFECT)
SOURCES = ("archive", "preview")  # the full frame as inspected, or the dashboard's downscaled preview JPEG
MARKER = ".linewatch-feedback"
USED = "used.json"
FORMAT = "linewatch-feedback"
VERSION = 1
EXTENSIONS = {"png": ".png", "jpeg": ".jpg"}
SIGNATURES = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff"}
MAX_PART_ID = 64  # characters of the part id kept in a file name (the sidecar keeps all of it)
MAX_WHO, MAX_WHY = 200, 2000
_SAVE_LOCK = threading.Lock()  # one save at a time per process: name choice, duplicate check and writes


class FeedbackError(DataError):
    """Feedback that cannot be saved or read: bad kind or image, unwritable or inconsistent folder."""


@dataclass(frozen=True)
class Entry:
    """One saved correction whose sidecar is complete."""

    kind: str
    camera: str
    image: Path
    sidecar: dict[str, Any]
    relative: str  # the image path relative to the feedback folder, as used.json and bundle metadata name it

    @property
    def sha256(self) -> str:
        return str(self.sidecar["image"]["sha256"])


# --- names -------------------------------------------------------------------------------------------------------


def safe_part_id(part_id: object) -> str:
    """A file-name fragment from an untrusted part id: [A-Za-z0-9.-] kept, anything else and '..' become one '_',
    no dot or '_' at either end, at most MAX_PART_ID characters; 'none' when nothing usable is left."""
    text = "" if part_id is None else str(part_id)
    text = re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9.-]|\.{2,}", "_", text)).strip("._")
    return text[:MAX_PART_ID].strip("._") or "none"


def stamp(now: float) -> str:
    return datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def iso(now: float) -> str:
    return datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- saving ------------------------------------------------------------------------------------------------------


def check_image(image: bytes, image_format: str) -> tuple[int, int]:
    """(width, height) of image bytes that really are a decodable `image_format` picture within the pixel limit."""
    if image_format not in EXTENSIONS:
        raise FeedbackError(f"image format {image_format!r}: use {' or '.join(EXTENSIONS)}")
    if not isinstance(image, (bytes, bytearray)) or not image:
        raise FeedbackError("no image bytes to save")
    if not bytes(image[:8]).startswith(SIGNATURES[image_format]):
        raise FeedbackError(f"the image is not a {image_format.upper()} file (its first bytes do not say so)")
    if image_format == "jpeg" and not bytes(image).rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise FeedbackError("the JPEG image is truncated (no end-of-image marker)")
    limit = max_image_pixels()
    try:
        size = header_size(bytes(image), f"the {image_format.upper()} image")
    except DataError as exc:
        raise FeedbackError(str(exc)) from None
    if size is not None and size[0] * size[1] > limit:
        raise FeedbackError(f"refusing a {size[0]}×{size[1]} image: more than the limit of {limit} pixels")
    try:
        decoded = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise FeedbackError(f"the {image_format.upper()} image does not decode: {str(exc).strip()}") from None
    if decoded is None or decoded.size == 0:
        raise FeedbackError(f"the {image_format.upper()} image does not decode (corrupt or truncated)")
    return int(decoded.shape[1]), int(decoded.shape[0])


def _text(value: object, name: str, limit: int) -> str:
    if not isinstance(value, str):
        raise FeedbackError(f"{name} must be text, got {type(value).__name__}")
    if len(value) > limit:
        raise FeedbackError(f"{name} is {len(value)} characters long; at most {limit}")
    return value


def _part_key(header: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """What identifies one inspected part: the daemon run, the camera's result number and the frame's time."""
    return header.get("run_id"), header.get("seq"), header.get("frame_time")


def _same_part(folder: Path, camera: str, header: Mapping[str, Any]) -> tuple[str, Path] | None:
    """(kind, image) of an earlier correction of the same part, if any."""
    key = _part_key(header)
    for kind in KINDS:
        directory = folder / kind / camera
        if not directory.is_dir():
            continue
        for side in directory.glob(f"*_{header.get('seq')}_*.json"):
            meta = _read_sidecar(side)
            if meta is not None and _part_key(meta.get("header") or {}) == key:
                return kind, side.with_name(str(meta["image"]["file"]))
    return None


def save_feedback(
    folder: Path,
    *,
    kind: str,
    camera: str,
    image: bytes,
    image_format: str,
    header: Mapping[str, Any],
    who: str,
    why: str,
    source: str,
    now: float | None = None,
) -> Path:
    """Save one correction: the image (bytes as given, after they decode), then its sidecar; returns the image path.

    Marking the same part again with the same kind returns the first image (a double click saves once); marking it
    with the other kind is refused: one part cannot be both a good part and a defect."""
    if kind not in KINDS:
        raise FeedbackError(f"kind {kind!r}: use one of {', '.join(KINDS)}")
    if not isinstance(camera, str) or not CAMERA_NAME.fullmatch(camera):
        raise FeedbackError(f"camera {camera!r}: a camera name has ASCII letters, digits, '-' and '_' only")
    if source not in SOURCES:
        raise FeedbackError(f"source {source!r}: use one of {', '.join(SOURCES)}")
    if not isinstance(header, Mapping):
        raise FeedbackError("header must be the result header (a JSON object)")
    if header.get("camera", camera) != camera:
        raise FeedbackError(f"the result header is from camera {header.get('camera')!r}, not {camera!r}")
    seq = header.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise FeedbackError(f"the result header needs its seq (a whole number >= 0), got {seq!r}")
    who, why = _text(who, "who", MAX_WHO), _text(why, "why", MAX_WHY)
    width, height = check_image(image, image_format)
    try:
        header_copy = json.loads(json.dumps(dict(header), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise FeedbackError(f"the result header is not plain JSON: {exc}") from None
    now = datetime.now(timezone.utc).timestamp() if now is None else now
    folder = Path(folder)
    with _SAVE_LOCK:
        try:
            earlier = _same_part(folder, camera, header_copy) if folder.is_dir() else None
            if earlier is not None:
                if earlier[0] == kind:
                    log.info("part %s/%s is already marked %s: %s", camera, seq, kind, earlier[1])
                    return earlier[1]
                raise FeedbackError(
                    f"part seq {seq} of camera {camera} is already marked {earlier[0]} ({earlier[1]}); one part cannot "
                    f"be both: delete that image and its .json sidecar first if the first mark was wrong"
                )
            directory = folder / kind / camera
            directory.mkdir(parents=True, exist_ok=True)
            if not (folder / MARKER).exists():
                atomic_write_json(folder / MARKER, {"format": FORMAT, "version": VERSION, "created": iso(now)})
            base = f"{stamp(now)}_{seq}_{safe_part_id(header.get('part_id'))}"
            stem, n = base, 1
            while any((directory / (stem + s)).exists() for s in (EXTENSIONS[image_format], ".json")):
                n += 1
                stem = f"{base}-{n}"
            path = directory / (stem + EXTENSIONS[image_format])
            sidecar = {
                "format": FORMAT,
                "version": VERSION,
                "kind": kind,
                "camera": camera,
                "who": who,
                "when": iso(now),
                "why": why,
                "source": source,
                "image": {
                    "file": path.name,
                    "format": image_format,
                    "width": width,
                    "height": height,
                    "bytes": len(image),
                    "sha256": hashlib.sha256(image).hexdigest(),
                },
                "header": header_copy,
            }
            atomic_write_bytes(path, bytes(image))
            try:
                atomic_write_json(path.with_suffix(".json"), sidecar)
            except BaseException:
                path.unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise FeedbackError(f"cannot write feedback into {folder}: {exc}") from exc
    log.info("saved %s of %s seq %s by %r: %s", kind, camera, seq, who, path)
    return path


# --- reading -----------------------------------------------------------------------------------------------------


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    """A sidecar of ours, else None (unreadable, not JSON, or someone else's file)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("image"), dict):
        return None
    return data


def is_feedback_folder(path: Path) -> bool:
    """True for a feedback folder, any folder inside one, or a folder holding our sidecars (a copied camera folder):
    such images must never calibrate thresholds."""
    path = Path(path)
    for candidate in {path.absolute(), path.resolve()}:
        if any((p / MARKER).is_file() for p in (candidate, *candidate.parents)):
            return True
    if not path.is_dir():
        return False
    stems = {p.stem for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    return any(side.stem in stems and _read_sidecar(side) is not None for side in path.glob("*.json"))


def feedback_root(path: Path) -> Path:
    """The feedback folder `path` names; a folder inside one, or one without the marker, is refused saying why."""
    path = Path(path)
    if not path.is_dir():
        raise FeedbackError(f"feedback folder not found: {path}")
    if (path / MARKER).is_file():
        return path
    for parent in path.absolute().parents:
        if (parent / MARKER).is_file():
            raise FeedbackError(f"{path} is inside the feedback folder {parent}: give {parent} itself")
    raise FeedbackError(
        f"{path} is not a feedback folder (no {MARKER} marker; the dashboard writes it with the first correction "
        f"saved under `linewatch dashboard --feedback DIR`)"
    )


def entries(folder: Path, kind: str, strict: bool = True) -> list[Entry]:
    """The complete corrections of one kind, all cameras, sorted by path. An image without a sidecar (an interrupted
    save) is skipped with a warning; a sidecar that does not read raises FeedbackError when `strict`, else is
    skipped too (quietly: the dashboard counts often and must not fill its log)."""
    if kind not in KINDS:
        raise FeedbackError(f"kind {kind!r}: use one of {', '.join(KINDS)}")
    root = Path(folder)
    found, orphans, bad = [], [], []
    for directory in sorted(p for p in (root / kind).glob("*") if p.is_dir()):
        for image in sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
            side = image.with_suffix(".json")
            if not side.is_file():
                orphans.append(image)
                continue
            meta = _read_sidecar(side)
            if meta is None or meta["image"].get("file") != image.name or meta.get("kind") != kind:
                bad.append(side)
                continue
            relative = image.relative_to(root).as_posix()
            found.append(Entry(kind, directory.name, image, meta, relative))
    if orphans:
        log.log(
            logging.WARNING if strict else logging.DEBUG,
            "%d %s image(s) without a sidecar skipped (interrupted saves), e.g. %s",
            len(orphans),
            kind,
            orphans[0],
        )
    if bad and strict:
        raise FeedbackError(
            f"{len(bad)} {kind} sidecar(s) cannot be read or do not describe their image (fix or remove them with "
            f"their images):\n  " + "\n  ".join(str(p) for p in bad)
        )
    if bad:
        log.debug("%d unreadable %s sidecar(s) skipped, e.g. %s", len(bad), kind, bad[0])
    return found


def verified(items: Sequence[Entry]) -> list[Entry]:
    """The entries whose image still has the sha256 its sidecar recorded; a changed image raises FeedbackError."""
    changed = [e.image for e in items if sha256_file(e.image) != e.sha256]
    if changed:
        raise FeedbackError(
            f"{len(changed)} feedback image(s) changed since they were saved (sha256 differs from the sidecar):\n  "
            + "\n  ".join(str(p) for p in changed)
        )
    return list(items)


def read_used(folder: Path) -> dict[str, Any]:
    """used.json's {relative image path: {sha256, kind, uses: [...]}}; empty when nothing was used yet."""
    path = Path(folder) / USED
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FeedbackError(f"cannot read {path}: {exc}") from exc
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        raise FeedbackError(f"{path} is not a linewatch feedback use record (no 'files' object)")
    return files


def is_used(entry: Entry, used: Mapping[str, Any]) -> bool:
    record = used.get(entry.relative)
    return isinstance(record, dict) and record.get("sha256") == entry.sha256


def pending_counts(folder: Path) -> dict[str, int]:
    """Corrections of each kind that no `linewatch train` (false rejects) or `linewatch eval` (missed defects) has
    used yet: what the dashboard shows. Never raises for a folder that has nothing yet."""
    folder = Path(folder)
    if not folder.is_dir():
        return {kind: 0 for kind in KINDS}
    try:
        used = read_used(folder)
    except FeedbackError as exc:
        log.warning("%s; counting every correction as waiting", exc)
        used = {}
    return {kind: sum(not is_used(e, used) for e in entries(folder, kind, strict=False)) for kind in KINDS}


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on the marker, so two commands marking files used never lose each other's records."""
    with open(folder / MARKER, "rb") as marker:
        fcntl.flock(marker.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(marker.fileno(), fcntl.LOCK_UN)


def mark_used(folder: Path, items: Sequence[Entry], *, by: str, target: str, now: float | None = None) -> None:
    """Record in used.json that `by` ("train" or "eval") used these entries for `target` (a bundle directory)."""
    folder = feedback_root(folder)
    when = iso(datetime.now(timezone.utc).timestamp() if now is None else now)
    try:
        with _locked(folder):
            files = read_used(folder)
            for e in items:
                record = files.get(e.relative)
                if not isinstance(record, dict) or record.get("sha256") != e.sha256:
                    record = {"sha256": e.sha256, "kind": e.kind, "uses": []}
                if not isinstance(record.get("uses"), list):
                    record["uses"] = []
                record["uses"].append({"by": by, "target": target, "when": when})
                files[e.relative] = record
            atomic_write_json(folder / USED, {"format": FORMAT + "-used", "version": VERSION, "files": files})
    except OSError as exc:
        raise FeedbackError(f"cannot record the feedback used in {folder / USED}: {exc}") from exc


def describe(items: Sequence[Entry]) -> list[dict[str, str]]:
    """What a bundle's metadata records of the feedback it was trained on: file and sha256."""
    return [{"file": e.relative, "sha256": e.sha256} for e in items]
