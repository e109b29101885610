"""CPU speed and memory of the fused graph(s) against the naive torch reference, interleaved to beat noise.

  python benchmarks/cpu_speed.py MODEL_DIR [--precision fp32,int8] [--rounds 3] [--iters 5] [--batch 1]
                                 [--json out.json]

This machine is shared, so absolute times drift by 2× within minutes. Each round measures the engine (once per
precision) and then the reference, each in a fresh subprocess (peak RSS of that process alone), and the ratios are
taken within the round; the median over rounds is reported. The CPU speed target: >= 3× faster per image and >= 4×
less peak memory than the reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from linewatch.evaluation.bench import measure


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--batch", type=int, default=1, help="engine batch size (the reference always runs batch 1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="fp32", help="comma-separated graphs to measure: fp32, fp16, int8")
    p.add_argument("--json")
    args = p.parse_args(argv)
    precisions = [x.strip() for x in args.precision.split(",") if x.strip()]
    base = {"bundle": args.model, "iters": args.iters, "threads": args.threads, "max_seconds": 120}
    rounds = []
    for i in range(args.rounds):
        engines = {
            prec: measure({**base, "kind": "engine", "provider": "cpu", "batch": args.batch, "precision": prec})
            for prec in precisions
        }
        ref = measure({**base, "kind": "reference", "batch": 1})
        row = {
            "reference_images_per_s": ref["images_per_s"],
            "reference_peak_mb": ref["peak_rss_mb"],
            "reference_p50_ms": ref["p50_ms"],
            "reference_cpu_s": ref["cpu_s_per_image"],
            "engines": {},
        }
        for prec, eng in engines.items():
            row["engines"][prec] = e = {
                "images_per_s": eng["images_per_s"],
                "peak_mb": eng["peak_rss_mb"],
                "p50_ms": eng["p50_ms"],
                "cpu_s": eng["cpu_s_per_image"],
                "speedup": eng["images_per_s"] / ref["images_per_s"],
                "cpu_time_ratio": ref["cpu_s_per_image"] / eng["cpu_s_per_image"],
                "memory_ratio": ref["peak_rss_mb"] / eng["peak_rss_mb"],
            }
            print(
                f"round {i + 1} {prec}: engine {e['images_per_s']:.3f} img/s ({e['peak_mb']:.0f} MB), "
                f"reference {ref['images_per_s']:.3f} img/s ({ref['peak_rss_mb']:.0f} MB): "
                f"{e['speedup']:.2f}x faster (CPU time {e['cpu_time_ratio']:.2f}x), "
                f"{e['memory_ratio']:.2f}x less memory",
                flush=True,
            )
        rounds.append(row)
    summary = {"engine_batch": args.batch, "threads": args.threads, "rounds": rounds, "median": {}}
    for prec in precisions:
        med = {
            key: statistics.median(r["engines"][prec][key] for r in rounds)
            for key in ("speedup", "cpu_time_ratio", "memory_ratio")
        }
        summary["median"][prec] = med
        print(
            f"median {prec}: {med['speedup']:.2f}x faster per image (CPU time {med['cpu_time_ratio']:.2f}x), "
            f"{med['memory_ratio']:.2f}x less peak memory"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
