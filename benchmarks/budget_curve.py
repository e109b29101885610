"""Quality against training budget: evaluate a run's snapshots (and final bundle) on one or more test sets.

`linewatch train` with `snapshot_epochs: [1, 2, 4, 8]` in its settings file writes evaluable bundles to
OUT/snapshots/epoch-NNN during one run. This script scores every snapshot of every run given on each data set
(MVTec-layout categories) and prints one row per snapshot: epochs, wall and CPU minutes of the training command up
to that point, best validation loss, and pixel ROC-AUC / PRO-AUC / image ROC-AUC per data set. The frozen backbone
is the same for all snapshots of runs on the same data, so each test image's regional features are extracted
once and every snapshot's CAE scores them (the maps are those of `linewatch eval --backend torch`; a test
checks it).

  python benchmarks/budget_curve.py RUN [RUN ...] --data devset/grass --data valset/grass --json curve.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from linewatch import bundle
from linewatch.evaluation import datasets
from linewatch.evaluation.evaluate import METRICS, metrics_by_type
from linewatch.images import read_image, read_mask, resize_to_model
from linewatch.training.model import DFR, load_model
from linewatch.training.train import SNAPSHOTS

FEATURE_KEYS = ("layers", "height", "width", "padding", "align", "pool", "feature_scale")
SHORT = {"pixel_roc_auc": "pixel", "pro_auc": "PRO", "image_roc_auc": "image"}


def bundles_of(run: Path) -> list[Path]:
    """The run's snapshots in epoch order, then its final bundle (if training finished and no snapshot holds it:
    scoring at 256² costs about as much CPU as training, so nothing is scored twice)."""
    snaps = sorted(p for p in (run / SNAPSHOTS).glob("epoch-*") if (p / bundle.METADATA).is_file())
    final = [run] if (run / bundle.METADATA).is_file() else []
    if final and snaps and epochs_of(snaps[-1]) == epochs_of(run):
        final = []
    if not snaps and not final:
        raise SystemExit(f"{run}: neither snapshots nor a trained bundle")
    return snaps + final


def epochs_of(path: Path) -> int:
    return int(bundle.read_metadata(path)["training"]["epochs"])


def feature_identity(model: DFR) -> tuple:
    return (*(str(getattr(model.config, k)) for k in FEATURE_KEYS), model.weights.sha256)


@torch.inference_mode()
def score_set(models: list[DFR], data_dir: Path, batch: int = 8) -> list[dict]:
    """Metrics of every model on one category, extracting each image's features once (models share them)."""
    if len({feature_identity(m) for m in models}) != 1:
        raise SystemExit("the bundles differ in feature settings (layers, size, scale, weights): evaluate apart")
    base = models[0]
    h, w = base.config.height, base.config.width
    samples = datasets.read_test_set(data_dir)
    maps = [np.empty((len(samples), h, w), np.float32) for _ in models]
    scores = [np.empty(len(samples), np.float32) for _ in models]
    masks = np.zeros((len(samples), h, w), bool)
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        frames = np.stack([resize_to_model(read_image(s.path), h, w) for s in chunk])
        feats = base.extract(torch.from_numpy(frames))
        for i, model in enumerate(models):
            batch_maps, batch_scores = model.maps_from_features(feats)
            maps[i][start : start + len(chunk)] = batch_maps.float().numpy()
            scores[i][start : start + len(chunk)] = batch_scores.float().numpy()
        for j, sample in enumerate(chunk, start):
            if sample.mask_path is not None:
                masks[j] = read_mask(sample.mask_path, (h, w))
    types = np.array([s.defect_type for s in samples])
    return [metrics_by_type(maps[i], scores[i], masks, types, data_dir) for i in range(len(models))]


def curve(runs: list[Path], data_dirs: list[Path]) -> list[dict]:
    rows, models = [], []
    for run in runs:
        for path in bundles_of(run):
            t = bundle.read_metadata(path)["training"]
            rows.append(
                {
                    "run": run.name,
                    "bundle": str(path),
                    "final": path == run,
                    "epochs": t["epochs"],
                    "wall_min": t["train_seconds"] / 60,
                    "cpu_min": t["cpu_seconds"] / 60 if "cpu_seconds" in t else None,
                    "val_loss": t["best_val_loss"],
                    "settings": {k: t["settings"].get(k) for k in ("lr", "lr_schedule", "position_fraction")},
                    "sets": {},
                }
            )
            models.append(load_model(path))
    for data_dir in data_dirs:
        print(f"scoring {len(models)} bundles on {data_dir}", file=sys.stderr, flush=True)
        for row, result in zip(rows, score_set(models, data_dir)):
            row["sets"][str(data_dir)] = {
                **{k: result["overall"][k] for k in METRICS},
                "per_type": {name: r["pro_auc"] for name, r in result["per_type"].items()},
            }
    return rows


def markdown(rows: list[dict], data_dirs: list[Path]) -> str:
    head = ["run", "epochs", "wall min", "CPU min", "val loss"]
    for d in data_dirs:
        head += [f"{d.parent.name}/{d.name} {SHORT[k]}" for k in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        cpu = "" if r["cpu_min"] is None else f"{r['cpu_min']:.1f}"
        cells = [r["run"] + (" (final)" if r["final"] else ""), str(r["epochs"]), f"{r['wall_min']:.1f}", cpu]
        cells.append(f"{r['val_loss']:.4f}")
        for d in data_dirs:
            cells += [f"{r['sets'][str(d)][k]:.4f}" for k in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="training output folders (with snapshots/epoch-NNN)")
    p.add_argument("--data", action="append", type=Path, required=True, help="MVTec-layout category (repeatable)")
    p.add_argument("--json", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    rows = curve(args.runs, args.data)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(markdown(rows, args.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
