"""Prometheus metrics of the daemon, served as text over HTTP on a configurable port (torch-free).

A private registry (not the process-global default) so tests and reloads never collide on metric names. The HTTP
endpoint has no authentication, so it follows the sockets' rule: loopback only, unless the config says
`security.allow_insecure_bind: true` (scrape through a reverse proxy or an SSH tunnel otherwise).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily

from linewatch.errors import ConfigError
from linewatch.protocol.curve import is_loopback_host

log = logging.getLogger("linewatch.line.prometheus")

CAMERA_STATES = ("online", "offline", "reconnecting", "finished")
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class DaemonMetrics:
    """The daemon's metrics; `serve()` starts the HTTP endpoint, `health()` is None while its thread runs."""

    def __init__(self, *, allow_insecure_bind: bool = False) -> None:
        self.allow_insecure_bind = allow_insecure_bind
        self.registry = CollectorRegistry()
        r = self.registry
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
        self.reloads = Counter("linewatch_reloads", "SIGHUP reloads by outcome", ["outcome"], registry=r)
        self.archive_errors = Counter(
            "linewatch_archive_errors", "Archive writes that failed or were skipped", registry=r
        )
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def watch_cameras(self, totals: Callable[[], dict[str, dict[str, int]]]) -> None:
        """Counters kept by the capture threads and queues, read at scrape time: {camera: {captured, dropped,
        reconnects}}."""
        self.registry.register(_CameraTotals(totals))

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
    def __init__(self, totals: Callable[[], dict[str, dict[str, int]]]):
        self._totals = totals

    def collect(self) -> list[CounterMetricFamily]:
        frames = CounterMetricFamily("linewatch_frames_captured", "Frames captured", labels=["camera"])
        drops = CounterMetricFamily(
            "linewatch_dropped_frames", "Frames dropped before inspection (queue full or shutdown)", labels=["camera"]
        )
        reconnects = CounterMetricFamily("linewatch_camera_reconnects", "Reconnect attempts", labels=["camera"])
        for camera, t in self._totals().items():
            frames.add_metric([camera], t["captured"])
            drops.add_metric([camera], t["dropped"])
            reconnects.add_metric([camera], t["reconnects"])
        return [frames, drops, reconnects]
