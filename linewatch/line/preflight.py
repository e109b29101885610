"""`linewatch check-config`: what `linewatch run` checks before READY, without starting anything (torch-free).

The unit's ExecStartPre runs it, and people run it before a restart: a config that passes must start and judge
parts, so beyond the schema it checks the bundle (metadata, the graph of the configured precision and its sha256,
an ONNX Runtime session that scores one frame), the calibration (present, valid, made with this graph: without it
every result would be ERROR), the camera backends, the CURVE key files, the folders the daemon writes and the
endpoints it binds. Every problem is collected, not only the first, so one run lists all there is to fix.

Left to `run`: TensorRT engine builds (minutes on a first start, more than ExecStartPre's start timeout allows), so
a TensorRT provider is only checked to be offered by ONNX Runtime, and the session here uses the others.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np

from linewatch import bundle
from linewatch.errors import BundleError, ConfigError, LinewatchError
from linewatch.line.config import Config

T = TypeVar("T")

UNCALIBRATED = "`linewatch run` would start but publish every result as ERROR"


def preflight(cfg: Config) -> list[LinewatchError]:
    """Every reason `linewatch run` with `cfg` would fail to start or could not judge a part (empty: it can)."""
    problems: list[LinewatchError] = []

    def check(step: Callable[..., T], *args: Any) -> T | None:
        try:
            return step(*args)
        except LinewatchError as exc:
            problems.append(exc)
            return None

    meta = check(bundle.read_metadata, cfg.model.bundle)
    graph_ok = meta is not None and check(_graph_scores, cfg) is True
    check(_calibration, cfg, graph_ok)
    for name in cfg.recipes:  # every recipe is loaded at start; one that cannot be could never be switched to
        check(_recipe, cfg, name)
    if cfg.engine.backend == "triton" and graph_ok:
        check(_remote_engine, cfg)
    from linewatch.line.cameras import check_backend

    for cam in cfg.cameras:
        check(check_backend, cam)
    if cfg.security.curve:
        check(_curve_keys, cfg)
    if cfg.archive.enabled and cfg.archive.dir is not None:
        check(_writable_dir, cfg.archive.dir, "archive.dir")
    check(_trt_cache, cfg, meta)
    check(_bindable, cfg.publish.endpoint, "publish.endpoint")
    if cfg.trigger.enabled:
        check(_bindable, cfg.trigger.endpoint, "trigger.endpoint")
    if cfg.metrics.enabled and cfg.metrics.port:
        check(_http_bindable, cfg.metrics.host, cfg.metrics.port)
    return problems


def exit_code(problems: list[LinewatchError]) -> int:
    """2 when anything in the config itself must change, else 3 (only the bundle): errors.EXIT_CODES."""
    return 2 if any(not isinstance(p, BundleError) for p in problems) else 3


# --- the bundle ---------------------------------------------------------------------------------------------


def _graph_scores(cfg: Config) -> bool:
    """The configured precision's graph exists, matches its sha256, loads in ONNX Runtime and scores a frame."""
    from linewatch.line.engine import TENSORRT, Engine, _ort, graph_file, parse_providers

    bundle_dir = cfg.model.bundle
    graph_file(bundle_dir, bundle.read_metadata(bundle_dir), cfg.model.precision)  # the bundle's own words first
    wanted, explicit = parse_providers(cfg.engine.providers)
    if explicit and TENSORRT in wanted and TENSORRT not in _ort().get_available_providers():
        raise ConfigError("engine.providers: tensorrt requested, but this ONNX Runtime does not offer it")
    # explicit providers must load, as in `run`; `auto` falls back to the CPU there, so the CPU answers for it here
    providers = ([p for p in wanted if p != TENSORRT] or ["cpu"]) if explicit else ["cpu"]
    engine_log = logging.getLogger("linewatch.line.engine")
    level = engine_log.level
    engine_log.setLevel(logging.WARNING)  # its "engine ... on CPU" line would describe this check, not the run
    try:
        engine = Engine(bundle_dir, providers, cfg.model.precision, cfg.engine.threads or None, max_batch=1)
    finally:
        engine_log.setLevel(level)
    height, width = engine.input_size
    try:
        maps, scores = engine.score(np.full((1, height, width, 3), 128, np.uint8))
    except Exception as exc:  # ONNX Runtime's own exception types
        raise BundleError(f"{engine.graph_path}: loads, but cannot score a frame: {exc}") from exc
    if maps.shape != (1, height, width) or scores.shape != (1,):
        raise BundleError(
            f"{engine.graph_path}: scoring one frame gave maps {maps.shape} and scores {scores.shape}, "
            f"expected (1, {height}, {width}) and (1,)"
        )
    return True


def _recipe(cfg: Config, name: str) -> None:
    """A recipe's bundle, graph and calibration, checked as the model section's are (docs/RECIPES.md)."""
    recipe = cfg.recipes[name]
    model = cfg.model.model_copy(update={"bundle": recipe.bundle, "precision": recipe.precision})
    as_model = cfg.model_copy(update={"model": model})
    try:
        bundle.read_metadata(recipe.bundle)
        _calibration(as_model, _graph_scores(as_model) is True)
    except LinewatchError as exc:
        raise type(exc)(f"recipes.{name}: {exc}") from None


def _calibration(cfg: Config, graph_ok: bool) -> None:
    """Thresholds for the graph that runs; without them `run` starts but no part can be judged."""
    from linewatch.calibrate.store import read_calibration_file
    from linewatch.line.inference import load_calibration_or_reason

    bundle_dir = cfg.model.bundle
    path = bundle_dir / bundle.CALIBRATION
    try:
        if graph_ok:
            _, reason = load_calibration_or_reason(bundle_dir, cfg.model.precision)
        elif path.is_file():  # the graph's own problem is reported already; the file can still be checked alone
            read_calibration_file(path, None)
            return
        else:
            reason = f"uncalibrated: no {bundle.CALIBRATION} in {bundle_dir} (run linewatch calibrate)"
    except BundleError as exc:
        raise BundleError(f"{exc}; {UNCALIBRATED} (invalid calibration)") from None
    if reason is not None:
        raise BundleError(f"{reason}; {UNCALIBRATED}")


def _remote_engine(cfg: Config) -> None:
    """engine.backend triton: the server runs this graph (a mismatch would refuse the start). An unreachable server
    is only logged: `run` starts with the engine offline and reconnects, so the unit must not fail on it."""
    from linewatch.line.remote_engine import check_server

    unreachable = check_server(cfg.model.bundle, cfg.model.precision, cfg.engine, cfg.engine.max_batch)
    if unreachable is not None:
        logging.getLogger("linewatch.line.preflight").warning(
            "engine.url %s: not reachable now (%s); `linewatch run` starts with the engine offline, every result "
            "ERROR until it is back",
            cfg.engine.url,
            unreachable,
        )


# --- keys, folders, endpoints -------------------------------------------------------------------------------


def _curve_keys(cfg: Config) -> None:
    from linewatch.protocol.curve import CurveConfig

    sec = cfg.security
    if sec.server_secret_key_file is not None and sec.authorized_keys_dir is not None:  # the schema requires both
        CurveConfig.from_files(sec.server_secret_key_file, sec.authorized_keys_dir)


def _writable_dir(path: Path, key: str) -> None:
    """`path` is, or can be made, a folder this user may write (the daemon creates it); nothing is created here."""
    probe = path
    try:
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        ok_type = probe.is_dir()
    except OSError as exc:
        raise ConfigError(f"{key} {path}: cannot be checked ({exc})") from None
    if not ok_type:
        raise ConfigError(f"{key} {path}: cannot be created, {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is" if probe == path else f"would be created in {probe}, which is"
        raise ConfigError(f"{key} {path}: {what} not writable by this user (uid {os.geteuid()})")


def _trt_cache(cfg: Config, meta: dict[str, Any] | None) -> None:
    """When TensorRT will be tried, its engine cache folder must be writable (`run` creates it)."""
    from linewatch.line.daemon import trt_cache_dir
    from linewatch.line.engine import TENSORRT, TRT_CACHE_DIR, parse_providers

    if TENSORRT not in parse_providers(cfg.engine.providers)[0]:
        return
    folder = trt_cache_dir(cfg)
    if folder is None:
        folder = cfg.model.bundle / TRT_CACHE_DIR
    elif meta is not None:
        folder = folder / f"{bundle.model_id(meta)}-{cfg.model.precision}"
    _writable_dir(folder, "engine.trt_cache_dir")


def _bindable(endpoint: str, key: str) -> None:
    """Bind (and release) the endpoint as the daemon will: an address in use is found now, not after the model
    loaded."""
    import zmq

    context = zmq.Context()
    sock = context.socket(zmq.PUB)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        raise ConfigError(
            f"{key} {endpoint!r}: cannot bind: {exc} (held by another process: is linewatch already running "
            f"with this config?)"
        ) from None
    finally:
        sock.close(0)
        context.term()


def _http_bindable(host: str, port: int) -> None:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the metrics HTTP server does
            sock.bind(address)
    except OSError as exc:
        raise ConfigError(
            f"metrics.host/port {host}:{port}: cannot bind: {exc} (held by another process: is linewatch "
            f"already running with this config?)"
        ) from None
