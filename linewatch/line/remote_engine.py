"""`engine.backend: triton`: frames scored by a Triton Inference Server over gRPC (torch-free; linewatch[triton]).

The server is trusted only after it proved it runs the bundle's graph: before READY the model's metadata (input and
output names, shapes, dtypes), its batch size and the graph hash (carried in the model name `linewatch-<16 hex>`
and, when the server gives it, the full sha256 in the model parameter `graph_sha256`; linewatch/serving/repository.py)
are checked against the bundle and its calibration. A server that answers with something else is a config error.

While running, the server is treated like a camera, not like a part of this process: when it is unreachable or its
requests fail, the engine goes *offline*, every frame gets an ERROR result with the reason at once (no request is
sent, so batches keep finishing and the watchdog keeps being fed: a restart of the line daemon would not bring the
server back), the status topic says so, and a monitor thread reconnects with backoff on a fresh channel, checking
the model again before results resume. While online the same thread checks the model's readiness every
`engine.check_interval_s`, so an outage shows in the status even when no frame is being scored.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from linewatch import bundle
from linewatch.errors import ConfigError, DataError, LinewatchError
from linewatch.line.engine import graph_file
from linewatch.line.inference import EngineOffline
from linewatch.serving.repository import GRAPH_SHA256_PARAMETER, HASH_DIGITS, MODEL_PREFIX, model_name

if TYPE_CHECKING:
    from linewatch.calibrate.store import Calibration
    from linewatch.line.config import EngineConfig

log = logging.getLogger("linewatch.line.remote_engine")

ONLINE = "online"
OFFLINE = "offline"
MAX_ERROR_CHARS = 300  # a server's error text goes into every ERROR result while offline: keep it short


def _grpc() -> Any:  # tritonclient.grpc: no type information shipped
    import tritonclient.grpc  # type: ignore[import-untyped]

    return tritonclient.grpc


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _short(exc: BaseException) -> str:
    """tritonclient's errors carry the gRPC status and a message; one line, bounded."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:MAX_ERROR_CHARS]


def _status_code(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    try:
        return str(status()) if callable(status) else ""
    except Exception:
        return ""


class TritonScorer:
    """The Scorer protocol of docs/DESIGN.md on a Triton server: one request per batch (the server's dynamic batcher
    merges the requests of several daemons), state and reconnects reported through `status()`."""

    backend = "triton"

    def __init__(
        self,
        bundle_dir: Path,
        precision: str,
        settings: EngineConfig,
        max_batch: int,
        calibration: Calibration | None = None,
    ):
        if settings.url is None:  # the config refuses backend triton without a url
            raise ConfigError("engine.url: the Triton server's host:port is required with engine.backend: triton")
        self.bundle_dir = Path(bundle_dir)
        meta = bundle.read_metadata(self.bundle_dir)
        self.precision = bundle.check_precision(precision)
        self.input_size = (int(meta["input"]["height"]), int(meta["input"]["width"]))
        self.graph_path, self.graph_sha256 = graph_file(self.bundle_dir, meta, self.precision)
        self.model_id = bundle.model_id(meta)
        if calibration is not None and calibration.model_sha256 != self.graph_sha256:
            raise ConfigError(  # load_calibration refuses this already; said again where the server is chosen
                f"{self.bundle_dir / bundle.CALIBRATION}: made for graph {calibration.model_sha256[:12]}…, not for "
                f"the {self.precision} graph {self.graph_sha256[:12]}… the server would have to run"
            )
        _grpc()  # ModuleNotFoundError here: the CLI names the extra to install (linewatch[triton])
        self.url = settings.url
        self.model_name = settings.model or model_name(self.graph_sha256)
        self.max_batch = max_batch
        self.timeout_s = float(settings.timeout_s)
        self.check_interval_s = float(settings.check_interval_s)
        self.initial_s = float(settings.reconnect.initial_s)
        self.max_s = float(settings.reconnect.max_s)
        tls = settings.tls
        self._tls: dict[str, Any] = {}
        if tls.enabled:
            self._tls = {
                "ssl": True,
                "root_certificates": None if tls.root_certificates is None else str(tls.root_certificates),
                "private_key": None if tls.private_key is None else str(tls.private_key),
                "certificate_chain": None if tls.certificate_chain is None else str(tls.certificate_chain),
            }
        self._lock = threading.Lock()
        self._client: Any = None
        self._online = False
        self._since = time.time()
        self._last_error: str | None = "not connected yet"
        self._reconnects = 0  # times the server came back after an outage
        self._failures = 0  # requests or checks that took the engine offline
        self._backoff = self.initial_s
        self._next_attempt = 0.0  # monotonic time of the next reconnect attempt
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(
            target=_monitor, args=(weakref.ref(self), self._stop, self._wake), name="remote-engine", daemon=True
        )
        weakref.finalize(self, _stop_monitor, self._stop, self._wake)  # a model replaced by a reload lets it go

    # --- start --------------------------------------------------------------------------------------------------
    @classmethod
    def connect(
        cls,
        bundle_dir: Path,
        precision: str,
        settings: EngineConfig,
        max_batch: int,
        calibration: Calibration | None = None,
    ) -> TritonScorer:
        """A scorer that checked the server (ConfigError when it runs another graph or signature), or, when the
        server cannot be reached now, one that starts offline and keeps trying: the line daemon still starts,
        reports the engine offline and publishes every frame as ERROR until the server is back."""
        scorer = cls(bundle_dir, precision, settings, max_batch, calibration)
        try:
            scorer._attempt()
        except EngineOffline as exc:
            scorer._went_offline(str(exc), None)
            log.warning(
                "remote engine %s (model %s) not reachable at start: %s; starting with the engine offline: every "
                "frame is ERROR until it is back (retrying with backoff)",
                scorer.url,
                scorer.model_name,
                exc,
            )
        scorer._thread.start()
        return scorer

    # --- scoring (the inference thread) -------------------------------------------------------------------------
    def score(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(anomaly maps float32 N×H×W, image scores float32 N) from the server, the batch in one request;
        EngineOffline at once while the server is offline."""
        frames = self._check_frames(frames)
        with self._lock:
            client, online = self._client, self._online
        if not online or client is None:
            raise EngineOffline(self._offline_text())
        grpc = _grpc()
        n = frames.shape[0]
        request = grpc.InferInput(bundle.INPUT_NAME, list(frames.shape), "UINT8")
        request.set_data_from_numpy(frames)
        outputs = [grpc.InferRequestedOutput(bundle.OUTPUT_MAP), grpc.InferRequestedOutput(bundle.OUTPUT_SCORE)]
        try:
            response = client.infer(self.model_name, [request], outputs=outputs, client_timeout=self.timeout_s)
            maps, scores = response.as_numpy(bundle.OUTPUT_MAP), response.as_numpy(bundle.OUTPUT_SCORE)
        except Exception as exc:  # tritonclient's InferenceServerException, gRPC's errors: the server failed us
            self._went_offline(f"request failed: {_short(exc)}", client)
            raise EngineOffline(self._offline_text()) from None
        if maps is None or scores is None:
            raise LinewatchError(
                f"Triton model {self.model_name} returned no {bundle.OUTPUT_MAP}/{bundle.OUTPUT_SCORE}"
            )
        scores = np.asarray(scores, np.float32)
        if scores.shape == (n, 1):  # Triton serves a batch-only tensor as N×1 (linewatch/serving/repository.py)
            scores = scores.reshape(n)
        return np.asarray(maps, np.float32), scores

    def _check_frames(self, frames: np.ndarray) -> np.ndarray:
        h, w = self.input_size
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.shape[1:] != (h, w, 3):
            raise DataError(f"frames must be uint8 N×{h}×{w}×3, got {getattr(frames, 'dtype', type(frames))}")
        if not 1 <= frames.shape[0] <= self.max_batch:
            raise DataError(f"a batch of {frames.shape[0]} frames: engine.max_batch is {self.max_batch}")
        return np.ascontiguousarray(frames)

    # --- state --------------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The status topic's `engine` object (docs/PROTOCOL.md)."""
        with self._lock:
            return {
                "backend": self.backend,
                "state": ONLINE if self._online else OFFLINE,
                "url": self.url,
                "model": self.model_name,
                "since": _iso(self._since),
                "last_error": None if self._online else self._last_error,
                "reconnects": self._reconnects,
                "failures": self._failures,
            }

    def health(self) -> str | None:
        """The daemon's health check: the monitor thread must run, or the engine could never come back."""
        if self._thread.is_alive() or self._stop.is_set():
            return None
        return "remote engine monitor thread has died"

    def close(self) -> None:
        _stop_monitor(self._stop, self._wake)
        with self._lock:
            client, self._client, self._online = self._client, None, False
        _close(client)

    def _offline_text(self) -> str:
        with self._lock:
            wait = max(0.0, self._next_attempt - time.monotonic())
            return (
                f"remote engine offline ({self.url}, model {self.model_name}): {self._last_error}; "
                f"next attempt in {wait:.1f} s"
            )

    def _went_offline(self, reason: str, client: Any) -> None:
        """Offline from now on (unless a newer channel replaced `client` meanwhile); the monitor reconnects."""
        with self._lock:
            if client is not None and client is not self._client:
                return  # a request on a channel already replaced: the state belongs to the new one
            was_online = self._online
            self._online = False
            self._last_error = reason
            if was_online or client is None:  # a failed request or check, or unreachable at start
                self._failures += 1
                self._since = time.time()
                self._backoff = self.initial_s
                self._next_attempt = time.monotonic() + self.initial_s
        if was_online:
            log.error(
                "remote engine %s offline: %s; frames are ERROR until it is back (retrying in %.1f s)",
                self.url,
                reason,
                self.initial_s,
            )
        self._wake.set()

    # --- connecting and checking (start, then the monitor thread) ------------------------------------------------
    def _new_client(self) -> Any:
        try:
            return _grpc().InferenceServerClient(self.url, **self._tls)
        except Exception as exc:  # a malformed address, unreadable certificate files
            raise ConfigError(f"engine.url {self.url!r}: cannot make a gRPC client: {_short(exc)}") from None

    def _attempt(self) -> None:
        """Connect on a fresh channel and check the model; online on success. EngineOffline when the server cannot
        be reached or is not ready, ConfigError when it serves something this bundle cannot use."""
        client = self._new_client()
        try:
            self._verify(client)
        except BaseException:
            _close(client)
            raise
        with self._lock:
            old, self._client = self._client, client
            came_back = not self._online and self._failures > 0
            self._online = True
            self._since = time.time()
            self._last_error = None
            self._backoff = self.initial_s
            if came_back:
                self._reconnects += 1
        if old is not None and old is not client:
            _close(old)
        log.info("remote engine %s online: model %s checked against %s", self.url, self.model_name, self.graph_path)

    def _verify(self, client: Any) -> None:
        t = self.timeout_s
        where = f"Triton server {self.url}"
        try:
            if not client.is_server_live(client_timeout=t):
                raise EngineOffline(f"{where} is not live")
            meta = client.get_model_metadata(self.model_name, as_json=True, client_timeout=t)
            config = client.get_model_config(self.model_name, as_json=True, client_timeout=t).get("config", {})
            ready = client.is_model_ready(self.model_name, client_timeout=t)
        except LinewatchError:
            raise
        except Exception as exc:
            code = _status_code(exc)
            if "NOT_FOUND" in code:
                raise ConfigError(
                    f"{where} has no model {self.model_name!r}: it serves another graph (or none); this bundle's "
                    f"{self.precision} graph is {self.graph_sha256[:16]}… (serve it: linewatch serve {self.bundle_dir})"
                ) from None
            raise EngineOffline(f"{where}: {_short(exc)}") from None
        self._check_signature(meta, config)
        if not ready:
            raise EngineOffline(f"{where}: model {self.model_name} is not ready")

    def _check_signature(self, meta: dict[str, Any], config: dict[str, Any]) -> None:
        """The served model is this bundle's graph, with its inputs and outputs, and takes a whole batch."""
        where = f"Triton server {self.url} model {self.model_name!r}"
        problems = []
        hashes = [str(meta.get("name", ""))]
        param = (config.get("parameters") or {}).get(GRAPH_SHA256_PARAMETER, {})
        full = param.get("string_value") if isinstance(param, dict) else None
        name_hash = hashes[0][len(MODEL_PREFIX) :] if hashes[0].startswith(MODEL_PREFIX) else ""
        if full:
            if full.lower() != self.graph_sha256:
                problems.append(
                    f"runs graph {full[:16]}…, the bundle's {self.precision} graph is {self.graph_sha256[:16]}…"
                )
        elif len(name_hash) == HASH_DIGITS:
            if name_hash.lower() != self.graph_sha256[:HASH_DIGITS]:
                problems.append(
                    f"is named for graph {name_hash}…, the bundle's {self.precision} graph is "
                    f"{self.graph_sha256[:HASH_DIGITS]}…"
                )
        else:
            problems.append(
                f"carries no graph hash (neither a name {MODEL_PREFIX}<{HASH_DIGITS} hex> nor a parameter "
                f"{GRAPH_SHA256_PARAMETER}), so it cannot be checked against the calibration"
            )
        h, w = self.input_size
        want_in = {bundle.INPUT_NAME: ("UINT8", [[-1, h, w, 3]])}
        want_out = {
            bundle.OUTPUT_MAP: ("FP32", [[-1, h, w]]),
            bundle.OUTPUT_SCORE: ("FP32", [[-1], [-1, 1]]),
        }
        for kind, want, got in (("input", want_in, meta.get("inputs")), ("output", want_out, meta.get("outputs"))):
            seen = {str(t.get("name")): t for t in got or []}
            if kind == "input" and set(seen) != set(want):
                problems.append(f"has inputs {sorted(seen)}, expected {sorted(want)}")
            for name, (dtype, shapes) in want.items():
                tensor = seen.get(name)
                if tensor is None:
                    problems.append(f"has no {kind} {name!r} ({kind}s: {sorted(seen)})")
                    continue
                shape = [int(d) for d in tensor.get("shape", [])]
                if tensor.get("datatype") != dtype or shape not in shapes:
                    problems.append(
                        f"{kind} {name!r} is {tensor.get('datatype')} {shape}, expected {dtype} "
                        + " or ".join(str(s) for s in shapes)
                    )
        served_batch = int(config.get("max_batch_size", 0) or 0)
        if served_batch and served_batch < self.max_batch:
            problems.append(
                f"takes batches of at most {served_batch}, engine.max_batch is {self.max_batch} (one batch is one "
                f"request): lower engine.max_batch or serve with a larger max batch size"
            )
        if problems:
            raise ConfigError(f"{where}: " + "; ".join(problems))

    def _tick(self) -> float:
        """One step of the monitor thread; returns how long to wait before the next."""
        now = time.monotonic()
        with self._lock:
            online, client, due = self._online, self._client, self._next_attempt
        if online:
            try:
                ready = client.is_model_ready(self.model_name, client_timeout=self.timeout_s)
                reason = None if ready else f"model {self.model_name} is not ready"
            except Exception as exc:
                reason = f"readiness check failed: {_short(exc)}"
            if reason is not None:
                self._went_offline(reason, client)
                return self.initial_s
            return self.check_interval_s
        if now < due:
            return due - now
        try:
            self._attempt()
            return self.check_interval_s
        except LinewatchError as exc:  # EngineOffline, or ConfigError: the server now runs something else
            refused = not isinstance(exc, EngineOffline)
            error = f"refused: {exc}" if refused else str(exc)
            with self._lock:
                changed = self._last_error != error
                self._last_error = error
                self._backoff = min(self.max_s, self._backoff * 2)
                self._next_attempt = time.monotonic() + self._backoff
                wait = self._backoff
            if changed:
                (log.error if refused else log.warning)("remote engine %s still offline: %s", self.url, exc)
            return wait


def _monitor(ref: weakref.ReferenceType[TritonScorer], stop: threading.Event, wake: threading.Event) -> None:
    """Reconnect with backoff while offline, check readiness while online; ends with its scorer."""
    while not stop.is_set():
        wake.clear()
        scorer = ref()
        if scorer is None:
            return
        try:
            delay = scorer._tick()
        except Exception:  # a bug here must not end the reconnects: logged, tried again later
            log.exception("remote engine monitor")
            delay = scorer.max_s
        del scorer  # no strong reference while waiting: a scorer nobody uses is collected and this thread ends
        wake.wait(max(0.01, delay))


def _stop_monitor(stop: threading.Event, wake: threading.Event) -> None:
    stop.set()
    wake.set()


def _close(client: Any) -> None:
    if client is None:
        return
    try:
        client.close()
    except Exception as exc:  # closing a channel to a dead server must not matter
        log.debug("closing a gRPC channel: %s", exc)


def check_server(bundle_dir: Path, precision: str, settings: EngineConfig, max_batch: int) -> str | None:
    """`linewatch check-config`: None when the server runs this bundle's graph with the right signature; ConfigError
    when it serves something else; the reason when it cannot be reached now (`run` would start with the engine
    offline, so that is reported, not refused)."""
    scorer = TritonScorer(bundle_dir, precision, settings, max_batch)
    try:
        scorer._attempt()
    except EngineOffline as exc:
        return str(exc)
    finally:
        scorer.close()
    return None
