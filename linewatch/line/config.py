"""The daemon's config file: typed dataclasses, strictly validated on load (torch-free).

A line runs unattended, so a typo must stop the start-up with the file, the key path and what was expected,
never be ignored: unknown keys, wrong types, out-of-range numbers and missing files are all refused.
Relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from linewatch.bundle import PRECISIONS
from linewatch.errors import ConfigError

log = logging.getLogger("linewatch.line.config")

CAMERA_KINDS = ("device", "video", "url", "gstreamer", "folder")
URL_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://", "rtmp://", "udp://", "tcp://", "srt://")
VERDICTS = ("OK", "NOK", "ERROR")


def _opt(default: Any = dataclasses.MISSING, *, doc: str = "", **rules: Any) -> Any:
    """A field with validation rules: min, max, choices, exists ("file" | "dir"), nonempty."""
    kwargs: dict[str, Any] = {"metadata": {"doc": doc, **rules}}
    if isinstance(default, (list, dict, set)):
        kwargs["default_factory"] = lambda d=default: type(d)(d)
    elif default is not dataclasses.MISSING:
        kwargs["default"] = default
    return field(**kwargs)


@dataclass(frozen=True)
class ModelConfig:
    bundle: Path = _opt(exists="dir", doc="model bundle directory (metadata.json, model.onnx, calibration.json)")
    precision: str = _opt(
        "fp32",
        choices=PRECISIONS,
        doc="which of the bundle's graphs runs: fp32, fp16 (GPU), int8 (CPU); calibrate with the same one",
    )


@dataclass(frozen=True)
class EngineConfig:
    providers: tuple[str, ...] = _opt(("auto",), nonempty=True, doc="ONNX Runtime providers: auto, cpu, cuda, tensorrt")
    threads: int = _opt(0, min=0, doc="CPU provider intra-op threads (0 = ONNX Runtime default)")
    max_batch: int = _opt(8, min=1, max=1024, doc="frames scored together, across cameras")
    max_wait_ms: float = _opt(5.0, min=0, max=10_000, doc="how long a partial batch waits for more frames")
    warmup: bool = _opt(True, doc="score dummy batches before READY (TensorRT builds its engines then)")


@dataclass(frozen=True)
class ReconnectConfig:
    initial_s: float = _opt(0.5, min=0.01, doc="first wait after a failure")
    max_s: float = _opt(30.0, min=0.01, doc="longest wait between attempts (the wait doubles up to this)")


@dataclass(frozen=True)
class CameraConfig:
    name: str = _opt(nonempty=True, doc="unique name, used in topics: letters, digits, '-', '_'")
    kind: Literal["device", "video", "url", "gstreamer", "folder"] = _opt(doc="source type")
    source: Union[int, str] = _opt(doc="device index, file, URL, pipeline string or folder")
    loop: bool = _opt(True, doc="video/folder: start again at the end (false: the camera finishes)")
    fps: float = _opt(0.0, min=0, doc="cap on inspected frames per second (0 = no cap)")
    roi: Union[tuple[int, ...], None] = _opt(None, doc="crop [x, y, width, height] in source pixels")
    queue_size: int = _opt(4, min=1, max=10_000, doc="frames waiting for inference; the oldest is dropped")
    open_timeout_ms: int = _opt(5000, min=1, doc="url: FFmpeg open timeout")
    read_timeout_ms: int = _opt(5000, min=1, doc="url: FFmpeg read timeout")
    stall_s: float = _opt(5.0, min=0.1, doc="no frame for this long: the camera is offline and reopened")
    mode: Literal["continuous", "triggered"] = _opt("continuous", doc="triggered: inspect only frames asked for")
    reconnect: ReconnectConfig = _opt(ReconnectConfig(), doc="backoff between reconnect attempts")


@dataclass(frozen=True)
class MaskConfig:
    enabled: bool = _opt(True, doc="send the anomaly mask PNG with each result")
    width: int = _opt(0, min=0, doc="mask width in pixels (0 = model input width)")
    height: int = _opt(0, min=0, doc="mask height in pixels (0 = model input height)")


@dataclass(frozen=True)
class PublishConfig:
    endpoint: str = _opt("tcp://127.0.0.1:5555", nonempty=True, doc="ZeroMQ PUB bind endpoint")
    hwm: int = _opt(1000, min=1, doc="messages queued per subscriber before new ones are dropped (counted)")
    status_interval_s: float = _opt(1.0, min=0.05, max=60, doc="period of the per-camera status (life bit)")
    mask: MaskConfig = _opt(MaskConfig())


@dataclass(frozen=True)
class TriggerConfig:
    enabled: bool = _opt(False, doc="serve trigger requests {camera, part_id} on a ROUTER socket")
    endpoint: str = _opt("tcp://127.0.0.1:5556", nonempty=True, doc="ZeroMQ ROUTER bind endpoint")
    timeout_s: float = _opt(5.0, min=0.01, doc="a triggered frame not inspected within this time: error reply")


@dataclass(frozen=True)
class SecurityConfig:
    curve: bool = _opt(False, doc="CURVE authentication + encryption on the result and trigger sockets")
    server_secret_key_file: Union[Path, None] = _opt(None, exists="file", doc="server key pair (zmq.auth format)")
    authorized_keys_dir: Union[Path, None] = _opt(None, exists="dir", doc="folder of allowed clients' public keys")
    allow_insecure_bind: bool = _opt(False, doc="allow binding beyond loopback without CURVE (trusted networks)")


@dataclass(frozen=True)
class ArchiveConfig:
    enabled: bool = _opt(False, doc="keep frames and masks of failed parts")
    dir: Union[Path, None] = _opt(None, doc="archive folder (created if missing)")
    max_mb: float = _opt(1024.0, min=0.001, doc="size cap; the oldest files are deleted first")
    verdicts: tuple[str, ...] = _opt(("NOK", "ERROR"), choices=VERDICTS, doc="which verdicts to keep")
    queue_size: int = _opt(64, min=1, doc="frames waiting to be written; more are skipped (counted)")


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = _opt(False, doc="serve Prometheus metrics over HTTP")
    host: str = _opt("127.0.0.1", doc="listen address")
    port: int = _opt(9108, min=0, max=65535, doc="listen port (0 = any free port)")


@dataclass(frozen=True)
class LoggingConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = _opt("INFO")


@dataclass(frozen=True)
class HealthConfig:
    inference_stall_s: float = _opt(
        10.0,
        min=0.5,
        doc="frames waiting but no batch finished for this long: stop the systemd watchdog pings (systemd restarts us)",
    )
    camera_hang_s: float = _opt(60.0, min=1, doc="a capture call blocked this long: stop the watchdog pings")
    drain_timeout_s: float = _opt(5.0, min=0, doc="on SIGTERM: time to inspect and publish what was captured")
    exit_when_sources_end: bool = _opt(False, doc="stop (exit 0) once every camera has finished its file/folder")


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    cameras: tuple[CameraConfig, ...] = _opt(nonempty=True)
    engine: EngineConfig = _opt(EngineConfig())
    publish: PublishConfig = _opt(PublishConfig())
    trigger: TriggerConfig = _opt(TriggerConfig())
    security: SecurityConfig = _opt(SecurityConfig())
    archive: ArchiveConfig = _opt(ArchiveConfig())
    metrics: MetricsConfig = _opt(MetricsConfig())
    logging: LoggingConfig = _opt(LoggingConfig())
    health: HealthConfig = _opt(HealthConfig())
    path: Union[Path, None] = None  # set by load_config, not read from the file

    def camera(self, name: str) -> CameraConfig:
        for cam in self.cameras:
            if cam.name == name:
                return cam
        raise ConfigError(f"{self.path}: no camera named {name!r} (have: {', '.join(c.name for c in self.cameras)})")


# --- generic strict builder -------------------------------------------------------------------------------


class _Ctx:
    def __init__(self, file: Path):
        self.file = file
        self.base = file.parent

    def missing(self, keypath: str, what: str, path: Path) -> ConfigError:
        return ConfigError(f"{self.file}: {keypath}: expected {what}, but {path} does not exist")

    def fail(self, keypath: str, expected: str, got: Any = dataclasses.MISSING) -> ConfigError:
        msg = f"{self.file}: {keypath or '<top level>'}: expected {expected}"
        if got is not dataclasses.MISSING:
            msg += f", got {_show(got)}"
        return ConfigError(msg)


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) < 60 else text[:57] + '...'}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", Path: "a path"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(tp: Any, value: Any, key: str, ctx: _Ctx, rules: dict) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key, ctx, rules)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ctx.fail(key, _type_name(tp), value)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ctx.fail(key, _type_name(tp), value)
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ctx.fail(key, _type_name(tp), value)
        item_tp = typing.get_args(tp)[0]
        return tuple(_convert(item_tp, v, f"{key}[{i}]", ctx, rules) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, ctx)
    if tp is bool:
        if not isinstance(value, bool):
            raise ctx.fail(key, "true/false", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ctx.fail(key, "an integer", value)
        return _check_range(value, key, ctx, rules)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ctx.fail(key, "a number", value)
        return _check_range(float(value), key, ctx, rules)
    if tp is str:
        if not isinstance(value, str):
            raise ctx.fail(key, "a string", value)
        if "choices" in rules and value not in rules["choices"]:
            raise ctx.fail(key, "one of " + ", ".join(rules["choices"]), value)
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ctx.fail(key, "a path", value)
        path = Path(value).expanduser()
        path = path if path.is_absolute() else (ctx.base / path)
        exists = rules.get("exists")
        if exists == "dir" and not path.is_dir():
            raise ctx.missing(key, "an existing directory", path)
        if exists == "file" and not path.is_file():
            raise ctx.missing(key, "an existing file", path)
        return path
    raise TypeError(f"config field type not supported: {tp}")


def _check_range(value: float, key: str, ctx: _Ctx, rules: dict) -> Any:
    if "min" in rules and value < rules["min"]:
        raise ctx.fail(key, f"a value >= {rules['min']}", value)
    if "max" in rules and value > rules["max"]:
        raise ctx.fail(key, f"a value <= {rules['max']}", value)
    return value


def _build(cls: type, data: Any, keypath: str, ctx: _Ctx) -> Any:
    if not isinstance(data, dict):
        raise ctx.fail(keypath, "a mapping", data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "path"}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        where = f"{keypath}.{unknown[0]}" if keypath else unknown[0]
        raise ConfigError(f"{ctx.file}: {where}: unknown key (known keys here: {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        key = f"{keypath}.{name}" if keypath else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ctx.fail(key, f"{_type_name(hints[name])} (required key missing)")
            continue
        rules = dict(f.metadata)
        value = _convert(hints[name], data[name], key, ctx, rules)
        if rules.get("nonempty") and not value:
            raise ctx.fail(key, f"a non-empty {_type_name(hints[name])}", value)
        values[name] = value
    return cls(**values)


# --- cross-field checks -----------------------------------------------------------------------------------


def _check_camera(cam: CameraConfig, key: str, ctx: _Ctx) -> CameraConfig:
    if not all(c.isalnum() or c in "-_" for c in cam.name):
        raise ctx.fail(f"{key}.name", "letters, digits, '-' or '_' only (it is part of the topic)", cam.name)
    src, skey = cam.source, f"{key}.source"
    if cam.kind == "device":
        if not (isinstance(src, int) and src >= 0) and not (isinstance(src, str) and src.startswith("/dev/")):
            raise ctx.fail(skey, "a device index >= 0 or a /dev/ path for kind 'device'", src)
    elif cam.kind in ("video", "folder"):
        if not isinstance(src, str) or not src:
            raise ctx.fail(skey, f"a path for kind {cam.kind!r}", src)
        path = Path(src).expanduser()
        path = path if path.is_absolute() else ctx.base / path
        if cam.kind == "video" and not path.is_file():
            raise ctx.missing(skey, "an existing video file", path)
        if cam.kind == "folder" and not path.is_dir():
            raise ctx.missing(skey, "an existing image folder", path)
        cam = dataclasses.replace(cam, source=str(path))
    elif cam.kind == "url":
        if not isinstance(src, str) or not src.lower().startswith(URL_SCHEMES):
            raise ctx.fail(skey, "a URL starting with " + ", ".join(URL_SCHEMES), src)
    elif cam.kind == "gstreamer":
        if not isinstance(src, str) or "appsink" not in src:
            raise ctx.fail(skey, "a GStreamer pipeline string ending in an appsink", src)
    if cam.roi is not None:
        if len(cam.roi) != 4 or cam.roi[0] < 0 or cam.roi[1] < 0 or cam.roi[2] <= 0 or cam.roi[3] <= 0:
            raise ctx.fail(f"{key}.roi", "[x, y, width, height] with x, y >= 0 and width, height > 0", list(cam.roi))
    if cam.reconnect.max_s < cam.reconnect.initial_s:
        raise ctx.fail(
            f"{key}.reconnect.max_s", f"a value >= initial_s ({cam.reconnect.initial_s})", cam.reconnect.max_s
        )
    return cam


def _check(cfg: Config, ctx: _Ctx) -> Config:
    cams, seen = [], set()
    for i, cam in enumerate(cfg.cameras):
        if cam.name in seen:
            raise ctx.fail(f"cameras[{i}].name", "a unique camera name", cam.name)
        seen.add(cam.name)
        cams.append(_check_camera(cam, f"cameras[{i}]", ctx))
    cfg = dataclasses.replace(cfg, cameras=tuple(cams))
    for key, endpoint in (("publish.endpoint", cfg.publish.endpoint), ("trigger.endpoint", cfg.trigger.endpoint)):
        if "://" not in endpoint:
            raise ctx.fail(key, "a ZeroMQ endpoint such as tcp://127.0.0.1:5555", endpoint)
    if cfg.trigger.enabled and cfg.trigger.endpoint == cfg.publish.endpoint:
        raise ctx.fail("trigger.endpoint", "an endpoint different from publish.endpoint", cfg.trigger.endpoint)
    sec = cfg.security
    if sec.curve and (sec.server_secret_key_file is None or sec.authorized_keys_dir is None):
        missing = "server_secret_key_file" if sec.server_secret_key_file is None else "authorized_keys_dir"
        raise ctx.fail(f"security.{missing}", "a path when security.curve is true (required key missing)")
    from linewatch.protocol.curve import check_bind_security

    binds = [("publish.endpoint", cfg.publish.endpoint)]
    binds += [("trigger.endpoint", cfg.trigger.endpoint)] if cfg.trigger.enabled else []
    for key, endpoint in binds:
        try:
            check_bind_security(endpoint, sec.curve, sec.allow_insecure_bind, key)
        except ConfigError as exc:
            raise ConfigError(f"{ctx.file}: {exc}") from None
    if cfg.archive.enabled and cfg.archive.dir is None:
        raise ctx.fail("archive.dir", "a folder when archive.enabled is true (required key missing)")
    if any(c.mode == "triggered" for c in cfg.cameras) and not cfg.trigger.enabled:
        name = next(c.name for c in cfg.cameras if c.mode == "triggered")
        raise ctx.fail("trigger.enabled", f"true when a camera is in triggered mode (camera {name!r})", False)
    return cfg


def load_config(path: str | Path) -> Config:
    """Read and validate a daemon config; every problem raises ConfigError naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    ctx = _Ctx(path.resolve())
    cfg = _build(Config, data if data is not None else {}, "", ctx)
    cfg = dataclasses.replace(_check(cfg, ctx), path=path.resolve())
    return cfg


def describe(cfg: Config) -> str:
    cams = ", ".join(f"{c.name} ({c.kind}: {c.source})" for c in cfg.cameras)
    return (
        f"model {cfg.model.bundle}; cameras: {cams}; results on {cfg.publish.endpoint}"
        + (f"; trigger on {cfg.trigger.endpoint}" if cfg.trigger.enabled else "")
        + ("; CURVE on" if cfg.security.curve else "")
    )


def cli_check_config(args) -> int:
    """`linewatch check-config FILE`: validate only; exit 0 and a one-line summary, or exit 2 with the reason."""
    cfg = load_config(args.config)
    print(f"{cfg.path}: OK: {describe(cfg)}")
    return 0
