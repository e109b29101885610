"""The wire format of results, status and trigger replies (docs/PROTOCOL.md is the prose version of this file).

Results are three ZeroMQ frames `[topic, JSON header, mask PNG or empty]`, status messages two `[topic, JSON]`.
Topics are `linewatch/<camera>/result` and `linewatch/<camera>/status`; camera names never contain '/', so a
subscription to the prefix `linewatch/<camera>/` (see `camera_prefix`) matches exactly one camera: `cam1` never
matches `cam10`. Additive header fields keep SCHEMA_VERSION; removing or changing a field's meaning bumps it.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from linewatch.errors import LinewatchError

SCHEMA_VERSION = 1
TOPIC_ROOT = b"linewatch/"
VERDICTS = ("OK", "NOK", "ERROR")
RESULT, STATUS = "result", "status"
MAX_REGIONS = 100  # regions listed per header (largest first); `regions_total` counts them all
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CAMERA_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
MASK_PNG_COMPRESSION = 1  # zlib level 1 + run-length strategy: a binary 256² mask -> ~250 bytes, fastest encode


class ProtocolError(LinewatchError):
    """A message that does not follow docs/PROTOCOL.md (wrong frames, bad JSON, missing or mistyped fields)."""


# --- topics --------------------------------------------------------------------------------------------------
def _camera_bytes(camera: str) -> bytes:
    if not isinstance(camera, str) or not CAMERA_NAME.match(camera):
        raise ValueError(f"camera name {camera!r}: expected letters, digits, '-' or '_' (it is part of a topic)")
    return camera.encode("ascii")


def camera_prefix(camera: str | None = None) -> bytes:
    """Subscription prefix: one camera's results and status (`linewatch/cam1/`), or everything (`linewatch/`)."""
    return TOPIC_ROOT if camera is None else TOPIC_ROOT + _camera_bytes(camera) + b"/"


def result_topic(camera: str) -> bytes:
    return camera_prefix(camera) + RESULT.encode()


def status_topic(camera: str) -> bytes:
    return camera_prefix(camera) + STATUS.encode()


def parse_topic(topic: bytes) -> tuple[str, str]:
    """(camera, kind) of a topic frame; ProtocolError for anything else."""
    try:
        root, camera, kind = topic.decode("ascii").split("/")
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(f"topic {topic[:80]!r}: expected linewatch/<camera>/result|status") from None
    if root + "/" != TOPIC_ROOT.decode() or not CAMERA_NAME.match(camera) or kind not in (RESULT, STATUS):
        raise ProtocolError(f"topic {topic[:80]!r}: expected linewatch/<camera>/result|status")
    return camera, kind


# --- JSON --------------------------------------------------------------------------------------------------
def jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays unwrapped, tuples as lists, non-finite floats as null (JSON has none)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)


def encode_json(obj: dict) -> bytes:
    return json.dumps(jsonable(obj), separators=(",", ":"), allow_nan=False).encode("utf-8")


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# --- headers -----------------------------------------------------------------------------------------------
def result_header(
    camera: str,
    seq: int,
    frame_time: float,
    verdict: str,
    score: float | None = None,
    pixel_threshold: float | None = None,
    image_threshold: float | None = None,
    calibration_version: int | None = None,
    model_id: str | None = None,
    regions: Iterable[dict] = (),
    part_id: str | None = None,
    reason: str | None = None,
    frame_index: int | None = None,
    mask_size: Sequence[int] | None = None,
    *,
    image_score: float | None = None,
    thresholds: dict | None = None,
    error: str | None = None,
    mask_shape: Sequence[int] | None = None,
    max_regions: int = MAX_REGIONS,
) -> dict:
    """The JSON header of one result (docs/PROTOCOL.md, "Result header").

    `seq` counts this camera's results from 1 (a gap tells subscribers what they missed). `frame_time` is the
    capture wall-clock time (Unix seconds). Aliases: `image_score` = `score`, `thresholds={"pixel", "image"}` =
    the two threshold arguments, `error` = `reason`, `mask_shape=(h, w)` = `mask_size=(w, h)`; pass `mask_size`
    exactly when a mask PNG goes with the header. ERROR needs a reason; OK and NOK need a finite score and no
    reason, so a header can never claim a good part that was not inspected. `publish_time` is stamped again by
    the publisher at send time; `run_id` is added by the publisher.
    """
    if verdict not in VERDICTS:
        raise ValueError(f"verdict {verdict!r}: expected one of {', '.join(VERDICTS)}")
    _camera_bytes(camera)
    if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)) or seq < 1:
        raise ValueError(f"seq {seq!r}: expected an integer >= 1 (per-camera result count)")
    score = image_score if score is None else score
    reason = error if reason is None else reason
    if thresholds is not None:
        pixel_threshold = thresholds.get("pixel", pixel_threshold)
        image_threshold = thresholds.get("image", image_threshold)
    if mask_size is None and mask_shape is not None:
        mask_size = (mask_shape[1], mask_shape[0])
    score = _finite_or_none(score)
    if verdict == "ERROR":
        if not reason:
            raise ValueError("an ERROR result needs a reason")
    else:
        if score is None:
            raise ValueError(f"a {verdict} result needs a finite image score")
        if reason:
            raise ValueError(f"a {verdict} result cannot carry an error ({reason!r}): use verdict ERROR")
    region_list = [_region(r) for r in regions]
    region_list.sort(key=lambda r: -r["area"])
    if part_id is not None and not isinstance(part_id, str):
        raise ValueError(f"part_id {part_id!r}: expected a string or None")
    now = time.time()
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": RESULT,
        "camera": camera,
        "seq": int(seq),
        "frame_time": float(frame_time),
        "publish_time": now,
        "part_id": part_id,
        "verdict": verdict,
        "image_score": score,
        "thresholds": {"pixel": _finite_or_none(pixel_threshold), "image": _finite_or_none(image_threshold)},
        "calibration_version": None if calibration_version is None else int(calibration_version),
        "model_id": model_id,
        "regions": region_list[:max_regions],
        "regions_total": len(region_list),
        "error": reason if verdict == "ERROR" else None,
        "frame_index": None if frame_index is None else int(frame_index),
        "mask": None
        if mask_size is None
        else {"format": "png", "width": int(mask_size[0]), "height": int(mask_size[1])},
    }


def _region(region: dict) -> dict:
    try:
        x, y, w, h = (int(v) for v in region["bbox"])
        return {"bbox": [x, y, w, h], "area": int(region["area"]), "peak": _finite_or_none(region["peak"])}
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"region {region!r}: expected bbox [x, y, w, h], area and peak ({exc})") from None


def status_header(camera: str, status: dict) -> dict:
    """The JSON of a status message: the daemon's per-camera fields, flat, plus the protocol's own."""
    _camera_bytes(camera)
    reserved = {"schema_version", "kind", "camera", "publish_time", "run_id"} & status.keys()
    if reserved:
        raise ValueError(f"status fields {sorted(reserved)} are reserved by the protocol")
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": STATUS,
        "camera": camera,
        "publish_time": time.time(),
        **jsonable(status),
    }


# --- masks -------------------------------------------------------------------------------------------------
def encode_mask_png(mask: np.ndarray | None, size: Sequence[int] | None = None) -> bytes | None:
    """Greyscale PNG of a mask, resized to `size=(width, height)` (None: as is). None in, None out.

    bool masks become 0/255; uint8 is kept; float maps are read as 0..1 (clipped) and scaled to 0..255.
    Binary masks are resized nearest-neighbour so they stay binary; grey maps with area/linear interpolation.
    """
    import cv2

    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"mask of shape {mask.shape}: expected a non-empty 2-D array")
    if mask.dtype == np.bool_:
        img = mask.astype(np.uint8) * 255
    elif mask.dtype == np.uint8:
        img = mask
    elif np.issubdtype(mask.dtype, np.floating):
        img = (np.clip(np.nan_to_num(mask, nan=1.0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    else:
        raise ValueError(f"mask dtype {mask.dtype}: expected bool, uint8 or float")
    if size is not None:
        width, height = int(size[0]), int(size[1])
        if width < 1 or height < 1:
            raise ValueError(f"mask size {tuple(size)}: expected width, height >= 1")
        if (width, height) != (img.shape[1], img.shape[0]):
            binary = mask.dtype == np.bool_ or not np.any((img != 0) & (img != 255))
            shrink = width * height < img.shape[0] * img.shape[1]
            interp = cv2.INTER_NEAREST if binary else (cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
            img = cv2.resize(img, (width, height), interpolation=interp)
    ok, buf = cv2.imencode(
        ".png",
        np.ascontiguousarray(img),
        [cv2.IMWRITE_PNG_COMPRESSION, MASK_PNG_COMPRESSION, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE],
    )
    if not ok:
        raise ValueError("OpenCV could not encode the mask as PNG")
    return buf.tobytes()


def decode_mask_png(data: bytes) -> np.ndarray:
    """uint8 H×W array of a mask PNG (0 = good, 255 = defect for binary masks)."""
    import cv2

    if not data.startswith(PNG_SIGNATURE):
        raise ProtocolError("mask frame is not a PNG")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.ndim != 2:
        raise ProtocolError("mask frame is not a readable greyscale PNG")
    return img


# --- messages ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Message:
    """One decoded result or status message. `mask` is the PNG bytes (None when the result has no mask)."""

    topic: str
    header: dict
    mask: bytes | None = None

    @property
    def kind(self) -> str:
        return self.header["kind"]

    @property
    def camera(self) -> str:
        return self.header["camera"]

    @property
    def seq(self) -> int | None:
        return self.header.get("seq")

    @property
    def verdict(self) -> str | None:
        return self.header.get("verdict")

    @property
    def part_id(self) -> str | None:
        return self.header.get("part_id")

    def mask_array(self) -> np.ndarray | None:
        return None if self.mask is None else decode_mask_png(self.mask)


_RESULT_FIELDS: dict[str, tuple] = {
    "seq": (int,),
    "frame_time": (int, float),
    "publish_time": (int, float),
    "verdict": (str,),
    "image_score": (int, float, type(None)),
    "thresholds": (dict,),
    "calibration_version": (int, type(None)),
    "model_id": (str, type(None)),
    "regions": (list,),
    "part_id": (str, type(None)),
    "error": (str, type(None)),
    "mask": (dict, type(None)),
}


def _check_types(header: dict, fields: dict[str, tuple], what: str) -> None:
    for key, types in fields.items():
        if key not in header:
            raise ProtocolError(f"{what}: field {key!r} is missing")
        value = header[key]
        if isinstance(value, bool) or not isinstance(value, types):
            names = "/".join("null" if t is type(None) else t.__name__ for t in types)
            raise ProtocolError(f"{what}: field {key!r} = {value!r:.80}: expected {names}")


def json_object(data: bytes, error: type[Exception] = ProtocolError, prefix: str = "") -> dict:
    """One UTF-8 JSON object from a message frame, or `error` saying what is wrong with the bytes."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise error(f"{prefix}not UTF-8 JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise error(f"{prefix}expected a JSON object, got {type(obj).__name__}")
    return obj


def parse_header(data: bytes, what: str = "header") -> dict:
    header = json_object(data, ProtocolError, f"{what}: ")
    version = header.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ProtocolError(f"{what}: schema_version {version!r} is not supported (this client reads {SCHEMA_VERSION})")
    return header


def check_result_header(header: dict, what: str = "result header") -> None:
    """Field presence and types of a result header (also used on trigger replies)."""
    _check_types(header, _RESULT_FIELDS, what)
    if header["verdict"] not in VERDICTS:
        raise ProtocolError(f"{what}: verdict {header['verdict']!r} is not one of {', '.join(VERDICTS)}")
    if header["verdict"] == "ERROR" and not header["error"]:
        raise ProtocolError(f"{what}: an ERROR verdict without an error text")
    if header["verdict"] != "ERROR" and header["image_score"] is None:
        raise ProtocolError(f"{what}: verdict {header['verdict']} without an image_score")
    if not isinstance(header.get("camera"), str):
        raise ProtocolError(f"{what}: field 'camera' missing or not a string")


def check_mask_frame(header: dict, mask: bytes, what: str) -> bytes | None:
    """The mask frame must agree with the header: empty when header.mask is null, a PNG otherwise."""
    if header["mask"] is None:
        if mask:
            raise ProtocolError(f"{what}: header says no mask but the mask frame has {len(mask)} bytes")
        return None
    if not mask.startswith(PNG_SIGNATURE):
        raise ProtocolError(f"{what}: header announces a PNG mask but the mask frame is not a PNG")
    return mask


def decode_message(frames: Sequence[bytes]) -> Message:
    """Validate and decode `[topic, header, mask]` (result) or `[topic, header]` (status); ProtocolError otherwise."""
    frames = [bytes(f) for f in frames]
    if len(frames) not in (2, 3):
        raise ProtocolError(f"message of {len(frames)} frames: expected 3 (result) or 2 (status)")
    camera, kind = parse_topic(frames[0])
    topic = frames[0].decode("ascii")
    header = parse_header(frames[1], f"{topic} header")
    if header.get("kind") != kind or header.get("camera") != camera:
        raise ProtocolError(
            f"{topic}: header kind/camera ({header.get('kind')!r}, {header.get('camera')!r}) do not match the topic"
        )
    if kind == STATUS:
        if len(frames) != 2:
            raise ProtocolError(f"{topic}: status messages have 2 frames, got {len(frames)}")
        return Message(topic, header, None)
    if len(frames) != 3:
        raise ProtocolError(f"{topic}: result messages have 3 frames, got {len(frames)}")
    check_result_header(header, f"{topic} header")
    return Message(topic, header, check_mask_frame(header, frames[2], topic))
