"""The daemon path on the GPU: synthetic cameras -> `linewatch run` -> results per second, against `linewatch bench`.

  python benchmarks/gpu_daemon.py BUNDLE [--provider cuda] [--precision fp16] [--cameras 4] [--batch 32]
         [--seconds 8] [--bench-images-per-s X] [--json OUT]

Each camera is a looped MJPG video of synthetic textures at the model's input size (OpenCV writes it; no fps cap,
so the daemon runs saturated); all cameras feed one inference thread batching across them (`engine.max_batch`).
The bundle is calibrated first at the 99th pixel percentile of those frames (a mix of OK and NOK, masks sent),
with the same provider and precision. Throughput is the sum over cameras of the `results` counters of their
status messages over a window after warm-up; `--bench-images-per-s` (the engine alone at the same batch, provider
and precision, from `linewatch bench`) gives the ratio. Needs pyzmq, pydantic and OpenCV (benchmarks/gpu_prepare.py
carries the first two to the GPU machine).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
import zmq

from linewatch import bundle
from linewatch.demo.run import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon_throughput import texture_frames, write_video  # noqa: E402  (benchmarks/ is not a package)

ROOT = Path(__file__).resolve().parents[1]
Row = dict[str, Any]


def calibrate(bundle_dir: Path, frames: np.ndarray, provider: str, precision: str) -> float:
    from linewatch.calibrate.store import write_calibration
    from linewatch.line.engine import Engine

    maps, _ = Engine(bundle_dir, provider, precision=precision).score(frames[:8])
    threshold = float(np.quantile(maps, 0.99))
    write_calibration(bundle_dir, threshold, min_defect_area=4, precision=precision)
    return threshold


def daemon_config(args: argparse.Namespace, video: Path, endpoint: str) -> Row:
    cameras = [
        {"name": f"cam{i}", "kind": "video", "source": str(video), "loop": True, "fps": 0, "queue_size": 2 * args.batch}
        for i in range(args.cameras)
    ]
    return {
        "model": {"bundle": str(args.bundle), "precision": args.precision},
        "cameras": cameras,
        "engine": {"providers": [args.provider], "max_batch": args.batch, "max_wait_ms": 5},
        "publish": {"endpoint": endpoint, "status_interval_s": 0.25, "hwm": 100_000},
        "logging": {"level": "WARNING"},
    }


class Counters:
    """The latest status of each camera; totals over cameras."""

    def __init__(self, cameras: int):
        self.cameras = cameras
        self.latest: dict[str, Row] = {}

    def update(self, header: Row) -> None:
        self.latest[str(header.get("camera"))] = header

    def total(self, key: str) -> int:
        return sum(int(h.get(key, 0)) for h in self.latest.values())

    def complete(self) -> bool:
        return len(self.latest) == self.cameras


def watch(proc: subprocess.Popen[str], endpoint: str, args: argparse.Namespace) -> Row:
    """Results/s over `args.seconds` once every camera has reported and `warm` results were published."""
    sub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 1_000_000)
    sub.setsockopt(zmq.SUBSCRIBE, b"linewatch/")
    sub.connect(endpoint)
    counters, window = Counters(args.cameras), None
    latencies: list[float] = []
    warm = 4 * args.batch
    try:
        deadline = time.monotonic() + args.startup_s + 2 * args.seconds
        while time.monotonic() < deadline:
            if not sub.poll(500):
                if proc.poll() is not None:
                    err = proc.stderr.read() if proc.stderr else ""
                    raise RuntimeError(f"daemon exited {proc.returncode}: {err[-2000:]}")
                continue
            parts = sub.recv_multipart()
            header, now = json.loads(parts[1]), time.monotonic()
            if not parts[0].endswith(b"/status"):
                if window is not None:
                    latencies.append(header["publish_time"] - header["frame_time"])
                continue
            counters.update(header)
            totals = {k: counters.total(k) for k in ("results", "captured", "dropped")}
            if window is None and counters.complete() and totals["results"] >= warm:
                window = (now, totals)
            elif window is not None and now - window[0] >= args.seconds:
                return summary(window, (now, totals), latencies)
    finally:
        sub.close(0)
    raise RuntimeError(f"daemon produced no full window of results within {args.startup_s + 2 * args.seconds:.0f} s")


def summary(start: tuple[float, Row], end: tuple[float, Row], latencies: list[float]) -> Row:
    (t0, s0), (t1, s1) = start, end
    lat = np.asarray(latencies) * 1e3
    return {
        "images_per_s": (s1["results"] - s0["results"]) / (t1 - t0),
        "results_in_window": s1["results"] - s0["results"],
        "captured": s1["captured"] - s0["captured"],
        "dropped": s1["dropped"] - s0["dropped"],
        "window_s": t1 - t0,
        "latency_p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
        "latency_p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
    }


def run(args: argparse.Namespace, workdir: Path) -> Row:
    meta = bundle.read_metadata(args.bundle)
    h, w = int(meta["input"]["height"]), int(meta["input"]["width"])
    frames = texture_frames(32, h) if h == w else texture_frames(32, max(h, w))[:, :h, :w]
    threshold = calibrate(args.bundle, frames, args.provider, args.precision)
    video = write_video(workdir / "cameras.avi", frames)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = workdir / "daemon.yaml"
    config.write_text(yaml.safe_dump(daemon_config(args, video, endpoint)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "linewatch.cli", "run", "--config", str(config)],
        cwd=workdir,
        env=dict(os.environ),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        measured = watch(proc, endpoint, args)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    report = {
        "provider": args.provider,
        "precision": args.precision,
        "cameras": args.cameras,
        "batch": args.batch,
        "pixel_threshold": threshold,
        **measured,
    }
    if args.bench_images_per_s:
        report["bench_images_per_s"] = args.bench_images_per_s
        report["ratio"] = measured["images_per_s"] / args.bench_images_per_s
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("--provider", default="cuda")
    p.add_argument("--precision", default="fp16")
    p.add_argument("--cameras", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seconds", type=float, default=8.0, help="measured window after warm-up")
    p.add_argument("--startup-s", type=float, default=60.0, help="allowed for the daemon's start and warm-up")
    p.add_argument("--bench-images-per-s", type=float)
    p.add_argument("--workdir", type=Path, help="where the video and config go (default: next to the bundle)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    workdir = args.workdir or args.bundle.parent / "daemon"
    workdir.mkdir(parents=True, exist_ok=True)
    report = run(args, workdir)
    ratio = f", {report['ratio']:.1%} of bench" if "ratio" in report else ""
    p50 = report["latency_p50_ms"]
    print(
        f"daemon {args.provider} {args.precision}, {args.cameras} cameras, batch {args.batch}: "
        f"{report['images_per_s']:.1f} results/s{ratio}, dropped {report['dropped']} of {report['captured']}, "
        f"latency p50 {'-' if p50 is None else f'{p50:.1f}'} ms",
        flush=True,
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
