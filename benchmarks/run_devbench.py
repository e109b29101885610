"""Dev benchmark: train and evaluate DFR per category and preset, next to the z-score baseline, and print the table.

For each category of the dev set (benchmarks/make_devset.py) and each preset:
  linewatch train --data DATA/CAT --out OUT/CAT-PRESET --preset PRESET [TRAIN_ARGS]
  linewatch eval OUT/CAT-PRESET --data DATA/CAT --json OUT/CAT-PRESET/eval.json
and the per-pixel z-score baseline (benchmarks/baseline.py) through the same evaluation code. Writes
OUT/devbench.json and OUT/devbench.md.

  python benchmarks/make_devset.py --out data/devset
  python benchmarks/run_devbench.py --data data/devset --out runs/devbench --presets fast,paper
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from baseline import ZScoreBaseline  # benchmarks/ is the script's own folder

from linewatch import bundle
from linewatch.evaluation.datasets import good_image_folder
from linewatch.evaluation.evaluate import METRICS, evaluate_scorer
from linewatch.images import read_image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

BASELINE = "baseline"
LABELS = {"pixel_roc_auc": "pixel ROC-AUC", "pro_auc": "PRO-AUC (FPR 0.3)", "image_roc_auc": "image ROC-AUC"}


def linewatch(*args: str) -> None:
    """Run a linewatch command as a subprocess, its progress going to our stderr; a failure stops the benchmark."""
    cmd = [sys.executable, "-m", "linewatch.cli", *args]
    print("+ linewatch " + shlex.join(args), file=sys.stderr, flush=True)
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    if rc != 0:
        raise SystemExit(f"linewatch {args[0]} failed with exit code {rc}: {shlex.join(cmd)}")


def run_preset(
    category_dir: Path, out_dir: Path, preset: str, train_args: list[str], backend: str, reuse: bool, overlays: bool
) -> dict:
    model = out_dir / f"{category_dir.name}-{preset}"
    if reuse and (model / bundle.METADATA).is_file():
        print(f"reusing trained model {model}", file=sys.stderr)
    else:
        linewatch("train", "--data", str(category_dir), "--out", str(model), "--preset", preset, *train_args)
    eval_json = model / "eval.json"
    extra = ["--overlays", str(model / "overlays")] if overlays else []
    linewatch("eval", str(model), "--data", str(category_dir), "--json", str(eval_json), "--backend", backend, *extra)
    result = json.loads(eval_json.read_text())
    training = bundle.read_metadata(model).get("training", {})
    return {
        **{k: result["overall"][k] for k in METRICS},
        "per_type": result["per_type"],
        "input_size": result["input_size"],
        "backend": result["backend"],
        "model": str(model),
        "train_seconds": training.get("train_seconds"),
        "eval_seconds": result["seconds"],
    }


def run_baseline(category_dir: Path, size: int | None) -> dict:
    """The z-score baseline at `size` (default: the category's own image size)."""
    folder = good_image_folder(category_dir)
    if size is None:
        first = next(p for p in sorted(folder.iterdir()) if p.is_file())
        size = read_image(first).shape[0]
    t0 = time.perf_counter()
    scorer = ZScoreBaseline.fit(folder, (size, size))
    result = evaluate_scorer(scorer, category_dir)
    return {
        **{k: result["overall"][k] for k in METRICS},
        "per_type": result["per_type"],
        "input_size": result["input_size"],
        "backend": "numpy",
        "model": "per-pixel z-score",
        "train_seconds": None,
        "eval_seconds": round(time.perf_counter() - t0, 3),
    }


def markdown_table(results: dict, methods: list[str]) -> str:
    """Rows category × method, then the mean per method over the categories."""
    head = ["category", "method", "size", *(LABELS[k] for k in METRICS), "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]

    def row(category, method, r):
        train = "" if r.get("train_seconds") is None else f"{r['train_seconds']:.0f}"
        size = "×".join(str(v) for v in r["input_size"]) if r.get("input_size") else ""
        cells = [category, method, size, *(f"{r[k]:.4f}" for k in METRICS), train]
        lines.append("| " + " | ".join(cells) + " |")

    for category, by_method in results.items():
        for method in methods:
            row(category, method, by_method[method])
    for method in methods:
        rows = [by_method[method] for by_method in results.values()]
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in METRICS}
        row("**mean**", method, mean)
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/devset", help="dev set folder (one MVTec category per sub-folder)")
    p.add_argument("--out", default="runs/devbench", help="folder for the trained bundles and the result files")
    p.add_argument("--presets", default="fast,paper", help="comma-separated training presets ('' = baseline only)")
    p.add_argument("--categories", default="brick,grass,gravel", help="comma-separated categories")
    p.add_argument("--train-args", default="", help="extra arguments for linewatch train, e.g. '--weights F.h5'")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx"], help="linewatch eval --backend")
    p.add_argument("--baseline-size", type=int, help="baseline input size (default: the images' own size)")
    p.add_argument("--reuse", action="store_true", help="evaluate already trained bundles instead of retraining")
    p.add_argument("--overlays", action="store_true", help="write eval overlays into each bundle folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    missing = [c for c in categories if not (data / c).is_dir()]
    if missing:
        raise SystemExit(
            f"categories not found in {data}: {', '.join(missing)} "
            f"(build them with: python benchmarks/make_devset.py --out {data})"
        )
    out.mkdir(parents=True, exist_ok=True)
    methods = [BASELINE, *presets]
    results: dict[str, dict] = {}
    for category in categories:
        category_dir = data / category
        results[category] = {BASELINE: run_baseline(category_dir, args.baseline_size)}
        for preset in presets:
            results[category][preset] = run_preset(
                category_dir, out, preset, shlex.split(args.train_args), args.backend, args.reuse, args.overlays
            )
    table = markdown_table(results, methods)
    (out / "devbench.json").write_text(
        json.dumps({"data": str(data), "presets": presets, "train_args": args.train_args, "results": results}, indent=2)
        + "\n"
    )
    (out / "devbench.md").write_text(table + "\n")
    print(table)
    print(f"\nwritten: {out / 'devbench.json'}, {out / 'devbench.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
