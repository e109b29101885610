"""`linewatch bench`: images/s, p50/p99 latency and peak memory of the exported graph, against a naive reference.

Every measurement runs in a fresh subprocess (`python -m linewatch.evaluation.bench --worker SPEC`) so that peak memory
(ru_maxrss) belongs to that measurement alone and one configuration cannot warm caches for another. The
reference is the torch model computed the way the paper's code does it (export/reference.py); it is measured in
the same run because this machine's speed drifts, and ratios are what is reported. This module never imports
torch; only the reference worker does.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from linewatch import bundle
from linewatch.errors import ConfigError, LinewatchError

log = logging.getLogger("linewatch.evaluation.bench")

WARMUP = 2
MAX_SECONDS = 30.0  # per measurement; at least MIN_ITERS calls are always timed
MIN_ITERS = 3


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--batch must be comma-separated integers, got {text!r}") from None
    if not batches or any(b < 1 for b in batches):
        raise ConfigError(f"--batch must list positive batch sizes, got {text!r}")
    return batches


def latency_stats(seconds: list[float], batch: int) -> dict:
    """images/s over all timed calls and per-call latency percentiles in ms."""
    arr = np.asarray(seconds, np.float64)
    return {
        "iters": int(arr.size),
        "images_per_s": float(batch * arr.size / arr.sum()),
        "p50_ms": float(np.percentile(arr, 50) * 1e3),
        "p99_ms": float(np.percentile(arr, 99) * 1e3),
        "mean_ms": float(arr.mean() * 1e3),
    }


def time_calls(
    score, frames: np.ndarray, iters: int, warmup: int = WARMUP, max_seconds: float = MAX_SECONDS
) -> list[float]:
    for _ in range(warmup):
        score(frames)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < iters and (len(times) < MIN_ITERS or time.perf_counter() - start < max_seconds):
        t = time.perf_counter()
        score(frames)
        times.append(time.perf_counter() - t)
    return times


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def bench_frames(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, height, width, 3), dtype=np.uint8)


# ---- worker (runs in a subprocess) --------------------------------------------------------------------------


def run_worker(spec: dict) -> dict:
    """One measurement: load the scorer, time it, report peak RSS of this process."""
    meta = bundle.read_metadata(spec["bundle"])
    h, w = meta["input"]["height"], meta["input"]["width"]
    threads = spec.get("threads")
    t0 = time.perf_counter()
    if spec["kind"] == "engine":
        from linewatch.line.engine import Engine

        scorer = Engine(
            spec["bundle"], providers=spec["provider"], precision=spec.get("precision", "fp32"), threads=threads
        )
        label = {"providers": scorer.providers}
    else:
        from linewatch.export.reference import (
            NaiveScorer,  # torch: only ever imported in this subprocess
        )
        from linewatch.training.model import load_model

        scorer = NaiveScorer(load_model(spec["bundle"]), threads=threads)
        label = {"providers": ["torch-cpu"]}
    load_s = time.perf_counter() - t0
    frames = bench_frames(spec["batch"], h, w)
    cpu0 = time.process_time()
    times = time_calls(scorer.score, frames, spec["iters"], max_seconds=spec.get("max_seconds", MAX_SECONDS))
    # CPU seconds per image (warm-up included in both numerator and denominator): less sensitive than wall
    # time to other jobs on a shared host, though not immune (shared caches and memory bandwidth)
    cpu_per_image = (time.process_time() - cpu0) / (spec["batch"] * (len(times) + WARMUP))
    return {
        **label,
        "batch": spec["batch"],
        "load_s": load_s,
        **latency_stats(times, spec["batch"]),
        "cpu_s_per_image": cpu_per_image,
        "peak_rss_mb": peak_rss_mb(),
    }


def measure(spec: dict, timeout: float = 1800) -> dict:
    cmd = [sys.executable, "-m", "linewatch.evaluation.bench", "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LinewatchError(f"benchmark worker timed out after {timeout:.0f} s: {spec}") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise LinewatchError(
            f"benchmark worker failed (exit {proc.returncode}) for {spec['kind']} "
            f"batch {spec['batch']}: {proc.stderr.strip()[-800:]}"
        )
    return json.loads(lines[-1])


# ---- command --------------------------------------------------------------------------------------------------


def reference_unavailable(bundle_dir: Path) -> str | None:
    """Why the torch reference cannot run here, or None."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (runtime-only install)"
    if not (bundle_dir / bundle.CHECKPOINT).is_file():
        return f"no torch checkpoint {bundle_dir / bundle.CHECKPOINT}"
    return None


def run_bench(
    bundle_dir: str | Path,
    batches: list[int],
    providers: list[str],
    precision: str = "fp32",
    iters: int = 20,
    reference: bool = True,
    threads: int | None = None,
    max_seconds: float = MAX_SECONDS,
    timeout: float = 1800,
) -> dict:
    """`timeout`: seconds each measurement's worker process may take (load, warm-up and timed calls)."""
    bundle_dir = Path(bundle_dir)
    meta = bundle.read_metadata(bundle_dir)
    threads = threads or os.cpu_count() or 1
    results = []
    for provider in providers:
        for batch in batches:
            spec = {
                "kind": "engine",
                "bundle": str(bundle_dir),
                "provider": provider,
                "precision": precision,
                "batch": batch,
                "iters": iters,
                "threads": threads,
                "max_seconds": max_seconds,
            }
            res = measure(spec, timeout=timeout)
            res.update(provider=provider, precision=precision)
            log.info(
                "%s batch %d: %.1f images/s, p99 %.1f ms",
                "/".join(res["providers"]),
                batch,
                res["images_per_s"],
                res["p99_ms"],
            )
            results.append(res)
    report = {
        "bundle": str(bundle_dir),
        "model_id": bundle.model_id(meta),
        "precision": precision,
        "input": [meta["input"]["height"], meta["input"]["width"]],
        "layers": (meta.get("dfr") or {}).get("layer_spec"),
        "c_d": (meta.get("dfr") or {}).get("c_d"),
        "weights": (meta.get("weights") or {}).get("source"),
        "host": {
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "threads": threads,
            "python": platform.python_version(),
        },
        "results": results,
    }
    why_not = None if reference else "disabled (--no-reference)"
    why_not = why_not or reference_unavailable(bundle_dir)
    if why_not:
        report["reference"] = {"skipped": why_not}
        return report
    ref_batch = 1  # the naive reference holds c_o×H×W floats per image (906 MB for f_{1:12} at 256²)
    ref = measure(
        {
            "kind": "reference",
            "bundle": str(bundle_dir),
            "batch": ref_batch,
            "iters": iters,
            "threads": threads,
            "max_seconds": max_seconds,
        }
    )
    report["reference"] = ref
    log.info(
        "naive torch reference batch %d: %.2f images/s, peak %.0f MB",
        ref_batch,
        ref["images_per_s"],
        ref["peak_rss_mb"],
    )
    report["ratios"] = [
        {
            "provider": r["provider"],
            "batch": r["batch"],
            "speedup_per_image": r["images_per_s"] / ref["images_per_s"],
            "cpu_time_ratio": ref["cpu_s_per_image"] / r["cpu_s_per_image"],
            "memory_ratio": ref["peak_rss_mb"] / r["peak_rss_mb"],
        }
        for r in results
    ]
    return report


def format_report(report: dict) -> str:
    lines = [
        f"bundle {report['bundle']} (model {report['model_id']}, {report['input'][0]}x{report['input'][1]}, "
        f"layers {report['layers']}, c_d {report['c_d']}, weights {report['weights']}, "
        f"{report['host']['threads']} threads, {report.get('precision', 'fp32')} graph)",
        f"{'providers':<34} {'batch':>5} {'images/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'peak MB':>8}",
    ]
    rows = list(report["results"])
    ref = report.get("reference", {})
    if "skipped" not in ref:
        rows.append({**ref, "providers": ["naive torch reference"]})
    for r in rows:
        lines.append(
            f"{'/'.join(r['providers'])[:34]:<34} {r['batch']:>5} {r['images_per_s']:>10.2f} "
            f"{r['p50_ms']:>9.1f} {r['p99_ms']:>9.1f} {r['peak_rss_mb']:>8.0f}"
        )
    if "skipped" in ref:
        lines.append(f"reference: skipped: {ref['skipped']}")
    for q in report.get("ratios", []):
        lines.append(
            f"{q['provider']} batch {q['batch']}: {q['speedup_per_image']:.2f}x faster per image, "
            f"{q['memory_ratio']:.2f}x less peak memory than the naive reference (batch 1)"
        )
    return "\n".join(lines)


def cli_bench(args) -> int:
    batches = parse_batches(args.batch)
    providers = [p.strip() for p in str(args.provider).split(",") if p.strip()] or ["auto"]
    from linewatch.line.engine import parse_providers

    for p in providers:
        parse_providers(p)  # unknown names fail here, before any worker starts
    if args.iters < 1:
        raise ConfigError(f"--iters must be >= 1, got {args.iters}")
    report = run_bench(
        args.model, batches, providers, precision=args.precision, iters=args.iters, reference=not args.no_reference
    )
    text = format_report(report)
    if args.json == "-":
        print(json.dumps(report, indent=2))
        print(text, file=sys.stderr)
    else:
        print(text)
        if args.json:
            bundle.atomic_write_json(args.json, report)
    return 0


def _worker_main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        print(json.dumps(run_worker(json.loads(argv[1]))), flush=True)
    except LinewatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    sys.exit(_worker_main(sys.argv[1:]))
