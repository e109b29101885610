"""`linewatch eval`: exact pixel ROC-AUC, PRO-AUC and image ROC-AUC on an MVTec-layout category, per defect type.

Per defect type the metrics use that type's images plus all good test images (the MVTec convention); "overall" uses
every test image. Any object with the Scorer protocol (docs/DESIGN.md) can be evaluated, which is how the dev
benchmark runs its baseline through exactly the same code.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from linewatch import bundle
from linewatch.errors import BundleError, DataError
from linewatch.evaluation import datasets, metrics
from linewatch.evaluation.overlay import display_range, grid, overlay
from linewatch.images import check_images, read_image, read_mask, resize_to_model

log = logging.getLogger("linewatch.evaluation.evaluate")

METRICS = ("pixel_roc_auc", "pro_auc", "image_roc_auc")
GRID_FILE = "grid.png"
GRID_MAX_TILES = 64
OVERLAY_MIN_SIZE = 256  # small model inputs are enlarged for viewing, so outlines stay thin relative to defects


class Scorer(Protocol):
    input_size: tuple[int, int]

    def score(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def load_scorer(bundle_dir: str | Path, backend: str = "auto", precision: str = "fp32"):
    """The bundle's exported ONNX graph (Engine) or its torch model (TorchScorer; imports torch only here)."""
    bundle_dir = Path(bundle_dir)
    if backend == "auto":
        backend = "onnx" if "graph" in bundle.read_metadata(bundle_dir) or precision != "fp32" else "torch"
    if backend == "onnx":
        from linewatch.line.engine import Engine

        return Engine(bundle_dir, precision=precision), "onnx"
    if precision != "fp32":
        raise BundleError(f"--precision {precision} needs the exported graph (--backend onnx), not the torch model")
    if backend == "torch":
        from linewatch.training.model import TorchScorer

        return TorchScorer.from_bundle(bundle_dir), "torch"
    raise BundleError(f"unknown backend {backend!r} (auto, onnx, torch)")


def score_samples(
    scorer: Scorer, samples: list[datasets.Sample], batch: int = 8, progress: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(maps N×H×W float32, image scores N, masks N×H×W bool) at the model's input size."""
    h, w = (int(v) for v in scorer.input_size)
    maps = np.empty((len(samples), h, w), np.float32)
    scores = np.empty(len(samples), np.float32)
    masks = np.zeros((len(samples), h, w), bool)
    from tqdm import tqdm

    with tqdm(total=len(samples), desc="eval", unit="img", file=sys.stderr, disable=not progress) as bar:
        for start in range(0, len(samples), batch):
            chunk = samples[start : start + batch]
            frames = np.stack([resize_to_model(read_image(s.path), h, w) for s in chunk])
            batch_maps, batch_scores = scorer.score(frames)
            batch_maps, batch_scores = np.asarray(batch_maps), np.asarray(batch_scores)
            if batch_maps.shape != (len(chunk), h, w) or batch_scores.shape != (len(chunk),):
                raise BundleError(
                    f"scorer returned maps {batch_maps.shape} and scores {batch_scores.shape} for "
                    f"{len(chunk)} frames of {h}x{w} (expected N×H×W and N)"
                )
            maps[start : start + len(chunk)] = batch_maps
            scores[start : start + len(chunk)] = batch_scores
            for i, s in enumerate(chunk, start):
                if s.mask_path is not None:
                    masks[i] = read_mask(s.mask_path, (h, w))
            bar.update(len(chunk))
    bad = ~np.isfinite(scores) | ~np.isfinite(maps).all(axis=(1, 2))
    if bad.any():
        raise DataError(
            f"the model produced NaN/inf scores for {int(bad.sum())} image(s), "
            f"first {samples[int(np.argmax(bad))].path}"
        )
    return maps, scores, masks


def metric_set(
    maps: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray,
    anomalous: np.ndarray,
    fpr_limit: float = metrics.PRO_FPR_LIMIT,
) -> dict:
    return {
        "pixel_roc_auc": metrics.pixel_roc_auc(maps, masks),
        "pro_auc": metrics.pro_auc(maps, masks, fpr_limit),
        "image_roc_auc": metrics.image_roc_auc(scores, anomalous),
        "n_defect": int(anomalous.sum()),
        "n_good": int((~anomalous).sum()),
    }


def metrics_by_type(
    maps: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray,
    types: np.ndarray,
    data_dir: str | Path,
    fpr_limit: float = metrics.PRO_FPR_LIMIT,
) -> dict:
    """{"overall", "per_type"} metric sets; each defect type is judged against all good images."""
    anomalous = types != datasets.GOOD
    if not masks[anomalous].any():
        raise DataError(f"all ground-truth masks in {Path(data_dir) / 'ground_truth'} are empty")
    per_type = {}
    for name in sorted(set(types[anomalous].tolist())):
        keep = (types == name) | ~anomalous
        if not masks[types == name].any():
            raise DataError(f"all ground-truth masks of defect type {name!r} in {data_dir} are empty")
        per_type[name] = metric_set(maps[keep], scores[keep], masks[keep], anomalous[keep], fpr_limit)
    return {"overall": metric_set(maps, scores, masks, anomalous, fpr_limit), "per_type": per_type}


def evaluate_scorer(
    scorer: Scorer,
    data_dir: str | Path,
    batch: int = 8,
    progress: bool = False,
    overlays_dir: str | Path | None = None,
    fpr_limit: float = metrics.PRO_FPR_LIMIT,
) -> dict:
    """Metrics per defect type and overall for `scorer` on the MVTec-layout category `data_dir`."""
    samples = datasets.read_test_set(data_dir)
    check_images([s.path for s in samples] + [s.mask_path for s in samples if s.mask_path], f"files in {data_dir}")
    maps, scores, masks = score_samples(scorer, samples, batch, progress)
    types = np.array([s.defect_type for s in samples])
    table = metrics_by_type(maps, scores, masks, types, data_dir, fpr_limit)
    result = {
        "data": str(data_dir),
        "input_size": [int(v) for v in scorer.input_size],
        "pro_fpr_limit": fpr_limit,
        **table,
    }
    if overlays_dir is not None:
        result["overlays"] = write_overlays(Path(overlays_dir), samples, maps, masks, types != datasets.GOOD)
    return result


def write_overlays(
    out_dir: Path, samples: list[datasets.Sample], maps: np.ndarray, masks: np.ndarray, anomalous: np.ndarray
) -> dict:
    """A PNG per test image (<type>/<stem>.png, at least OVERLAY_MIN_SIZE px) and a grid of up to GRID_MAX_TILES,
    all on one colour range."""
    out_dir.mkdir(parents=True, exist_ok=True)
    vmin, vmax = display_range(maps[~anomalous], maps)
    h, w = maps.shape[1:]
    scale = max(1, -(-OVERLAY_MIN_SIZE // min(h, w)))
    tiles, labels = [], []
    step = max(1, -(-len(samples) // GRID_MAX_TILES))
    for i, s in enumerate(samples):
        image = resize_to_model(read_image(s.path), h, w)
        if scale > 1:
            image = cv2.resize(image, (w * scale, h * scale), interpolation=cv2.INTER_LINEAR)
        picture = overlay(image, maps[i], vmin, vmax, masks[i] if s.is_anomalous else None)
        path = out_dir / s.defect_type / f"{s.path.stem}.png"
        path.parent.mkdir(exist_ok=True)
        if not cv2.imwrite(str(path), picture):
            raise DataError(f"cannot write overlay {path}")
        if i % step == 0:
            tiles.append(picture)
            labels.append(f"{s.defect_type}/{s.path.stem}")
    grid_path = out_dir / GRID_FILE
    if not cv2.imwrite(str(grid_path), grid(tiles, labels)):
        raise DataError(f"cannot write overlay grid {grid_path}")
    return {"dir": str(out_dir), "grid": str(grid_path), "vmin": vmin, "vmax": vmax, "count": len(samples)}


def format_table(result: dict) -> str:
    rows = [(name, m) for name, m in result["per_type"].items()] + [("overall", result["overall"])]
    width = max(12, *(len(name) for name, _ in rows))
    lines = [f"{'defect type':<{width}}  {'images':>6}  {'pixel AUC':>9}  {'PRO-AUC':>9}  {'image AUC':>9}"]
    for name, m in rows:
        lines.append(
            f"{name:<{width}}  {m['n_defect']:>6}  {m['pixel_roc_auc']:>9.4f}  {m['pro_auc']:>9.4f}  "
            f"{m['image_roc_auc']:>9.4f}"
        )
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)


def write_json(result: dict, target: str) -> None:
    text = json.dumps(result, indent=2) + "\n"
    if target == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        bundle.atomic_write_bytes(target, text.encode())


def cli_eval(args) -> int:
    scorer, backend = load_scorer(args.model, args.backend, args.precision)
    t0 = time.perf_counter()
    result = evaluate_scorer(scorer, args.data, progress=True, overlays_dir=args.overlays)
    meta = bundle.read_metadata(args.model)
    result = {
        "model": str(args.model),
        "backend": backend,
        "precision": args.precision,
        "model_id": bundle.model_id(meta),
        "seconds": round(time.perf_counter() - t0, 3),
        **result,
    }
    label = backend if backend == "torch" else f"{backend} {args.precision}"
    print(
        f"{args.data} ({label}, {result['overall']['n_defect']} defect + {result['overall']['n_good']} good "
        f"images, PRO to FPR {result['pro_fpr_limit']})\n{format_table(result)}",
        file=sys.stderr,
    )
    if args.overlays:
        print(f"overlays: {result['overlays']['dir']} (grid: {result['overlays']['grid']})", file=sys.stderr)
    if args.json:
        write_json(result, args.json)
    return 0
