"""Daemon throughput and end-to-end latency on CPU against `linewatch bench` for the same model and batch.

  python benchmarks/daemon_throughput.py [--bundle DIR] [--layers 1:9 --size 128 --c-d 32]
                                         [--batch 8] [--threads 2] [--rounds 3] [--seconds 8] [--json OUT]

Without --bundle, an untrained DFR bundle is exported (torch needed for that step only; throughput does not depend
on the weights' values). Each round, interleaved because this machine is shared:
  1. `linewatch bench`'s own measurement (linewatch.evaluation.bench.measure, engine in a fresh process, random frames);
  2. the daemon (`python -m linewatch.cli run`) on a looped MJPG video, no fps cap, same batch and threads,
     masks on: results/s from its status counters over a window after warm-up (saturated throughput);
  3. the daemon with the camera capped at half the bench rate: end-to-end latency frame capture -> publish from
     the result headers (publish_time - frame_time) as a line with spare capacity sees it.
  4. right after 2., the daemon saturated as in 2. with previews on (`publish.preview`, --preview-fps for OK
     parts, every NOK and ERROR part gets one), a subscriber taking them: preview cost = its throughput / 2.'s.
The ratio daemon/bench is taken within each round; medians over rounds are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import yaml
import zmq

from linewatch import bundle
from linewatch.demo.run import free_port
from linewatch.evaluation.bench import measure

ROOT = Path(__file__).resolve().parents[1]


def make_bundle(path: Path, layers: str, size: int, c_d: int) -> Path:
    from linewatch.export.cli import export_bundle  # build side: torch
    from linewatch.export.synthetic import make_untrained_bundle

    make_untrained_bundle(path, layers, size, c_d=c_d, random_init=True)
    if not (path / bundle.GRAPH).is_file():
        export_bundle(path)
    return path


def calibrate(bundle_dir: Path, frames: np.ndarray, threads: int) -> None:
    """A threshold at the 99th percentile of the benchmark frames' pixels: a realistic mix of OK and NOK."""
    from linewatch.calibrate.store import write_calibration
    from linewatch.line.engine import Engine

    maps, _ = Engine(bundle_dir, "cpu", threads=threads).score(frames[:8])
    write_calibration(bundle_dir, float(np.quantile(maps, 0.99)), min_defect_area=4)


def texture_frames(n: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(
        rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8).reshape(n * size, size, 3), (5, 5), 0
    ).reshape(n, size, size, 3)
    return base


def write_video(path: Path, frames: np.ndarray) -> Path:
    h, w = frames.shape[1:3]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (w, h))
    for f in frames:
        writer.write(f)
    writer.release()
    return path


def run_daemon(
    workdir: Path,
    bundle_dir: Path,
    video: Path,
    batch: int,
    threads: int,
    fps: float,
    seconds: float,
    preview_fps: float | None = None,
) -> dict:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = {
        "model": {"bundle": str(bundle_dir)},
        "cameras": [
            {"name": "cam1", "kind": "video", "source": str(video), "loop": True, "fps": fps, "queue_size": 4 * batch}
        ],
        "engine": {"providers": ["cpu"], "threads": threads, "max_batch": batch, "max_wait_ms": 20},
        "publish": {"endpoint": endpoint, "status_interval_s": 0.25, "hwm": 10000},
        "logging": {"level": "WARNING"},
    }
    if preview_fps is not None:
        config["publish"]["preview"] = {"enabled": True, "max_fps": preview_fps}
    path = workdir / f"daemon_{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [sys.executable, "-m", "linewatch.cli", "run", "--config", str(path)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 100_000)
    sub.setsockopt_string(zmq.SUBSCRIBE, "linewatch/cam1/")
    sub.connect(endpoint)
    statuses, latencies, previews = [], [], 0
    window = None
    try:
        deadline = time.monotonic() + 120 + 2 * seconds
        while time.monotonic() < deadline:
            if not sub.poll(500):
                if proc.poll() is not None:
                    raise RuntimeError(f"daemon exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
                continue
            parts = sub.recv_multipart()
            header = json.loads(parts[1])
            now = time.monotonic()
            if parts[0].endswith(b"/status"):
                statuses.append((now, header))
                if window is None and header["results"] >= 4 * batch:
                    window = (now, header)  # warm-up done
                elif window is not None and now - window[0] >= seconds:
                    break
            elif parts[0].endswith(b"/preview"):
                previews += window is not None
            elif window is not None:
                latencies.append(header["publish_time"] - header["frame_time"])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        sub.close(0)
    if window is None or not statuses:
        raise RuntimeError("daemon produced no results")
    (t0, s0), (t1, s1) = window, statuses[-1]
    lat = np.asarray(latencies) * 1e3
    return {
        "images_per_s": (s1["results"] - s0["results"]) / (t1 - t0),
        "dropped": s1["dropped"] - s0["dropped"],
        "captured": s1["captured"] - s0["captured"],
        "latency_p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
        "latency_p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
        "results_in_window": s1["results"] - s0["results"],
        "nok_in_window": s1["verdicts"]["NOK"] - s0["verdicts"]["NOK"],
        "previews_received": previews,
        "previews_dropped": s1.get("previews_dropped", 0) - s0.get("previews_dropped", 0),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", help="exported bundle (default: export an untrained one)")
    p.add_argument("--layers", default="1:9")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--c-d", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--preview-fps", type=float, default=2.0, help="previews of OK parts per second (step 4)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="daemon_bench_") as tmp:
        workdir = Path(tmp)
        bundle_dir = (
            Path(args.bundle) if args.bundle else make_bundle(workdir / "bundle", args.layers, args.size, args.c_d)
        )
        meta = bundle.read_metadata(bundle_dir)
        h, w = meta["input"]["height"], meta["input"]["width"]
        frames = texture_frames(32, h)
        if not (bundle_dir / bundle.CALIBRATION).is_file():
            calibrate(bundle_dir, frames, args.threads)
        video = write_video(workdir / "line.avi", frames)
        rounds = []
        for i in range(args.rounds):
            bench = measure(
                {
                    "kind": "engine",
                    "bundle": str(bundle_dir),
                    "provider": "cpu",
                    "batch": args.batch,
                    "iters": 30,
                    "threads": args.threads,
                    "max_seconds": args.seconds,
                }
            )
            sat = run_daemon(workdir, bundle_dir, video, args.batch, args.threads, 0, args.seconds)
            prev = run_daemon(workdir, bundle_dir, video, args.batch, args.threads, 0, args.seconds, args.preview_fps)
            half = run_daemon(
                workdir, bundle_dir, video, args.batch, args.threads, round(bench["images_per_s"] / 2, 1), args.seconds
            )
            row = {
                "bench_images_per_s": bench["images_per_s"],
                "daemon_images_per_s": sat["images_per_s"],
                "ratio": sat["images_per_s"] / bench["images_per_s"],
                "preview_ratio": prev["images_per_s"] / sat["images_per_s"],
                "saturated": sat,
                "half_load": half,
                "saturated_previews": prev,
            }
            rounds.append(row)
            print(
                f"round {i + 1}: bench {bench['images_per_s']:.1f} img/s, daemon {sat['images_per_s']:.1f} img/s "
                f"({row['ratio']:.1%}), queue drops {sat['dropped']} of {sat['captured']}; at "
                f"{half['images_per_s']:.1f} img/s: latency p50 {half['latency_p50_ms']:.1f} ms, "
                f"p99 {half['latency_p99_ms']:.1f} ms; previews on: {prev['images_per_s']:.1f} img/s "
                f"({row['preview_ratio']:.1%} of off), {prev['previews_received']} previews for "
                f"{prev['results_in_window']} results ({prev['nok_in_window']} NOK)",
                flush=True,
            )
        med = {
            k: statistics.median(r[k] for r in rounds)
            for k in ("bench_images_per_s", "daemon_images_per_s", "ratio", "preview_ratio")
        }
        med["half_load_latency_p50_ms"] = statistics.median(r["half_load"]["latency_p50_ms"] for r in rounds)
        med["half_load_latency_p99_ms"] = statistics.median(r["half_load"]["latency_p99_ms"] for r in rounds)
        med["saturated_latency_p50_ms"] = statistics.median(r["saturated"]["latency_p50_ms"] for r in rounds)
        report = {
            "bundle": str(bundle_dir) if args.bundle else f"untrained {args.layers} {h}x{w} c_d {args.c_d}",
            "model_id": bundle.model_id(meta),
            "batch": args.batch,
            "threads": args.threads,
            "cpu_count": os.cpu_count(),
            "rounds": rounds,
            "median": med,
        }
        print(
            f"median: bench {med['bench_images_per_s']:.1f} img/s, daemon {med['daemon_images_per_s']:.1f} img/s "
            f"= {med['ratio']:.1%}; latency at half load p50 {med['half_load_latency_p50_ms']:.1f} ms, "
            f"p99 {med['half_load_latency_p99_ms']:.1f} ms; saturated p50 {med['saturated_latency_p50_ms']:.1f} ms; "
            f"previews on / off {med['preview_ratio']:.1%}"
        )
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
