"""How long results and status pause around a reload (SIGHUP) that changes only the calibration, and a refused one.

  python benchmarks/reload_pause.py [--bundle DIR] [--layers 1:8 --size 128 --c-d 32] [--batch 8] [--threads 2]
                                    [--fps 4] [--rounds 3] [--json OUT]

Without --bundle, an untrained DFR bundle is exported (torch needed for that step only). The daemon
(`python -m linewatch.cli run`, started outside the repository so PYTHONPATH decides which linewatch runs: set
PYTHONPATH=/tmp/old_lw for a checkout of an older commit) reads a looped video at --fps, below the engine's rate,
so a gap between results is a pause, not a queue. Each round: 3 s of steady results, then a new calibration and
SIGHUP (wait for results with it), then a broken calibration.json and SIGHUP (wait for `reload refused` in the
log). Reported per reload: the longest gap between consecutive results and between status messages (their
`publish_time`) from 1 s before the SIGHUP to 1 s after the reload ended, and how long the reload took.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
import zmq

from linewatch import bundle
from linewatch.demo.run import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon_throughput import calibrate, make_bundle, texture_frames, write_video  # noqa: E402


class Daemon:
    """The daemon as a subprocess with a SUB on its results and status; log to a file."""

    def __init__(self, workdir: Path, bundle_dir: Path, video: Path, batch: int, threads: int, fps: float):
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        config = {
            "model": {"bundle": str(bundle_dir)},
            "cameras": [{"name": "cam1", "kind": "video", "source": str(video), "loop": True, "fps": fps}],
            "engine": {"providers": ["cpu"], "threads": threads, "max_batch": batch, "max_wait_ms": 5},
            "publish": {"endpoint": endpoint, "status_interval_s": 0.25, "hwm": 10000},
            "health": {"inference_stall_s": 60.0},
        }
        path = workdir / "daemon.yaml"
        path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"daemon_{time.monotonic_ns()}.log"
        self.sub = zmq.Context.instance().socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, 100_000)
        self.sub.setsockopt_string(zmq.SUBSCRIBE, "linewatch/cam1/")
        self.sub.connect(endpoint)
        self.results: list[tuple[float, dict]] = []  # (publish_time, header)
        self.statuses: list[float] = []  # publish_time
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "linewatch.cli", "run", "--config", str(path)],
                cwd=workdir,  # not the repository: PYTHONPATH (or the installed linewatch) decides the code
                stderr=log,
                env=dict(os.environ),
            )

    def poll(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if not self.sub.poll(int(left * 1000) + 1):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log()[-2000:]}")
                continue
            parts = self.sub.recv_multipart()
            header = json.loads(parts[1])
            if parts[0].endswith(b"/status"):
                self.statuses.append(header["publish_time"])
            else:
                self.results.append((header["publish_time"], header))

    def until(self, cond, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > end:
                raise RuntimeError(f"timed out waiting for {what}")
            self.poll(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        self.sub.close(0)


def longest_gap(stamps: list[float], start: float, end: float) -> float:
    inside = [t for t in stamps if start <= t <= end]
    return float(max(np.diff(inside))) if len(inside) > 1 else float("nan")


def one_round(workdir: Path, bundle_dir: Path, video: Path, args: argparse.Namespace) -> dict:
    from linewatch.calibrate.store import write_calibration

    cal = json.loads((bundle_dir / bundle.CALIBRATION).read_text())
    daemon = Daemon(workdir, bundle_dir, video, args.batch, args.threads, args.fps)
    out = {}
    try:
        daemon.until(lambda: len(daemon.results) >= 10, 600, "first results")
        daemon.poll(3.0)
        # 1. a reload that changes only the calibration
        version = write_calibration(bundle_dir, cal["pixel_threshold"] * 1.01, min_defect_area=4).version
        t0 = time.time()
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.until(lambda: daemon.results[-1][1]["calibration_version"] == version, 120, "the new calibration")
        took = daemon.results[-1][0] - t0
        daemon.poll(1.0)
        end = t0 + took + 1.0
        out["calibration"] = {
            "reload_s": took,
            "result_gap_s": longest_gap([t for t, _ in daemon.results], t0 - 1.0, end),
            "status_gap_s": longest_gap(daemon.statuses, t0 - 1.0, end),
        }
        # 2. a refused reload (broken calibration.json)
        (bundle_dir / bundle.CALIBRATION).write_text('{"broken": ')
        t1 = time.time()
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.until(lambda: "reload refused" in daemon.log(), 120, "the refusal")
        took = time.time() - t1
        daemon.poll(1.0)
        end = t1 + took + 1.0
        out["refused"] = {
            "reload_s": took,
            "result_gap_s": longest_gap([t for t, _ in daemon.results], t1 - 1.0, end),
            "status_gap_s": longest_gap(daemon.statuses, t1 - 1.0, end),
        }
        out["steady_result_gap_s"] = longest_gap([t for t, _ in daemon.results], t0 - 4.0, t0 - 1.0)  # no reload
        out["steady_status_gap_s"] = longest_gap(daemon.statuses, t0 - 4.0, t0 - 1.0)
        out["warmups_logged"] = daemon.log().count("engine warm-up")
        if os.environ.get("RELOAD_PAUSE_LOG"):
            print(daemon.log(), file=sys.stderr)
    finally:
        daemon.stop()
        write_calibration(bundle_dir, cal["pixel_threshold"], min_defect_area=4)  # a valid one for the next round
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", help="exported bundle (default: export an untrained one)")
    p.add_argument("--layers", default="1:8")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--c-d", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fps", type=float, default=4.0, help="camera rate, below the engine's")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="write the rounds here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.bundle:
            bundle_dir = work / "bundle"
            shutil.copytree(args.bundle, bundle_dir)
        else:
            bundle_dir = make_bundle(work / "bundle", args.layers, args.size, args.c_d)
        frames = texture_frames(16, args.size)
        if not (bundle_dir / bundle.CALIBRATION).is_file():
            calibrate(bundle_dir, frames, args.threads)
        video = write_video(work / "line.avi", frames)
        rounds = [one_round(work, bundle_dir, video, args) for _ in range(args.rounds)]
    for i, r in enumerate(rounds, 1):
        print(f"round {i}: {json.dumps(r)}")
    for key in ("steady_result_gap_s", "steady_status_gap_s"):
        values = [r[key] for r in rounds]
        print(f"no reload {key}: median {statistics.median(values):.3f} (max {max(values):.3f})")
    for kind in ("calibration", "refused"):
        for key in ("reload_s", "result_gap_s", "status_gap_s"):
            values = [r[kind][key] for r in rounds]
            med, lo, hi = statistics.median(values), min(values), max(values)
            print(f"{kind} {key}: median {med:.3f} (min {lo:.3f}, max {hi:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(rounds, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
