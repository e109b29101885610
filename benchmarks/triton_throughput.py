"""Aggregate throughput of 1, 2 and 4 daemons sharing one `linewatch serve` model against one daemon with a local
engine, and the latency a remote engine adds per frame (docs/SCALING.md, docs/BENCHMARKS.md).

  python benchmarks/triton_throughput.py [--bundle DIR] [--layers 1:4 --size 64 --c-d 16]
                                         [--daemons 1,2,4] [--batch 8] [--threads 2] [--rounds 2] [--seconds 8]
                                         [--providers cpu] [--json OUT]

The server is `linewatch serve` from the serve environment ($LINEWATCH_SERVE_PYTHON, default
~/.cache/linewatch-ci/serve-venv/bin/python), started once, with the engine threads of the local daemon. Each
round, interleaved because a shared machine's load drifts:
  1. one daemon (`linewatch run`, looped MJPG video, no fps cap) with engine.backend local: results/s, saturated;
  2. for N in --daemons: N daemons at once, each its own camera, engine.backend triton on the one served model:
     the sum of their results/s over the same window, saturated;
  3. latency capture -> publish (publish_time - frame_time of the result headers) of one daemon with its camera
     capped at half the local rate, local and remote: the difference is what the remote engine adds per frame.
Without --bundle an untrained DFR bundle is exported (torch needed for that step only).
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
import threading
import time
from pathlib import Path

import numpy as np
import yaml
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.daemon_throughput import calibrate, make_bundle, texture_frames, write_video  # noqa: E402
from linewatch import bundle  # noqa: E402
from linewatch.demo.run import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def serve_python() -> str:
    path = os.environ.get("LINEWATCH_SERVE_PYTHON") or str(Path.home() / ".cache/linewatch-ci/serve-venv/bin/python")
    if not Path(path).is_file():
        sys.exit(f"no serve venv at {path}: see docs/SCALING.md, 'The serve environment'")
    return path


def start_server(bundle_dir: Path, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, int]:
    grpc, http, metrics = free_port(), free_port(), free_port()
    cmd = [serve_python(), "-m", "linewatch.cli", "serve", str(bundle_dir), "--grpc-port", str(grpc)]
    cmd += ["--http-port", str(http), "--metrics-port", str(metrics), "--providers", args.providers]
    cmd += ["--threads", str(args.threads), "--max-batch", str(args.max_batch), "--max-queue-delay-us"]
    cmd += [str(args.max_queue_delay_us), "--preferred-batch-sizes", args.preferred_batch_sizes]
    out = log.open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if "serving: grpc=" in log.read_text(errors="replace"):
            return proc, grpc
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    sys.exit(f"linewatch serve did not start:\n{log.read_text(errors='replace')[-3000:]}")


def daemon_config(
    workdir: Path, bundle_dir: Path, video: Path, args: argparse.Namespace, fps: float, url: str | None
) -> tuple[Path, str]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    engine: dict = {"providers": [args.providers], "threads": args.threads, "max_batch": args.batch, "max_wait_ms": 20}
    if url:
        engine.update(backend="triton", url=url, timeout_s=30.0)
    config = {
        "model": {"bundle": str(bundle_dir)},
        "cameras": [
            {
                "name": "cam1",
                "kind": "video",
                "source": str(video),
                "loop": True,
                "fps": fps,
                "queue_size": 4 * args.batch,
            }
        ],
        "engine": engine,
        "publish": {"endpoint": endpoint, "status_interval_s": 0.25, "hwm": 10000},
        "health": {"inference_stall_s": 60.0},
        "logging": {"level": "WARNING"},
    }
    path = workdir / f"daemon_{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, endpoint


def run_daemons(
    workdir: Path,
    bundle_dir: Path,
    video: Path,
    args: argparse.Namespace,
    n: int,
    fps: float,
    url: str | None,
) -> list[dict]:
    """n daemons at once; each one's results/s over a window that starts when all have warmed up."""
    configs = [daemon_config(workdir, bundle_dir, video, args, fps, url) for _ in range(n)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "linewatch.cli", "run", "--config", str(path)],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        for path, _ in configs
    ]
    warm = threading.Barrier(n + 1)
    started = threading.Event()
    results: list[dict] = [{} for _ in range(n)]

    def watch(i: int, endpoint: str) -> None:
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 100_000)
        sub.setsockopt_string(zmq.SUBSCRIBE, "linewatch/cam1/")
        sub.connect(endpoint)
        first = last = None
        latencies: list[float] = []
        waited = False
        deadline = time.monotonic() + 180 + 2 * args.seconds
        try:
            while time.monotonic() < deadline:
                if not sub.poll(500):
                    if procs[i].poll() is not None:
                        results[i] = {"error": f"daemon exited {procs[i].returncode}"}
                        break
                    continue
                parts = sub.recv_multipart()
                header = json.loads(parts[1])
                now = time.monotonic()
                if parts[0].endswith(b"/status"):
                    if not waited and header["results"] >= 4 * args.batch:
                        waited = True
                        warm.wait(120)  # every daemon past warm-up: the common window starts
                        started.set()
                        continue
                    if started.is_set():
                        if first is None:
                            first = (now, header)
                        last = (now, header)
                        if now - first[0] >= args.seconds:
                            break
                elif started.is_set() and first is not None:
                    latencies.append(header["publish_time"] - header["frame_time"])
        finally:
            sub.close(0)
        if first is not None and last is not None and last[0] > first[0]:
            lat = np.asarray(latencies) * 1e3
            results[i] = {
                "images_per_s": (last[1]["results"] - first[1]["results"]) / (last[0] - first[0]),
                "errors": last[1]["verdicts"]["ERROR"] - first[1]["verdicts"]["ERROR"],
                "latency_p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
                "latency_p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
            }

    threads = [threading.Thread(target=watch, args=(i, ep), daemon=True) for i, (_, ep) in enumerate(configs)]
    for t in threads:
        t.start()
    try:
        warm.wait(300)
        for t in threads:
            t.join(120 + 2 * args.seconds)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    bad = [r for r in results if "images_per_s" not in r]
    if bad:
        errs = [p.stderr.read()[-1500:] if p.stderr else "" for p in procs]
        raise RuntimeError(f"daemon(s) without results: {bad}\n" + "\n".join(errs))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", help="exported bundle (default: export an untrained one)")
    p.add_argument("--layers", default="1:4")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--c-d", type=int, default=16)
    p.add_argument("--daemons", default="1,2,4", help="numbers of daemons sharing the served model")
    p.add_argument(
        "--local-daemons",
        default="1",
        help="numbers of daemons with local engines, side by side on this machine (1 is the reference; more show "
        "how much of a gain comes from more processes sharing the cores, not from the server)",
    )
    p.add_argument("--batch", type=int, default=8, help="each daemon's engine.max_batch")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads, local engine and server alike")
    p.add_argument("--providers", default="cpu")
    p.add_argument("--max-batch", type=int, default=32, help="the server's max batch")
    p.add_argument("--preferred-batch-sizes", default="8,16,32")
    p.add_argument("--max-queue-delay-us", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--json")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.daemons.split(",")]
    local_counts = sorted({1, *(int(c) for c in args.local_daemons.split(","))})
    with tempfile.TemporaryDirectory(prefix="triton_bench_") as tmp:
        workdir = Path(tmp)
        bundle_dir = (
            Path(args.bundle) if args.bundle else make_bundle(workdir / "bundle", args.layers, args.size, args.c_d)
        )
        meta = bundle.read_metadata(bundle_dir)
        h = meta["input"]["height"]
        frames = texture_frames(32, h)
        if not (bundle_dir / bundle.CALIBRATION).is_file():
            calibrate(bundle_dir, frames, args.threads)
        video = write_video(workdir / "line.avi", frames)
        server, grpc = start_server(bundle_dir, args, workdir / "serve.log")
        url = f"127.0.0.1:{grpc}"
        rounds = []
        try:
            for r in range(args.rounds):
                (local,) = run_daemons(workdir, bundle_dir, video, args, 1, 0, None)
                row: dict = {"local_images_per_s": local["images_per_s"], "remote": {}, "local": {}}
                for n in local_counts[1:]:
                    each = run_daemons(workdir, bundle_dir, video, args, n, 0, None)
                    total = sum(d["images_per_s"] for d in each)
                    row["local"][n] = {"images_per_s": total, "ratio_to_local": total / local["images_per_s"]}
                for n in counts:
                    each = run_daemons(workdir, bundle_dir, video, args, n, 0, url)
                    total = sum(d["images_per_s"] for d in each)
                    row["remote"][n] = {
                        "images_per_s": total,
                        "per_daemon": [d["images_per_s"] for d in each],
                        "errors": sum(d["errors"] for d in each),
                        "ratio_to_local": total / local["images_per_s"],
                    }
                fps = round(local["images_per_s"] / 2, 1)
                (half_local,) = run_daemons(workdir, bundle_dir, video, args, 1, fps, None)
                (half_remote,) = run_daemons(workdir, bundle_dir, video, args, 1, fps, url)
                row["half_load_fps"] = fps
                row["latency_local_ms"] = [half_local["latency_p50_ms"], half_local["latency_p99_ms"]]
                row["latency_remote_ms"] = [half_remote["latency_p50_ms"], half_remote["latency_p99_ms"]]
                rounds.append(row)
                remote_text = ", ".join(
                    f"{n} daemon(s) {v['images_per_s']:.1f} img/s ({v['ratio_to_local']:.0%}, {v['errors']} ERROR)"
                    for n, v in row["remote"].items()
                )
                local_text = "".join(
                    f", {n} local daemons {v['images_per_s']:.1f} img/s ({v['ratio_to_local']:.0%})"
                    for n, v in row["local"].items()
                )
                print(
                    f"round {r + 1}: local {local['images_per_s']:.1f} img/s{local_text}; remote: {remote_text}; "
                    f"latency at {fps} fps p50/p99 local {row['latency_local_ms'][0]:.1f}/"
                    f"{row['latency_local_ms'][1]:.1f} ms, remote {row['latency_remote_ms'][0]:.1f}/"
                    f"{row['latency_remote_ms'][1]:.1f} ms",
                    flush=True,
                )
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
        med = {"local_images_per_s": statistics.median(r["local_images_per_s"] for r in rounds)}
        for n in counts:
            med[f"remote_{n}_images_per_s"] = statistics.median(r["remote"][n]["images_per_s"] for r in rounds)
            med[f"remote_{n}_ratio"] = statistics.median(r["remote"][n]["ratio_to_local"] for r in rounds)
        for n in local_counts[1:]:
            med[f"local_{n}_ratio"] = statistics.median(r["local"][n]["ratio_to_local"] for r in rounds)
        for key in ("latency_local_ms", "latency_remote_ms"):
            med[key + "_p50"] = statistics.median(r[key][0] for r in rounds)
            med[key + "_p99"] = statistics.median(r[key][1] for r in rounds)
        med["added_latency_p50_ms"] = med["latency_remote_ms_p50"] - med["latency_local_ms_p50"]
        print("median: " + ", ".join(f"{k} {v:.3g}" for k, v in med.items()))
        report = {
            "bundle": str(bundle_dir) if args.bundle else f"untrained {args.layers} {h}x{h} c_d {args.c_d}",
            "model_id": bundle.model_id(meta),
            "args": vars(args),
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
            "rounds": rounds,
            "median": med,
        }
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
