"""Prometheus metrics of the daemon, served as text over HTTP on a configurable port (torch-free).

A private registry (not the process-global default) so tests and reloads never collide on metric names.
"""

from __future__ import annotations

import logging
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

log = logging.getLogger("linewatch.line.prometheus")

CAMERA_STATES = ("online", "offline", "reconnecting", "finished")
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class DaemonMetrics:
    def __init__(self) -> None:
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

    def watch_cameras(self, totals: Callable[[], dict[str, dict[str, int]]]) -> None:
        """Counters kept by the capture threads and queues, read at scrape time: {camera: {captured, dropped,
        reconnects}}."""
        self.registry.register(_CameraTotals(totals))

    def set_camera_state(self, camera: str, state: str) -> None:
        for s in CAMERA_STATES:
            self.camera_state.labels(camera, s).set(1.0 if s == state else 0.0)

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint in a daemon thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        bound = server.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


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
