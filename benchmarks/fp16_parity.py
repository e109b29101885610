"""fp16 graph vs fp32 graph on the dev benchmark: evaluation metrics must agree within 0.002 (issue 3).

  python benchmarks/fp16_parity.py MODEL_DIR --data data/devset/brick [--provider cpu] [--json out.json]

The bundle must be exported with `linewatch export MODEL_DIR --fp16`. Exit 1 when any metric differs by more
than the tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linewatch.engine import Engine  # noqa: E402
from linewatch.evaluate import evaluate_scorer  # noqa: E402

METRICS = ("pixel_roc_auc", "pro_auc", "image_roc_auc")
TOLERANCE = 0.002


def compare(fp32: dict, fp16: dict, tolerance: float = TOLERANCE) -> dict:
    """Per metric (overall and per defect type): both values and |difference|; `ok` if all are within tolerance."""
    rows = []
    for scope in ["overall", *sorted(fp32["per_type"])]:
        a = fp32["overall"] if scope == "overall" else fp32["per_type"][scope]
        b = fp16["overall"] if scope == "overall" else fp16["per_type"][scope]
        for name in METRICS:
            rows.append({"scope": scope, "metric": name, "fp32": a[name], "fp16": b[name],
                         "diff": abs(a[name] - b[name])})
    return {"tolerance": tolerance, "rows": rows, "ok": all(r["diff"] <= tolerance for r in rows)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--data", required=True, help="MVTec-layout category directory")
    p.add_argument("--provider", default="auto")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--json")
    args = p.parse_args(argv)
    results = {}
    for precision, fp16 in (("fp32", False), ("fp16", True)):
        engine = Engine(args.model, providers=args.provider, fp16=fp16)
        results[precision] = evaluate_scorer(engine, args.data, batch=args.batch)
    report = compare(results["fp32"], results["fp16"])
    report["providers"] = engine.providers
    for r in report["rows"]:
        print(f"{r['scope']:<12} {r['metric']:<14} fp32 {r['fp32']:.4f}  fp16 {r['fp16']:.4f}  diff {r['diff']:.4f}")
    print(f"{'OK' if report['ok'] else 'FAIL'}: largest difference {max(r['diff'] for r in report['rows']):.4f} "
          f"(tolerance {TOLERANCE})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
