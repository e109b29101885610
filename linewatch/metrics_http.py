"""Prometheus metrics of the daemon, served as text over HTTP on a configurable port (torch-free).

A private registry (not the process-global default) so tests and reloads never collide on metric names.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("linewatch.metrics")

CAMERA_STATES = ("online", "offline", "reconnecting", "finished")
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class DaemonMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.frames = Counter("linewatch_frames_captured", "Frames captured", ["camera"], registry=r)
        self.verdicts = Counter("linewatch_verdicts", "Results published by verdict", ["camera", "verdict"],
                                registry=r)
        self.drops = Counter("linewatch_dropped_frames", "Frames dropped: queue (inference behind) or "
                             "publish (subscriber behind)", ["camera", "stage"], registry=r)
        self.latency = Histogram("linewatch_latency_seconds", "Frame capture to result publish", ["camera"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.camera_state = Gauge("linewatch_camera_state", "1 for the camera's current state", ["camera", "state"],
                                  registry=r)
        self.reconnects = Counter("linewatch_camera_reconnects", "Reconnect attempts", ["camera"], registry=r)
        self.batch_size = Histogram("linewatch_batch_size", "Frames per inference batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.calibration_version = Gauge("linewatch_calibration_version", "Calibration in use (-1: none)",
                                         registry=r)
        self.reloads = Counter("linewatch_reloads", "SIGHUP reloads by outcome", ["outcome"], registry=r)
        self.archive_errors = Counter("linewatch_archive_errors", "Archive writes that failed or were skipped",
                                      registry=r)
        self._server = None

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
