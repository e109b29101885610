"""The wire format of results, status and trigger replies (docs/PROTOCOL.md is the prose version of this file).

Results are three ZeroMQ frames `[topic, JSON header, mask PNG or empty]`, status messages two `[topic, JSON]`.
Topics are `linewatch/<camera>/result` and `linewatch/<camera>/status`; camera names never contain '/', so a
subscription to the prefix `linewatch/<camera>/` (see `camera_prefix`) matches exactly one camera: `cam1` never
matches `cam10`. Additive header fields keep SCHEMA_VERSION; removing or changing a field's meaning bumps it.
"""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Sequence

import numpy as np
from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
)

from linewatch.errors import LinewatchError
from linewatch.validation import TolerantModel, validate

SCHEMA_VERSION = 1
TOPIC_ROOT = b"linewatch/"
RESULT, STATUS, PREVIEW = "result", "status", "preview"
KINDS = (RESULT, STATUS, PREVIEW)
MAX_REGIONS = 100  # regions listed per header (largest first); `regions_total` counts them all
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CAMERA_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
MASK_PNG_COMPRESSION = 1  # zlib level 1 + run-length strategy: a binary 256² mask -> ~250 bytes, fastest encode


class ProtocolError(LinewatchError):
    """A message that does not follow docs/PROTOCOL.md (wrong frames, bad JSON, missing or mistyped fields)."""


class Verdict(str, enum.Enum):
    """The three verdicts; a str, so `Verdict.OK == "OK"` and JSON carries the plain text (StrEnum needs 3.11)."""

    OK = "OK"
    NOK = "NOK"
    ERROR = "ERROR"

    def __str__(self) -> str:  # "OK" in f-strings and as a dict key in JSON, on every Python version
        return self.value


# --- topics --------------------------------------------------------------------------------------------------
def _camera_bytes(camera: str) -> bytes:
    if not isinstance(camera, str) or not CAMERA_NAME.fullmatch(camera):
        raise ValueError(f"camera name {camera!r}: expected letters, digits, '-' or '_' (it is part of a topic)")
    return camera.encode("ascii")


def camera_prefix(camera: str | None = None) -> bytes:
    """Subscription prefix: one camera's results and status (`linewatch/cam1/`), or everything (`linewatch/`)."""
    return TOPIC_ROOT if camera is None else TOPIC_ROOT + _camera_bytes(camera) + b"/"


def result_topic(camera: str) -> bytes:
    return camera_prefix(camera) + RESULT.encode()


def status_topic(camera: str) -> bytes:
    return camera_prefix(camera) + STATUS.encode()


def preview_topic(camera: str) -> bytes:
    """Not a prefix of the result or status topic (nor they of it): their subscribers never get previews."""
    return camera_prefix(camera) + PREVIEW.encode()


def parse_topic(topic: bytes) -> tuple[str, str]:
    """(camera, kind) of a topic frame; ProtocolError for anything else."""
    expected = "expected linewatch/<camera>/result|status|preview"
    try:
        root, camera, kind = topic.decode("ascii").split("/")
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(f"topic {topic[:80]!r}: {expected}") from None
    if root + "/" != TOPIC_ROOT.decode() or not CAMERA_NAME.fullmatch(camera) or kind not in KINDS:
        raise ProtocolError(f"topic {topic[:80]!r}: {expected}")
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
    value = _number(value)
    if isinstance(value, float):
        return _finite_or_none(value)
    if value is None or isinstance(value, (str, int)):
        return value
    return str(value)


def encode_json(obj: dict[str, Any]) -> bytes:
    return json.dumps(jsonable(obj), separators=(",", ":"), allow_nan=False).encode("utf-8")


def _number(value: Any) -> Any:
    """A numpy scalar as the Python number it holds (JSON and the strict schema types know no numpy)."""
    return value.item() if isinstance(value, np.generic) else value


def _finite_or_none(value: Any) -> Any:
    value = _number(value)
    return None if isinstance(value, float) and not math.isfinite(value) else value


# --- headers -----------------------------------------------------------------------------------------------
# The result header's one schema: the daemon builds what it sends with it, clients check what they receive with
# it. Tolerant: a reader ignores fields it does not know (docs/PROTOCOL.md promises additive fields).
Int = Annotated[StrictInt, BeforeValidator(_number)]
Time = Annotated[StrictFloat, Field(allow_inf_nan=False)]
Reading = Annotated[StrictFloat | None, BeforeValidator(_finite_or_none)]  # not finite: null
CameraName = Annotated[StrictStr, Field(pattern=CAMERA_NAME.pattern)]


class RegionHeader(TolerantModel):
    """One region above the pixel threshold; built straight from `linewatch.line.verdict.Region` (read by
    attribute). `defect` says whether it failed the part (None: from a daemon that predates the field)."""

    model_config = ConfigDict(from_attributes=True)

    bbox: tuple[Int, Int, Int, Int]  # x, y, w, h in model-input pixels
    area: Annotated[Int, Field(ge=0)]
    peak: Reading
    defect: StrictBool | None = None  # area >= the calibration's min defect area; False: a speck


class Thresholds(TolerantModel):
    pixel: Reading
    image: Reading


class MaskInfo(TolerantModel):
    format: Literal["png"] = "png"
    width: Annotated[Int, Field(ge=1)]
    height: Annotated[Int, Field(ge=1)]


class ResultHeader(TolerantModel):
    """The JSON header of one result (docs/PROTOCOL.md, "Result messages").

    The rules that keep a header from claiming a good part that was not inspected live here, so no writer can
    skip them: ERROR needs an error text; OK and NOK need a finite score and no error. `publish_time` and
    `run_id` are the publisher's to stamp at send time (see `SentResultHeader`).
    """

    schema_version: Literal[1] = 1  # SCHEMA_VERSION
    kind: Literal["result"] = "result"
    camera: CameraName
    seq: Annotated[Int, Field(ge=1)]  # per-camera result number from 1: a gap tells subscribers what they missed
    run_id: StrictStr | None = None
    frame_time: Time
    publish_time: Time | None = None
    part_id: StrictStr | None
    verdict: Verdict
    image_score: Reading
    thresholds: Thresholds
    calibration_version: Int | None
    model_id: StrictStr | None
    recipe: StrictStr | None = None  # the recipe judged with (additive: None from a daemon that predates recipes)
    regions: Annotated[list[RegionHeader], Field(max_length=MAX_REGIONS)]
    regions_total: Annotated[Int, Field(ge=0)]
    # regions that failed the part (additive: None from a daemon that predates it); they are listed first
    defect_regions: Annotated[Int, Field(ge=0)] | None = None
    error: StrictStr | None
    frame_index: Int | None
    mask: MaskInfo | None

    @model_validator(mode="after")
    def _consistent(self) -> "ResultHeader":
        if self.verdict == Verdict.ERROR and not self.error:
            raise ValueError("an ERROR result needs a reason (error text)")
        if self.verdict != Verdict.ERROR and self.image_score is None:
            raise ValueError(f"a {self.verdict} result needs a finite image score")
        if self.verdict != Verdict.ERROR and self.error:
            raise ValueError(f"a {self.verdict} result cannot carry an error ({self.error!r}): use verdict ERROR")
        areas = [r.area for r in self.regions]
        if areas != sorted(areas, reverse=True):
            raise ValueError("regions must be listed largest first")
        if self.regions_total < len(self.regions):
            raise ValueError(f"regions_total {self.regions_total} is less than the {len(self.regions)} regions listed")
        flags = [r.defect for r in self.regions]
        if True in flags and False in flags[: flags.index(True)]:
            raise ValueError("defect regions must be listed before the specks")
        if self.defect_regions is not None:
            if self.defect_regions > self.regions_total:
                raise ValueError(f"defect_regions {self.defect_regions} exceeds regions_total {self.regions_total}")
            if self.verdict == Verdict.OK and self.defect_regions:
                raise ValueError(f"an OK result cannot have {self.defect_regions} defect region(s): that is NOK")
            if None not in flags and flags.count(True) != min(self.defect_regions, len(flags)):
                raise ValueError(
                    f"defect_regions {self.defect_regions} does not match the {flags.count(True)} regions "
                    f"listed with defect: true (of {len(flags)} listed)"
                )
        return self


class SentResultHeader(ResultHeader):
    """A result header as it travels: stamped by the publisher, so `publish_time` and `run_id` are there."""

    run_id: StrictStr
    publish_time: Time


class StatusHeader(TolerantModel):
    """The protocol's own fields of a status message, as a client checks them; the daemon's counters beside them
    are read by name. `results` (the camera's last seq) is checked too: clients count trailing losses with it."""

    schema_version: Literal[1] = 1  # SCHEMA_VERSION
    kind: Literal["status"] = "status"
    camera: CameraName
    publish_time: Time
    run_id: StrictStr
    results: Annotated[Int, Field(ge=0)] | None = None


class PreviewImage(TolerantModel):
    format: Literal["jpeg"] = "jpeg"
    width: Annotated[Int, Field(ge=1)]
    height: Annotated[Int, Field(ge=1)]


class PreviewHeatmap(TolerantModel):
    """A uint8 greyscale PNG of the anomaly map: map value = pixel / 255 × `scale`. `scale` is twice the pixel
    threshold when calibrated, so the published mask is roughly where the heat map is >= 128."""

    format: Literal["png"] = "png"
    width: Annotated[Int, Field(ge=1)]
    height: Annotated[Int, Field(ge=1)]
    scale: Annotated[StrictFloat, Field(gt=0, allow_inf_nan=False)]
    pixel_threshold: Reading


class PreviewHeader(TolerantModel):
    """The JSON header of a preview (docs/PROTOCOL.md, "Preview messages"): the frame as inspected and its heat map
    for a screen, tied to its result by (`run_id`, `camera`, `seq`). Never a verdict of its own: the result is."""

    schema_version: Literal[1] = 1
    kind: Literal["preview"] = "preview"
    camera: CameraName
    seq: Annotated[Int, Field(ge=1)]  # the seq of the result it belongs to
    run_id: StrictStr | None = None
    publish_time: Time | None = None
    frame_time: Time
    frame_index: Int | None
    verdict: Verdict
    image_score: Reading
    image: PreviewImage
    heatmap: PreviewHeatmap | None  # None: no map (ERROR before scoring)


class SentPreviewHeader(PreviewHeader):
    run_id: StrictStr
    publish_time: Time


def status_header(camera: str, status: dict[str, Any]) -> dict[str, Any]:
    """The JSON of a status message: the daemon's per-camera fields, flat, plus the protocol's own (the publisher
    adds `publish_time` and `run_id` at send time)."""
    _camera_bytes(camera)
    reserved = {"schema_version", "kind", "camera", "publish_time", "run_id"} & status.keys()
    if reserved:
        raise ValueError(f"status fields {sorted(reserved)} are reserved by the protocol")
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": STATUS,
        "camera": camera,
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
    img: np.ndarray
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


# --- previews ----------------------------------------------------------------------------------------------
JPEG_SIGNATURE = b"\xff\xd8\xff"


def encode_preview_jpeg(image: np.ndarray, width: int, quality: int) -> tuple[bytes, tuple[int, int]]:
    """(JPEG, (width, height)) of a BGR frame scaled to `width` (never enlarged), aspect ratio kept."""
    import cv2

    h, w = image.shape[:2]
    width = min(int(width), w)
    height = max(1, round(h * width / w))
    if (width, height) != (w, h):
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(image), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("OpenCV could not encode the preview as JPEG")
    return buf.tobytes(), (width, height)


def encode_heatmap_png(anomaly_map: np.ndarray, size: int, scale: float) -> tuple[bytes, tuple[int, int]]:
    """(PNG, (width, height)) of the map at most `size` pixels on its longer side, as uint8 of map / scale."""
    import cv2

    amap: np.ndarray = np.asarray(anomaly_map, dtype=np.float32)
    h, w = amap.shape
    factor = min(1.0, size / max(h, w))
    width, height = max(1, round(w * factor)), max(1, round(h * factor))
    if (width, height) != (w, h):
        amap = cv2.resize(amap, (width, height), interpolation=cv2.INTER_AREA)
    img = (np.clip(amap / scale, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, MASK_PNG_COMPRESSION])
    if not ok:
        raise ValueError("OpenCV could not encode the heat map as PNG")
    return buf.tobytes(), (width, height)


# --- messages ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Message:
    """One decoded result, status or preview message. `mask` is the PNG bytes (None when the result has no mask);
    a preview carries `image` (JPEG) and `mask` is its heat map PNG (None without one)."""

    topic: str
    header: dict[str, Any]  # decoded JSON; decode_message has checked kind and camera against the topic
    mask: bytes | None = None
    image: bytes | None = None

    @property
    def kind(self) -> str:
        kind: str = self.header["kind"]
        return kind

    @property
    def camera(self) -> str:
        camera: str = self.header["camera"]
        return camera

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


def json_object(data: bytes, error: type[Exception] = ProtocolError, prefix: str = "") -> dict[str, Any]:
    """One UTF-8 JSON object from a message frame, or `error` saying what is wrong with the bytes."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise error(f"{prefix}not UTF-8 JSON ({exc})") from None
    except RecursionError:  # a few KiB of '[' nest deeper than the parser's stack
        raise error(f"{prefix}JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise error(f"{prefix}expected a JSON object, got {type(obj).__name__}")
    return obj


def parse_header(data: bytes, what: str = "header") -> dict[str, Any]:
    header = json_object(data, ProtocolError, f"{what}: ")
    version = header.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:  # JSON true and 1.0 are not version 1
        raise ProtocolError(f"{what}: schema_version {version!r} is not supported (this client reads {SCHEMA_VERSION})")
    return header


def check_result_header(header: dict[str, Any], what: str = "result header") -> SentResultHeader:
    """A received result header (also the result in a trigger reply) against the schema; ProtocolError otherwise."""
    return validate(SentResultHeader, header, what, error=ProtocolError)


def check_mask_frame(header: dict[str, Any], mask: bytes, what: str) -> bytes | None:
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
    if len(frames) not in (2, 3, 4):
        raise ProtocolError(f"message of {len(frames)} frames: expected 3 (result), 2 (status) or 4 (preview)")
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
        validate(StatusHeader, header, f"{topic} header", error=ProtocolError)
        return Message(topic, header, None)
    if kind == PREVIEW:
        return _decode_preview(topic, header, frames)
    if len(frames) != 3:
        raise ProtocolError(f"{topic}: result messages have 3 frames, got {len(frames)}")
    check_result_header(header, f"{topic} header")
    return Message(topic, header, check_mask_frame(header, frames[2], topic))


def _decode_preview(topic: str, header: dict[str, Any], frames: list[bytes]) -> Message:
    """`[topic, header, JPEG, heat map PNG or empty]`, the frames checked against the header."""
    if len(frames) != 4:
        raise ProtocolError(f"{topic}: preview messages have 4 frames, got {len(frames)}")
    checked = validate(SentPreviewHeader, header, f"{topic} header", error=ProtocolError)
    if not frames[2].startswith(JPEG_SIGNATURE):
        raise ProtocolError(f"{topic}: the image frame is not a JPEG")
    if checked.heatmap is None:
        if frames[3]:
            raise ProtocolError(f"{topic}: header says no heat map but its frame has {len(frames[3])} bytes")
        return Message(topic, header, None, frames[2])
    if not frames[3].startswith(PNG_SIGNATURE):
        raise ProtocolError(f"{topic}: header announces a PNG heat map but its frame is not a PNG")
    return Message(topic, header, frames[3], frames[2])
