"""fp16 or int8 graph vs the fp32 graph on the dev benchmark: evaluation metrics must agree within 0.002.

  python benchmarks/precision_parity.py MODEL_DIR --data data/devset/brick [--precision fp16|int8]
                                        [--provider cpu] [--json out.json]

The bundle must be exported with `linewatch export MODEL_DIR --fp16` (or `--int8`). Exit 1 when any metric differs
by more than its tolerance (0.002; per-type image ROC-AUC: one swapped image pair, see `compare`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from linewatch.evaluation.evaluate import evaluate_scorer
from linewatch.line.engine import Engine

METRICS = ("pixel_roc_auc", "pro_auc", "image_roc_auc")
TOLERANCE = 0.002


def compare(fp32: dict, other: dict, tolerance: float = TOLERANCE) -> dict:
    """Per metric (overall and per defect type): both values, |difference| and the tolerance it is held to.

    `ok` when every difference is within its tolerance. An image ROC-AUC over few images moves in steps of
    1 / (good × defective) pairs (1/150 for 15 good and 10 defective): there the tolerance is one swapped pair
    of near-tied scores, since less than a step cannot be asked. Pixel metrics (millions of pixels) and the
    overall image ROC-AUC are held to `tolerance` itself.
    """
    rows = []
    for scope in ["overall", *sorted(fp32["per_type"])]:
        a = fp32["overall"] if scope == "overall" else fp32["per_type"][scope]
        b = other["overall"] if scope == "overall" else other["per_type"][scope]
        for name in METRICS:
            tol = tolerance
            if name == "image_roc_auc" and scope != "overall":
                tol = max(tolerance, 1.0 / (a["n_good"] * a["n_defect"]) + 1e-12)
            diff = abs(a[name] - b[name])
            rows.append(
                {
                    "scope": scope,
                    "metric": name,
                    "fp32": a[name],
                    "other": b[name],
                    "diff": diff,
                    "tolerance": tol,
                    "ok": diff <= tol,
                }
            )
    return {"tolerance": tolerance, "rows": rows, "ok": all(r["ok"] for r in rows)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--data", required=True, help="MVTec-layout category directory")
    p.add_argument("--precision", choices=["fp16", "int8"], default="fp16", help="the graph compared with fp32")
    p.add_argument("--provider", default="auto")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--json")
    args = p.parse_args(argv)
    results = {}
    for precision in ("fp32", args.precision):
        engine = Engine(args.model, providers=args.provider, precision=precision)
        results[precision] = evaluate_scorer(engine, args.data, batch=args.batch)
    report = compare(results["fp32"], results[args.precision])
    report.update(precision=args.precision, providers=engine.providers)
    for r in report["rows"]:
        print(
            f"{r['scope']:<12} {r['metric']:<14} fp32 {r['fp32']:.4f}  {args.precision} {r['other']:.4f}  "
            f"diff {r['diff']:.4f}"
            f"  (<= {r['tolerance']:.4f}{'' if r['ok'] else ' FAIL'})"
        )
    worst = max(report["rows"], key=lambda r: r["diff"] / r["tolerance"])
    print(
        f"{'OK' if report['ok'] else 'FAIL'}: largest difference {max(r['diff'] for r in report['rows']):.4f}; "
        f"closest to its tolerance: {worst['scope']} {worst['metric']} {worst['diff']:.4f} <= {worst['tolerance']:.4f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
