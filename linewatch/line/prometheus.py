"""Prometheus metrics of the daemon, served as text over HTTP on a configurable port (torch-free).

A private registry (not the process-global default) so tests and reloads never collide on metric names. The HTTP
endpoint has no authentication, so it follows the sockets' rule: loopback only, unless the config says
`security.allow_insecure_bind: true` (scrape through a reverse proxy or an SSH tunnel otherwise).

Every labelled series exists from the start (each camera x verdict, publish drops, reload and trigger outcomes at
0): a series that appears only with its first event makes `rate()` and alerts blind to that first event. Counts
kept by the parts themselves (capture threads, queues, archive writer, trigger server) are read at scrape time, so
the metrics can never disagree with the status topic or the log. `process_*` (memory, CPU, open files) and
`python_*` come from prometheus_client's own collectors.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import TYPE_CHECKING, Callable, Mapping, Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from linewatch.errors import ConfigError
from linewatch.protocol.curve import is_loopback_host
from linewatch.protocol.wire import Verdict

if TYPE_CHECKING:
    from linewatch.line.inference import Model

log = logging.getLogger("linewatch.line.prometheus")

CAMERA_STATES = ("online", "offline", "reconnecting", "finished")
VERDICTS = tuple(v.value for v in Verdict)
RELOAD_OUTCOMES = ("ok", "refused")
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class ArchiveCounts(Protocol):
    """What the archive writer counts (linewatch.line.archive.Archive)."""

    saved: int
    errors: int
    skipped: int
    deleted: int

    @property
    def used_bytes(self) -> int: ...


class HistoryCounts(Protocol):
    """What the history writer counts (linewatch.line.history.History)."""

    deleted: int
    errors: int
    used_bytes: int | None

    def totals(self) -> Mapping[str, tuple[int, int]]: ...


class DaemonMetrics:
    """The daemon's metrics; `serve()` starts the HTTP endpoint, `health()` is None while its thread runs."""

    def __init__(self, *, allow_insecure_bind: bool = False) -> None:
        self.allow_insecure_bind = allow_insecure_bind
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds
        PlatformCollector(registry=r)  # python_info
        GCCollector(registry=r)
        self.verdicts = Counter("linewatch_verdicts", "Results published by verdict", ["camera", "verdict"], registry=r)
        self.publish_drops = Counter(
            "linewatch_publish_dropped", "Results the PUB socket refused", ["camera"], registry=r
        )
        self.latency = Histogram(
            "linewatch_latency_seconds",
            "Frame capture to result publish",
            ["camera"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.camera_state = Gauge(
            "linewatch_camera_state", "1 for the camera's current state", ["camera", "state"], registry=r
        )
        self.batch_size = Histogram(
            "linewatch_batch_size", "Frames per inference batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.calibration_version = Gauge("linewatch_calibration_version", "Calibration in use (-1: none)", registry=r)
        self.pixel_threshold = Gauge(
            "linewatch_pixel_threshold", "Anomaly-map threshold of the calibration in use (NaN: none)", registry=r
        )
        self.image_threshold = Gauge(
            "linewatch_image_threshold", "Image-score threshold in use (NaN: none, or not set)", registry=r
        )
        self.min_defect_area = Gauge(
            "linewatch_min_defect_area",
            "Smallest defect region in pixels of the calibration in use (-1: none)",
            registry=r,
        )
        self.model_info = Gauge("linewatch_model_info", "1 for the model in use", ["model_id"], registry=r)
        self.reloads = Counter("linewatch_reloads", "SIGHUP reloads by outcome", ["outcome"], registry=r)
        for outcome in RELOAD_OUTCOMES:
            self.reloads.labels(outcome)
        # recipes and golden sets (docs/RECIPES.md)
        self.recipe_info = Gauge("linewatch_recipe_info", "1 for the recipe in use", ["recipe"], registry=r)
        self.recipe_switches = Counter(
            "linewatch_recipe_switches", "Recipe switch requests by outcome", ["outcome"], registry=r
        )
        for outcome in RELOAD_OUTCOMES:
            self.recipe_switches.labels(outcome)
        self.golden_passed = Gauge(
            "linewatch_golden_passed", "Latest golden-set check of a recipe: 1 passed, 0 failed", ["recipe"], registry=r
        )
        self.golden_checks = Counter("linewatch_golden_checks", "Golden-set checks by outcome", ["outcome"], registry=r)
        for outcome in ("passed", "failed"):
            self.golden_checks.labels(outcome)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def watch_cameras(self, totals: Callable[[], Mapping[str, Mapping[str, int]]]) -> None:
        """Counters kept by the capture threads and queues, read at scrape time: {camera: {captured, dropped,
        reconnects, frame_errors}}. Every per-camera series is created here, at 0, for the cameras it names."""
        self.registry.register(_CameraTotals(totals))
        for camera in totals():
            for verdict in VERDICTS:
                self.verdicts.labels(camera, verdict)
            self.publish_drops.labels(camera)
            self.latency.labels(camera)
            self.set_camera_state(camera, "offline")  # a camera thread starts offline

    def watch_drift(self, gauges: Callable[[], Mapping[str, tuple[int, float]]]) -> None:
        """Drift watch per camera, read at scrape time: {camera: (state code, CUSUM statistic in nats)}."""
        self.registry.register(_DriftGauges(gauges))

    def watch_gating(self, counts: Callable[[], Mapping[str, Mapping[str, int]]]) -> None:
        """Frames the image gate turned into ERROR results, read at scrape time: {camera: {reason: count}}."""
        self.registry.register(_GatedTotals(counts))

    def watch_archive(self, archive: ArchiveCounts) -> None:
        """The archive writer's own counts, read at scrape time: every failed write is in
        linewatch_archive_errors_total{kind="write"}, every frame the full queue turned away in kind="skipped"."""
        self.registry.register(_ArchiveTotals(archive))

    def watch_history(self, history: HistoryCounts) -> None:
        """The history writer's own counts, read at scrape time (docs/HISTORY.md): records written and lost per
        camera, rows removed by retention, failed opens/transactions, the database's used bytes (SQLite)."""
        self.registry.register(_HistoryTotals(history))

    def watch_triggers(self, outcomes: Callable[[], Mapping[str, int]]) -> None:
        """Trigger requests answered, by outcome (ok or the error code), read at scrape time."""
        self.registry.register(_TriggerTotals(outcomes))

    def set_model(self, model: Model) -> None:
        """The model and calibration in use: call at start and after every reload."""
        cal = model.calibration
        self.calibration_version.set(-1 if cal is None else int(cal.version))
        self.pixel_threshold.set(math.nan if cal is None else cal.pixel_threshold)
        image = None if cal is None else cal.image_threshold
        self.image_threshold.set(math.nan if image is None else image)
        self.min_defect_area.set(-1 if cal is None else cal.min_defect_area)
        self.model_info.clear()
        self.model_info.labels(model.model_id).set(1)
        self.recipe_info.clear()
        self.recipe_info.labels(model.recipe).set(1)

    def set_golden(self, recipe: str, passed: bool) -> None:
        """A golden-set check's outcome (start, reload, recipe switch, verify request)."""
        self.golden_passed.labels(recipe).set(1 if passed else 0)
        self.golden_checks.labels("passed" if passed else "failed").inc()

    def set_camera_state(self, camera: str, state: str) -> None:
        for s in CAMERA_STATES:
            self.camera_state.labels(camera, s).set(1.0 if s == state else 0.0)

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint in a daemon thread; returns the bound port. A host beyond loopback is refused
        (ConfigError) unless `allow_insecure_bind`: the metrics tell anyone who asks how the line runs."""
        if not (self.allow_insecure_bind or is_loopback_host(host)):
            raise ConfigError(
                f"metrics.host {host!r}: serving metrics beyond loopback needs an explicit "
                "security.allow_insecure_bind: true (the endpoint has no authentication)"
            )
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._server, self._thread = server, thread
        bound = server.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def health(self) -> str | None:
        """None while the HTTP thread runs (or metrics are not served); otherwise why not."""
        if self._thread is None or self._thread.is_alive():
            return None
        return "metrics HTTP thread has died"

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            self._thread = None


class _CameraTotals:
    def __init__(self, totals: Callable[[], Mapping[str, Mapping[str, int]]]):
        self._totals = totals

    def collect(self) -> list[Metric]:
        frames = CounterMetricFamily("linewatch_frames_captured", "Frames captured", labels=["camera"])
        drops = CounterMetricFamily(
            "linewatch_dropped_frames", "Frames dropped before inspection (queue full or shutdown)", labels=["camera"]
        )
        reconnects = CounterMetricFamily("linewatch_camera_reconnects", "Reconnect attempts", labels=["camera"])
        errors = CounterMetricFamily(
            "linewatch_frame_errors",
            "Frames captured but unusable (unreadable image, ROI outside the frame): published as ERROR",
            labels=["camera"],
        )
        for camera, t in self._totals().items():
            frames.add_metric([camera], t["captured"])
            drops.add_metric([camera], t["dropped"])
            reconnects.add_metric([camera], t["reconnects"])
            errors.add_metric([camera], t["frame_errors"])
        return [frames, drops, reconnects, errors]


class _GatedTotals:
    def __init__(self, counts: Callable[[], Mapping[str, Mapping[str, int]]]):
        self._counts = counts

    def collect(self) -> list[Metric]:
        family = CounterMetricFamily(
            "linewatch_gated_frames",
            "Frames not scored because the image gate refused them (published as ERROR), by reason",
            labels=["camera", "reason"],
        )
        for camera, reasons in self._counts().items():
            for reason, n in reasons.items():
                family.add_metric([camera, reason], n)
        return [family]


class _DriftGauges:
    def __init__(self, gauges: Callable[[], Mapping[str, tuple[int, float]]]):
        self._gauges = gauges

    def collect(self) -> list[Metric]:
        state = GaugeMetricFamily(
            "linewatch_drift_state",
            "Drift watch: 0 ok, 1 warn, 2 alarm (recalibrate), -1 unavailable (calibration without good scores)",
            labels=["camera"],
        )
        statistic = GaugeMetricFamily(
            "linewatch_drift_statistic", "Drift watch CUSUM statistic in nats (NaN: unavailable)", labels=["camera"]
        )
        for camera, (code, value) in self._gauges().items():
            state.add_metric([camera], code)
            statistic.add_metric([camera], value)
        return [state, statistic]


class _ArchiveTotals:
    def __init__(self, archive: ArchiveCounts):
        self._archive = archive

    def collect(self) -> list[Metric]:
        a = self._archive
        errors = CounterMetricFamily(
            "linewatch_archive_errors",
            "Frames not archived: write failed (kind=write) or the writer was behind (kind=skipped)",
            labels=["kind"],
        )
        errors.add_metric(["write"], a.errors)
        errors.add_metric(["skipped"], a.skipped)
        return [
            errors,
            CounterMetricFamily("linewatch_archive_saved", "Frames archived (frame, mask, header)", value=a.saved),
            CounterMetricFamily("linewatch_archive_deleted", "Archive files deleted by the size cap", value=a.deleted),
            GaugeMetricFamily(
                "linewatch_archive_bytes", "Bytes of archived files counted in the cap", value=a.used_bytes
            ),
        ]


class _HistoryTotals:
    def __init__(self, history: HistoryCounts):
        self._history = history

    def collect(self) -> list[Metric]:
        h = self._history
        recorded = CounterMetricFamily(
            "linewatch_history_recorded", "Results recorded in the history database", labels=["camera"]
        )
        lost = CounterMetricFamily(
            "linewatch_history_lost",
            "Results not recorded (writer behind, database unwritable or unreachable); the results were published",
            labels=["camera"],
        )
        for camera, (n_recorded, n_lost) in h.totals().items():
            recorded.add_metric([camera], n_recorded)
            lost.add_metric([camera], n_lost)
        used = h.used_bytes
        return [
            recorded,
            lost,
            CounterMetricFamily(
                "linewatch_history_deleted", "Records removed by the retention policy", value=h.deleted
            ),
            CounterMetricFamily(
                "linewatch_history_errors", "Failed opens and transactions of the history database", value=h.errors
            ),
            GaugeMetricFamily(
                "linewatch_history_bytes",
                "Bytes the SQLite history's pages take (NaN: not known yet, or PostgreSQL)",
                value=math.nan if used is None else used,
            ),
        ]


class _TriggerTotals:
    def __init__(self, outcomes: Callable[[], Mapping[str, int]]):
        self._outcomes = outcomes

    def collect(self) -> list[Metric]:
        family = CounterMetricFamily(
            "linewatch_trigger_requests", "Trigger requests answered, by outcome (ok or error code)", labels=["outcome"]
        )
        for outcome, n in self._outcomes().items():
            family.add_metric([outcome], n)
        return [family]
