"""The daemon's config file: pydantic models, strictly validated on load (torch-free).

A line runs unattended, so a typo must stop the start-up with the file, the key path and what was expected,
never be ignored: unknown keys, wrong types, out-of-range numbers and missing files are all refused
(`linewatch.validation` turns pydantic's errors into those messages). Relative paths are resolved against the
config file's folder, which `load_config` passes to the validators as pydantic context. docs/CONFIG.md, the key
reference, is generated from these models (`python -m linewatch.line.config_reference > docs/CONFIG.md`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union, get_args

import yaml
from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PrivateAttr,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from linewatch.bundle import PRECISIONS
from linewatch.errors import ConfigError
from linewatch.protocol.curve import check_bind_security, is_loopback_host
from linewatch.protocol.wire import CAMERA_NAME, Verdict
from linewatch.validation import Problem, StrictModel, expected, redact_source, validate

log = logging.getLogger("linewatch.line.config")

CameraKind = Literal["device", "video", "url", "gstreamer", "folder"]
CAMERA_KINDS: tuple[str, ...] = get_args(CameraKind)
URL_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://", "rtmp://", "udp://", "tcp://", "srt://")
# A config is a few kilobytes; these bounds refuse a hostile or broken file (a YAML alias or merge-key "bomb" that
# expands to billions of nodes from a few hundred bytes) quickly, instead of hanging the start or the reload.
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_NODES = 100_000


# --- paths: resolved against the config file's folder ------------------------------------------------------


def _not_empty(value: Any) -> Any:
    """An empty string would become Path('.'), the config's own folder: refuse it instead of guessing."""
    if value == "":
        raise expected("a path", value)
    return value


def _resolve(path: Path, base: Any) -> Path:
    try:
        path = path.expanduser()
    except RuntimeError:  # `~name/...` for a user this machine does not know
        raise expected("a path whose ~user exists on this machine", str(path)) from None
    return path if path.is_absolute() or base is None else Path(base) / path


def _resolved(value: Path, info: ValidationInfo) -> Path:
    return _resolve(value, (info.context or {}).get("base"))


def _missing(what: str, path: Path) -> Problem:
    try:
        state = "does not exist" if not path.exists() else "is something else"
    except OSError as exc:  # a name too long for the file system, a loop of links, ...
        state = f"cannot be checked ({exc.strerror or exc})"
    return Problem(f"expected {what}, but {path} {state}")


def _require(path: Path, test: Callable[[Path], bool], what: str) -> Path:
    """`path` if `test(path)` holds; a refusal naming it otherwise, also when the file system cannot answer."""
    try:
        ok = test(path)
    except OSError:
        ok = False
    if not ok:
        raise _missing(what, path)
    return path


def _existing_dir(path: Path) -> Path:
    return _require(path, Path.is_dir, "an existing directory")


def _existing_file(path: Path) -> Path:
    return _require(path, Path.is_file, "an existing file")


ResolvedPath = Annotated[Path, BeforeValidator(_not_empty), AfterValidator(_resolved)]
ExistingDir = Annotated[ResolvedPath, AfterValidator(_existing_dir)]
ExistingFile = Annotated[ResolvedPath, AfterValidator(_existing_file)]


# --- sections -------------------------------------------------------------------------------------------------


class ModelConfig(StrictModel):
    bundle: ExistingDir = Field(description="model bundle directory (metadata.json, model.onnx, calibration.json)")
    precision: Literal[tuple(PRECISIONS)] = Field(  # type: ignore[valid-type]
        "fp32",
        description="which of the bundle's graphs runs: fp32, fp16 (GPU), int8 (CPU); calibrate with the same one",
    )
    golden: Union[ExistingDir, None] = Field(
        None,
        description="golden set of recipe 'default' (good/ and defect/ images, optionally <camera>/good, "
        "<camera>/defect): judged before this model or calibration goes live and on a `verify` request "
        "(docs/RECIPES.md)",
    )


class EngineTlsConfig(StrictModel):
    enabled: StrictBool = Field(False, description="use TLS (gRPC over SSL) to reach the server")
    root_certificates: Union[ExistingFile, None] = Field(
        None, description="PEM file of the CA(s) that signed the server's certificate (null: the system's roots)"
    )
    private_key: Union[ExistingFile, None] = Field(
        None, description="PEM private key of this client, for a server that asks for client certificates"
    )
    certificate_chain: Union[ExistingFile, None] = Field(
        None, description="PEM certificate chain of this client (with private_key)"
    )

    @model_validator(mode="after")
    def _key_with_chain(self) -> EngineTlsConfig:
        if (self.private_key is None) != (self.certificate_chain is None):
            missing = "certificate_chain" if self.certificate_chain is None else "private_key"
            raise expected(
                "a file: private_key and certificate_chain go together (required key missing)", at=(missing,)
            )
        return self


class EngineConfig(StrictModel):
    providers: tuple[StrictStr, ...] = Field(
        ("auto",), min_length=1, description="ONNX Runtime providers: auto, cpu, cuda, tensorrt"
    )
    threads: StrictInt = Field(0, ge=0, description="CPU provider intra-op threads (0 = ONNX Runtime default)")
    max_batch: StrictInt = Field(8, ge=1, le=1024, description="frames scored together, across cameras")
    max_wait_ms: StrictFloat = Field(5.0, ge=0, le=10_000, description="how long a partial batch waits for more frames")
    warmup: StrictBool = Field(True, description="score dummy batches before READY (TensorRT builds its engines then)")
    trt_cache_dir: Union[ResolvedPath, None] = Field(
        None,
        description="TensorRT engine cache folder (created if missing); default: $STATE_DIRECTORY/trt_cache when "
        "systemd gives the service a state directory, else <bundle>/trt_cache. Under systemd the bundle stays "
        "read-only to the daemon",
    )
    # engine.backend: triton (linewatch/line/remote_engine.py, docs/SCALING.md)
    backend: Literal["local", "triton"] = Field(
        "local",
        description="where frames are scored: local (ONNX Runtime in this process) or triton (a Triton Inference "
        "Server, e.g. `linewatch serve`, over gRPC; needs the extra linewatch[triton])",
    )
    url: Union[StrictStr, None] = Field(
        None,
        description="triton: the server's gRPC address host:port (no scheme), e.g. gpu1.line:8001; required with "
        "backend triton",
    )
    model: Union[StrictStr, None] = Field(
        None,
        description="triton: the served model's name; default linewatch-<first 16 hex of the graph's sha256>, as "
        "`linewatch serve` names it, so only the graph the calibration was made for can answer. Checked before "
        "READY: inputs, outputs, shapes and dtypes, and the graph hash (in the name or the model's graph_sha256 "
        "parameter); a mismatch refuses the start",
    )
    timeout_s: StrictFloat = Field(
        5.0,
        gt=0,
        le=600,
        description="triton: deadline of one request (a batch) and of each server check; a request past it makes "
        "its frames ERROR and the engine offline. Less than health.inference_stall_s",
    )
    check_interval_s: StrictFloat = Field(
        2.0,
        ge=0.1,
        le=600,
        description="triton: while online, how often the model's readiness is checked, so the status shows an "
        "outage even when no frame is being scored",
    )
    tls: EngineTlsConfig = Field(
        default_factory=EngineTlsConfig, description="triton: TLS on the gRPC channel (off by default)"
    )
    reconnect: ReconnectConfig = Field(
        default_factory=lambda: ReconnectConfig(),
        description="triton: backoff between attempts to reach the server again while it is offline",
    )


class ReconnectConfig(StrictModel):
    initial_s: StrictFloat = Field(0.5, ge=0.01, description="first wait after a failure")
    max_s: StrictFloat = Field(
        30.0, ge=0.01, description="longest wait between attempts (the wait doubles up to this); at least initial_s"
    )

    @field_validator("max_s")
    @classmethod
    def _not_below_initial(cls, max_s: float, info: ValidationInfo) -> float:
        initial = info.data.get("initial_s")
        if initial is not None and max_s < initial:
            raise expected(f"a value >= initial_s ({initial})", max_s)
        return max_s


EngineConfig.model_rebuild(force=True)  # engine.reconnect names ReconnectConfig, defined above only now


def _device_source(source: int | str, base: Any) -> int | str:
    if not (isinstance(source, int) and source >= 0) and not (isinstance(source, str) and source.startswith("/dev/")):
        raise expected("a device index >= 0 or a /dev/ path for kind 'device'", source)
    return source


def _file_source(kind: str, source: int | str, base: Any) -> str:
    if not isinstance(source, str) or not source:
        raise expected(f"a path for kind {kind!r}", source)
    if "://" in source:  # said here, before a path made of it (credentials and all) is quoted
        raise expected(f"a path for kind {kind!r} (a stream URL needs kind 'url')", source)
    path = _resolve(Path(source), base)
    if kind == "video":
        _require(path, Path.is_file, "an existing video file")
    if kind == "folder":
        _require(path, Path.is_dir, "an existing image folder")
    return str(path)


def _url_source(source: int | str, base: Any) -> str:
    if not isinstance(source, str) or not source.lower().startswith(URL_SCHEMES):
        raise expected("a URL starting with " + ", ".join(URL_SCHEMES), source)
    return source


def _gstreamer_source(source: int | str, base: Any) -> str:
    if not isinstance(source, str) or "appsink" not in source:
        raise expected("a GStreamer pipeline string ending in an appsink", source)
    return source


_SOURCE_CHECKS = {
    "device": _device_source,
    "video": lambda source, base: _file_source("video", source, base),
    "folder": lambda source, base: _file_source("folder", source, base),
    "url": _url_source,
    "gstreamer": _gstreamer_source,
}


class CameraSettingsConfig(StrictModel):
    """Capture properties locked on open (docs/CAMERAS.md): values as OpenCV's backend takes them."""

    auto_exposure: Union[StrictFloat, StrictInt, None] = Field(
        None,
        description="cv2.CAP_PROP_AUTO_EXPOSURE (V4L2: 1 = manual, 3 = auto; DirectShow: 0.25 = manual, 0.75 = "
        "auto); null = leave as is",
    )
    exposure: Union[StrictFloat, StrictInt, None] = Field(
        None, description="cv2.CAP_PROP_EXPOSURE in the backend's unit (V4L2: 100 µs steps); null = leave as is"
    )
    gain: Union[StrictFloat, StrictInt, None] = Field(None, description="cv2.CAP_PROP_GAIN; null = leave as is")
    auto_wb: Union[StrictFloat, StrictInt, None] = Field(
        None, description="cv2.CAP_PROP_AUTO_WB (0 = off, 1 = on); null = leave as is"
    )
    wb_temperature: Union[StrictFloat, StrictInt, None] = Field(
        None, description="cv2.CAP_PROP_WB_TEMPERATURE in kelvin (with auto_wb: 0); null = leave as is"
    )
    autofocus: Union[StrictFloat, StrictInt, None] = Field(
        None, description="cv2.CAP_PROP_AUTOFOCUS (0 = off, 1 = on); null = leave as is"
    )
    focus: Union[StrictFloat, StrictInt, None] = Field(
        None, description="cv2.CAP_PROP_FOCUS (with autofocus: 0); null = leave as is"
    )
    tolerance: StrictFloat = Field(
        0.02,
        ge=0,
        le=1,
        description="a read-back value further than this fraction of the set value (at least 0.02 absolute) "
        "from it is a mismatch: a warning in the status and the log, never a stop",
    )
    recheck_s: StrictFloat = Field(
        10.0, ge=0, description="read the properties back this often while capturing (0 = only on open)"
    )


class GatingConfig(StrictModel):
    """Frames not fit to be judged are ERROR results with the reason, before scoring (docs/CAMERAS.md)."""

    min_mean: Union[StrictFloat, StrictInt, None] = Field(
        None, ge=0, le=255, description="too dark: mean grey level (0-255) of the frame after ROI below this"
    )
    max_mean: Union[StrictFloat, StrictInt, None] = Field(
        None, ge=0, le=255, description="too bright: mean grey level (0-255) above this"
    )
    max_clipped: Union[StrictFloat, None] = Field(
        None,
        ge=0,
        le=1,
        description="too bright / too dark: fraction of pixels clipped (grey >= 250 or <= 5) above this; the "
        "reason says which end",
    )
    focus_min: Union[StrictFloat, StrictInt, None] = Field(
        None, ge=0, description="out of focus: variance of the Laplacian of the grey frame below this"
    )
    focus_reference: Union[ExistingFile, None] = Field(
        None, description="a sharp good frame (after ROI); with focus_min_ratio: out of focus relative to it"
    )
    focus_min_ratio: Union[StrictFloat, None] = Field(
        None,
        gt=0,
        le=10,
        description="out of focus: Laplacian variance below this fraction of focus_reference's (needs it)",
    )
    empty_reference: Union[ExistingFile, None] = Field(
        None, description="the empty station (after ROI); with presence_min_diff: no part present"
    )
    presence_min_diff: Union[StrictFloat, StrictInt, None] = Field(
        None,
        gt=0,
        le=255,
        description="no part: mean absolute grey difference to empty_reference (at 160 px width) below this "
        "(needs empty_reference)",
    )

    @model_validator(mode="after")
    def _references(self) -> GatingConfig:
        if self.focus_min_ratio is not None and self.focus_reference is None:
            raise expected(
                "a reference image when focus_min_ratio is set (required key missing)", at=("focus_reference",)
            )
        if self.presence_min_diff is not None and self.empty_reference is None:
            raise expected(
                "a reference image when presence_min_diff is set (required key missing)", at=("empty_reference",)
            )
        if self.min_mean is not None and self.max_mean is not None and self.min_mean >= self.max_mean:
            raise expected(f"a value above min_mean ({self.min_mean})", self.max_mean, ("max_mean",))
        return self

    @property
    def enabled(self) -> bool:
        return any(
            v is not None
            for v in (
                self.min_mean,
                self.max_mean,
                self.max_clipped,
                self.focus_min,
                self.focus_min_ratio,
                self.presence_min_diff,
            )
        )


def _polygons(value: Any) -> Any:
    """Each polygon: at least 3 [x, y] points, normalised to the frame after ROI (0-1)."""
    if value is None:
        return value
    for i, poly in enumerate(value):
        if len(poly) < 3:
            raise expected("a polygon of at least 3 [x, y] points", [list(p) for p in poly], (i,))
        for j, point in enumerate(poly):
            if len(point) != 2 or not all(0.0 <= float(c) <= 1.0 for c in point):
                raise expected("[x, y] with 0 <= x, y <= 1 (fractions of the frame after ROI)", list(point), (i, j))
    return value


Polygons = Annotated[tuple[tuple[tuple[Union[StrictFloat, StrictInt], ...], ...], ...], AfterValidator(_polygons)]


class CameraConfig(StrictModel):
    name: StrictStr = Field(description="unique name, part of the ZeroMQ topics: ASCII letters, digits, '-', '_'")
    kind: CameraKind = Field(
        description="source type: device (V4L2/DirectShow), video (file), url (FFmpeg stream), gstreamer "
        "(pipeline), folder (images in name order)"
    )
    source: Union[StrictInt, StrictStr] = Field(
        description="device: index >= 0 or a /dev/ path; video: file; url: rtsp, rtsps, http, https, rtmp, udp, tcp "
        "or srt URL; gstreamer: pipeline ending in an appsink; folder: image folder"
    )
    loop: StrictBool = Field(True, description="video/folder: start again at the end (false: the camera finishes)")
    fps: StrictFloat = Field(0.0, ge=0, description="cap on inspected frames per second (0 = no cap)")
    roi: Union[tuple[StrictInt, ...], None] = Field(
        None,
        description="crop [x, y, width, height] in source pixels (x, y >= 0; width, height > 0); null = whole frame",
    )
    queue_size: StrictInt = Field(4, ge=1, le=10_000, description="frames waiting for inference; the oldest is dropped")
    frames_are_parts: StrictBool = Field(
        False,
        description="every frame is a part (a hardware-triggered camera): a frame dropped because inference is "
        "behind is published as an ERROR result ('dropped: inference behind, not inspected', no inference), so "
        "every part gets a result; false (free-running sources): drops are only counted in the status `dropped`",
    )
    open_timeout_ms: StrictInt = Field(5000, ge=1, description="url: FFmpeg open timeout")
    read_timeout_ms: StrictInt = Field(5000, ge=1, description="url: FFmpeg read timeout")
    stall_s: StrictFloat = Field(
        5.0,
        ge=0.1,
        description="a read blocked longer than this reports the camera offline; it is reopened only when the "
        "read fails (url: read_timeout_ms)",
    )
    mode: Literal["continuous", "triggered"] = Field(
        "continuous",
        description="continuous: inspect every frame; triggered: only frames asked for by a trigger (needs "
        "trigger.enabled)",
    )
    settle_ms: StrictFloat = Field(
        0.0,
        ge=0,
        le=60_000,
        description="time for a part to come to rest: a trigger request is answered with the first frame whose "
        "capture started at least this long after the request arrived (0 = the first frame started after it; "
        "also the margin for frames a camera or network buffers); less than trigger.timeout_s",
    )
    reconnect: ReconnectConfig = Field(
        default_factory=ReconnectConfig, description="backoff between reconnect attempts"
    )
    settings: CameraSettingsConfig = Field(
        default_factory=CameraSettingsConfig,
        description="exposure, gain, white balance, focus locked through OpenCV capture properties on open, read "
        "back and reported (status `camera_settings`); unsupported by a backend: reported, not an error",
    )
    gating: GatingConfig = Field(
        default_factory=GatingConfig,
        description="frames too dark, too bright, out of focus or without a part: ERROR with the reason, not scored",
    )
    ignore_mask: Union[Polygons, None] = Field(
        None,
        description="regions that never raise a defect: polygons of [x, y] points as fractions (0-1) of the frame "
        "after ROI; the anomaly map is zeroed there before thresholding (calibration uses the same mask)",
    )

    def __repr_args__(self) -> Any:
        """repr() and str() hide the source's credentials: a config printed in a log is read by many."""
        for name, value in super().__repr_args__():
            yield name, redact_source(value) if name == "source" and isinstance(value, str) else value

    @property
    def shown_source(self) -> str:
        """The source as logs, the status topic and check-config may show it: credentials replaced by `***`."""
        return redact_source(str(self.source))

    @field_validator("name")
    @classmethod
    def _topic_safe(cls, name: str) -> str:
        # the wire protocol's own rule: a name it would refuse to publish must not pass check-config
        # (fullmatch: the pattern's `$` would let a trailing newline through)
        if not CAMERA_NAME.fullmatch(name):
            raise expected("ASCII letters, digits, '-' or '_' only (the name is part of the topic)", name)
        return name

    @field_validator("source")
    @classmethod
    def _fits_kind(cls, source: int | str, info: ValidationInfo) -> int | str:
        kind = info.data.get("kind")  # no kind: its own error is reported instead
        check = _SOURCE_CHECKS.get(kind) if isinstance(kind, str) else None
        return source if check is None else check(source, (info.context or {}).get("base"))

    @field_validator("roi")
    @classmethod
    def _is_a_box(cls, roi: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if roi is not None and (len(roi) != 4 or roi[0] < 0 or roi[1] < 0 or roi[2] <= 0 or roi[3] <= 0):
            raise expected("[x, y, width, height] with x, y >= 0 and width, height > 0", list(roi))
        return roi


def _zmq_endpoint(endpoint: str) -> str:
    if "://" not in endpoint:
        raise expected("a ZeroMQ endpoint such as tcp://127.0.0.1:5555", endpoint)
    return endpoint


Endpoint = Annotated[StrictStr, Field(min_length=1), AfterValidator(_zmq_endpoint)]


class MaskConfig(StrictModel):
    enabled: StrictBool = Field(True, description="send the anomaly mask PNG with each result")
    width: StrictInt = Field(0, ge=0, description="mask width in pixels (0 = model input width)")
    height: StrictInt = Field(0, ge=0, description="mask height in pixels (0 = model input height)")


class PreviewConfig(StrictModel):
    enabled: StrictBool = Field(
        False,
        description="send previews (JPEG of the frame as inspected, low-resolution heat map) on "
        "linewatch/<camera>/preview, for screens; results are unchanged",
    )
    max_fps: StrictFloat = Field(
        2.0, gt=0, le=100, description="previews of OK parts per second per camera at most; NOK and ERROR get one"
    )
    width: StrictInt = Field(320, ge=16, le=4096, description="JPEG width in pixels (never enlarged; aspect kept)")
    jpeg_quality: StrictInt = Field(80, ge=10, le=100, description="JPEG quality (OpenCV, 10-100)")
    heatmap_size: StrictInt = Field(64, ge=8, le=512, description="heat map PNG's longer side in pixels")


class PublishConfig(StrictModel):
    endpoint: Endpoint = Field(
        "tcp://127.0.0.1:5555",
        description="ZeroMQ PUB bind endpoint; beyond loopback only with security.curve or "
        "security.allow_insecure_bind",
    )
    hwm: StrictInt = Field(
        1000, ge=1, description="messages queued per subscriber before new ones are dropped (counted)"
    )
    status_interval_s: StrictFloat = Field(
        1.0, ge=0.05, le=60, description="period of the per-camera status (life bit)"
    )
    mask: MaskConfig = Field(default_factory=MaskConfig, description="the defect mask sent with each result")
    preview: PreviewConfig = Field(
        default_factory=PreviewConfig, description="optional preview stream for screens (off by default)"
    )


class TriggerConfig(StrictModel):
    enabled: StrictBool = Field(
        False, description="serve trigger requests {camera, part_id} on a ROUTER socket; needed by triggered cameras"
    )
    endpoint: Endpoint = Field(
        "tcp://127.0.0.1:5556",
        description="ZeroMQ ROUTER bind endpoint, not publish.endpoint; beyond loopback as for publish.endpoint",
    )
    timeout_s: StrictFloat = Field(
        5.0, ge=0.01, description="a triggered frame not inspected within this time: error reply"
    )


class SecurityConfig(StrictModel):
    curve: StrictBool = Field(False, description="CURVE authentication + encryption on the result and trigger sockets")
    server_secret_key_file: Union[ExistingFile, None] = Field(
        None, description="server key pair (zmq.auth format); required when curve is true"
    )
    authorized_keys_dir: Union[ExistingDir, None] = Field(
        None, description="folder of allowed clients' public keys; required when curve is true"
    )
    allow_insecure_bind: StrictBool = Field(
        False, description="allow binding beyond loopback without CURVE (trusted networks)"
    )

    @model_validator(mode="after")
    def _keys_for_curve(self) -> SecurityConfig:
        for key in ("server_secret_key_file", "authorized_keys_dir"):
            if self.curve and getattr(self, key) is None:
                raise expected("a path when security.curve is true (required key missing)", at=(key,))
        return self


class ArchiveConfig(StrictModel):
    enabled: StrictBool = Field(False, description="keep frames and masks of failed parts")
    dir: Union[ResolvedPath, None] = Field(
        None, description="archive folder (created if missing); required when enabled"
    )
    max_mb: StrictFloat = Field(1024.0, ge=0.001, description="size cap; the oldest files are deleted first")
    verdicts: tuple[Verdict, ...] = Field(
        (Verdict.NOK, Verdict.ERROR), description="which verdicts to keep: OK, NOK, ERROR"
    )
    queue_size: StrictInt = Field(64, ge=1, description="frames waiting to be written; more are skipped (counted)")

    @model_validator(mode="after")
    def _dir_when_enabled(self) -> ArchiveConfig:
        if self.enabled and self.dir is None:
            raise expected("a folder when archive.enabled is true (required key missing)", at=("dir",))
        return self


class MetricsConfig(StrictModel):
    enabled: StrictBool = Field(False, description="serve Prometheus metrics over HTTP")
    host: StrictStr = Field("127.0.0.1", description="listen address")
    port: StrictInt = Field(9108, ge=0, le=65535, description="listen port (0 = any free port)")


class LoggingConfig(StrictModel):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="least severe message logged (to stderr, i.e. journald under systemd)"
    )


class HealthConfig(StrictModel):
    inference_stall_s: StrictFloat = Field(
        10.0,
        ge=0.5,
        description="frames waiting but no batch finished for this long (or 3 × the slowest recent batch, if "
        "longer, so a slow CPU is not taken for a hang): stop the systemd watchdog pings (systemd restarts us)",
    )
    camera_hang_s: StrictFloat = Field(
        60.0, ge=1, description="a capture call blocked this long: stop the watchdog pings"
    )
    drain_timeout_s: StrictFloat = Field(
        5.0,
        ge=0,
        description="on SIGTERM: time to inspect and publish what was captured; frames still waiting then are "
        "published as ERROR ('shutdown: not inspected'), so every captured frame gets one message",
    )
    exit_when_sources_end: StrictBool = Field(
        False, description="stop (exit 0) once every camera has finished its file/folder"
    )


class DriftConfig(StrictModel):
    enabled: StrictBool = Field(
        True,
        description="compare recent parts' image scores with the calibration's good parts (CUSUM, per camera): "
        "status `drift`, log and metrics say ok / warn / alarm (docs/CALIBRATION.md, Drift watch)",
    )
    quantile: StrictFloat = Field(
        0.9, ge=0.5, le=0.99, description="a part exceeds when its score is above this quantile of the good scores"
    )
    detect_rate: StrictFloat = Field(
        0.3, gt=0, lt=1, description="exceed rate the test is tuned to detect fastest (at least twice the bound)"
    )
    confidence: StrictFloat = Field(
        0.95,
        ge=0.5,
        lt=1,
        description="the false-alarm bounds hold for at least this fraction of calibration samples",
    )
    warn_arl0: StrictFloat = Field(
        1e4, ge=2, le=1e7, description="parts until a false warn under no drift (average, at least)"
    )
    alarm_arl0: StrictFloat = Field(
        1e5, ge=2, le=1e8, description="parts until a false alarm under no drift (average, at least)"
    )


class RecipeCameraConfig(StrictModel):
    roi: Union[tuple[StrictInt, ...], None] = Field(
        None,
        description="a further crop [x, y, width, height] of the camera's image (after the camera's own roi) for "
        "this recipe, applied by the inference thread with the recipe's model; null = the whole image",
    )
    ignore_mask: Union[Polygons, None] = Field(
        None, description="replaces the camera's ignore_mask for this recipe (same format); null = the camera's"
    )

    @field_validator("roi")
    @classmethod
    def _is_a_box(cls, roi: tuple[int, ...] | None) -> tuple[int, ...] | None:
        return CameraConfig._is_a_box(roi)


class RecipeConfig(StrictModel):
    bundle: ExistingDir = Field(description="this recipe's model bundle (metadata.json, model.onnx, calibration.json)")
    precision: Literal[tuple(PRECISIONS)] = Field(  # type: ignore[valid-type]
        "fp32", description="which of the bundle's graphs runs (as model.precision)"
    )
    golden: Union[ExistingDir, None] = Field(
        None, description="this recipe's golden set (as model.golden); null = no golden check for it"
    )
    cameras: dict[StrictStr, RecipeCameraConfig] = Field(
        default_factory=dict, description="per camera name: roi and ignore_mask of this recipe"
    )


class VerifyConfig(StrictModel):
    force_swaps: StrictBool = Field(
        False,
        description="let a model swap (start, SIGHUP reload, recipe switch) go live although its golden set fails "
        "(logged as an error); a `recipe` request can force one switch with `force: true`",
    )


class HistoryConfig(StrictModel):
    """A record of every published result, OK included, for traceability (docs/HISTORY.md)."""

    enabled: StrictBool = Field(
        True,
        description="record every published result (time, camera, recipe, part id, verdict, score, regions, model, "
        "calibration, archived frame) in a database; written on its own thread: a full disk or an unreachable "
        "server loses records (counted in the status `history` and the metrics), never results",
    )
    backend: Literal["sqlite", "postgresql"] = Field(
        "sqlite",
        description="sqlite: one local file (WAL); postgresql: a plant-wide server (needs dsn and "
        "pip install 'linewatch[postgresql]')",
    )
    path: Union[ResolvedPath, None] = Field(
        None,
        description="sqlite file (folder created if missing); default: history-<config name>.sqlite in "
        "$STATE_DIRECTORY under systemd (/var/lib/linewatch), else beside the config file",
    )
    dsn: Union[StrictStr, None] = Field(
        None,
        description="postgresql: libpq connection string or URI (e.g. 'host=db.plant user=linewatch "
        "dbname=quality'; a password is better kept in ~/.pgpass or PGPASSWORD); required with backend postgresql",
    )
    max_mb: StrictFloat = Field(
        2048.0,
        ge=0,
        description="sqlite: size cap of the database's pages; the oldest records go first (0 = no cap). "
        "Not applied to postgresql (the server's administrator sizes it)",
    )
    max_days: StrictFloat = Field(
        365.0, ge=0, description="records older than this many days are deleted (0 = kept until max_mb)"
    )
    queue_size: StrictInt = Field(
        10_000, ge=1, le=1_000_000, description="records waiting to be written; more are lost (counted)"
    )
    station: Union[StrictStr, None] = Field(
        None, description="name of this line PC in each record (plant-wide databases); default: the host name"
    )

    @model_validator(mode="after")
    def _dsn_for_postgresql(self) -> HistoryConfig:
        if self.enabled and self.backend == "postgresql" and not self.dsn:
            raise expected("a connection string when backend is postgresql (required key missing)", at=("dsn",))
        return self


# --- the whole file -------------------------------------------------------------------------------------------


class Config(StrictModel):
    model: ModelConfig = Field(description="the model bundle that judges the frames")
    cameras: tuple[CameraConfig, ...] = Field(
        min_length=1, description="the cameras to inspect, one capture thread each (at least one)"
    )
    engine: EngineConfig = Field(default_factory=EngineConfig, description="ONNX Runtime engine and batching")
    publish: PublishConfig = Field(
        default_factory=PublishConfig, description="results and per-camera status on a ZeroMQ PUB socket"
    )
    trigger: TriggerConfig = Field(
        default_factory=TriggerConfig, description="PLC/MES request-reply: {camera, part_id} in, that part's result out"
    )
    security: SecurityConfig = Field(
        default_factory=SecurityConfig, description="ZeroMQ CURVE on the result and trigger sockets"
    )
    archive: ArchiveConfig = Field(
        default_factory=ArchiveConfig, description="frames and masks of failed parts kept on disk"
    )
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Prometheus metrics over HTTP")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="log output")
    health: HealthConfig = Field(default_factory=HealthConfig, description="watchdog and shutdown timings")
    drift: DriftConfig = Field(
        default_factory=DriftConfig, description="drift watch: are parts still scored like the calibration's good parts"
    )
    recipes: dict[StrictStr, RecipeConfig] = Field(
        default_factory=dict,
        description="product variants besides 'default' (the model section and the cameras' roi/ignore_mask), "
        "by name (letters, digits, '-', '_'); all preloaded at start, switched by a trigger `recipe` request "
        "(docs/RECIPES.md)",
    )
    recipe: StrictStr = Field("default", description="recipe active at start; a SIGHUP that changes it switches to it")
    verify: VerifyConfig = Field(default_factory=VerifyConfig, description="golden-set checks of model swaps")
    history: HistoryConfig = Field(
        default_factory=HistoryConfig, description="a record of every result for traceability (docs/HISTORY.md)"
    )

    _path: Union[Path, None] = PrivateAttr(None)

    @property
    def path(self) -> Path | None:
        """The file this config was read from: set by load_config, never a key of the file."""
        return self._path

    def camera(self, name: str) -> CameraConfig:
        for cam in self.cameras:
            if cam.name == name:
                return cam
        raise ConfigError(f"{self.path}: no camera named {name!r} (have: {', '.join(c.name for c in self.cameras)})")

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        _check_unique_names(self.cameras)
        _check_remote_engine(self)
        _check_recipes(self)
        if self.trigger.enabled and self.trigger.endpoint == self.publish.endpoint:
            raise expected(
                "an endpoint different from publish.endpoint", self.trigger.endpoint, ("trigger", "endpoint")
            )
        _check_binds(self)
        _check_settle(self)
        triggered = [c.name for c in self.cameras if c.mode == "triggered"]
        if triggered and not self.trigger.enabled:
            raise expected(
                f"true when a camera is in triggered mode (camera {triggered[0]!r})", False, ("trigger", "enabled")
            )
        return self


def _check_unique_names(cameras: tuple[CameraConfig, ...]) -> None:
    seen: set[str] = set()
    for i, cam in enumerate(cameras):
        if cam.name in seen:
            raise expected("a unique camera name", cam.name, ("cameras", i, "name"))
        seen.add(cam.name)


def _check_recipes(cfg: Config) -> None:
    """Recipe names travel in results and trigger requests; a recipe's cameras must be the config's."""
    cameras = {c.name for c in cfg.cameras}
    for name, recipe in cfg.recipes.items():
        if not CAMERA_NAME.fullmatch(name) or name == "default":
            raise expected("a recipe name of letters, digits, '-', '_' other than 'default'", name, ("recipes",))
        for cam in recipe.cameras:
            if cam not in cameras:
                raise expected(f"a camera of this config ({', '.join(sorted(cameras))})", cam, ("recipes", name))
    if cfg.recipe != "default" and cfg.recipe not in cfg.recipes:
        raise expected(
            f"'default' or a recipe of recipes ({', '.join(cfg.recipes) or 'none'})", cfg.recipe, ("recipe",)
        )


def _check_remote_engine(cfg: Config) -> None:
    """backend triton needs a server address; a request deadline past the stall limit would read as a hung engine."""
    engine = cfg.engine
    if engine.backend != "triton":
        return
    if engine.url is None:
        raise expected(
            "host:port of the Triton server when engine.backend is triton (required key missing)", at=("engine", "url")
        )
    if "://" in engine.url or ":" not in engine.url.strip("[]"):
        raise expected("host:port (gRPC, no scheme), e.g. gpu1.line:8001", engine.url, ("engine", "url"))
    if engine.timeout_s >= cfg.health.inference_stall_s:
        raise expected(
            f"less than health.inference_stall_s ({cfg.health.inference_stall_s:g} s): a request waiting longer "
            "would stop the watchdog instead of reporting the engine offline",
            engine.timeout_s,
            ("engine", "timeout_s"),
        )


def _check_settle(cfg: Config) -> None:
    """A settle time the trigger timeout cannot cover would fail every request of that camera."""
    if not cfg.trigger.enabled:
        return
    for i, cam in enumerate(cfg.cameras):
        if cam.settle_ms >= cfg.trigger.timeout_s * 1000:
            raise expected(
                f"less than trigger.timeout_s ({cfg.trigger.timeout_s:g} s)", cam.settle_ms, ("cameras", i, "settle_ms")
            )


def _check_binds(cfg: Config) -> None:
    """Clear-text binds beyond loopback are refused here too, so check-config catches what the sockets would."""
    binds = [("publish", cfg.publish.endpoint)] + ([("trigger", cfg.trigger.endpoint)] if cfg.trigger.enabled else [])
    for section, endpoint in binds:
        try:
            check_bind_security(endpoint, cfg.security.curve, cfg.security.allow_insecure_bind, key="")
        except ConfigError as exc:
            raise Problem(str(exc).strip(), (section, "endpoint")) from None
    metrics = cfg.metrics
    if metrics.enabled and not (cfg.security.allow_insecure_bind or is_loopback_host(metrics.host)):
        raise expected(
            "a loopback address (the metrics endpoint has no authentication), or security.allow_insecure_bind: true",
            metrics.host,
            ("metrics", "host"),
        )


def load_config(path: str | Path) -> Config:
    """Read and validate a daemon config; every problem raises ConfigError naming the file and key."""
    path = Path(path)
    if not _is_file(path):
        raise ConfigError(f"config file not found: {path}")
    data = _read_yaml(path)
    file = path.resolve()
    cfg = validate(Config, {} if data is None else data, file, context={"base": file.parent})
    cfg._path = file
    return cfg


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long for the file system, ...
        return False


def _read_yaml(path: Path) -> Any:
    """The file's YAML document, bounded in size and in what its aliases expand to; ConfigError otherwise."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB: not a linewatch config")
        return _parse_yaml(raw.decode("utf-8"), path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except ValueError as exc:  # PyYAML's own constructors: a 5000-digit integer, February 30th
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a linewatch config") from None


def _parse_yaml(text: str, path: Path) -> Any:
    """yaml.safe_load, with the node graph checked before it is built into Python objects."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}, set()) > MAX_YAML_NODES:
            raise ConfigError(
                f"{path}: its aliases expand to more than {MAX_YAML_NODES} values: not a linewatch config"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Number of values `node` stands for once every alias (and `<<` merge) is expanded, counted without expanding:
    an alias is the node it names, so each node's size is computed once."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise yaml.YAMLError("an alias refers to a node that contains it")
    open_nodes.add(key)
    if isinstance(node, yaml.SequenceNode):
        children: list[yaml.Node] = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = []
    size = 1
    for child in children:
        size += _expanded_size(child, sizes, open_nodes)
        if size > MAX_YAML_NODES:
            break
    open_nodes.discard(key)
    sizes[key] = size
    return size


def describe(cfg: Config) -> str:
    cams = ", ".join(f"{c.name} ({c.kind}: {c.shown_source})" for c in cfg.cameras)
    return (
        f"model {cfg.model.bundle}; cameras: {cams}; results on {cfg.publish.endpoint}"
        + (f"; trigger on {cfg.trigger.endpoint}" if cfg.trigger.enabled else "")
        + ("; CURVE on" if cfg.security.curve else "")
    )


def cli_check_config(args: argparse.Namespace) -> int:
    """`linewatch check-config FILE`: everything `linewatch run` checks before READY (linewatch.line.preflight),
    starting nothing. Exit 0 and a one-line summary; else every problem on stderr, exit 2 (config) or 3 (bundle)."""
    import sys

    from linewatch.line.preflight import exit_code, preflight

    cfg = load_config(args.config)
    problems = preflight(cfg)
    if problems:
        print(
            f"{cfg.path}: {len(problems)} problem(s): `linewatch run` would fail or not judge parts:", file=sys.stderr
        )
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return exit_code(problems)
    print(f"{cfg.path}: OK: {describe(cfg)}")
    return 0
