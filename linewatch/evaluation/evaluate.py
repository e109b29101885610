"""`linewatch eval`: exact pixel ROC-AUC, PRO-AUC and image ROC-AUC on an MVTec-layout category, per defect type.

Per defect type the metrics use that type's images plus all good test images (the MVTec convention); "overall" uses
every test image. Any object with the Scorer protocol (docs/DESIGN.md) can be evaluated, which is how the dev
benchmark runs its baseline through exactly the same code.

A category without ground_truth/ (OK/NOK photos, no masks) is image-level: pixel metrics are n/a. With a
calibration, every image is also judged by the daemon's own rule (linewatch.line.verdict.judge), so the false
rejects and escapes reported are the ones the line would have at those thresholds.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import cv2
import numpy as np

from linewatch import bundle
from linewatch.errors import BundleError, DataError
from linewatch.evaluation import datasets, metrics
from linewatch.evaluation.overlay import display_range, grid, overlay
from linewatch.feedback import KINDS as FEEDBACK_KINDS
from linewatch.images import check_images, read_image, read_mask, resize_to_model

if TYPE_CHECKING:
    from linewatch.calibrate.store import Calibration

log = logging.getLogger("linewatch.evaluation.evaluate")

METRICS = ("pixel_roc_auc", "pro_auc", "image_roc_auc")
GRID_FILE = "grid.png"
HISTOGRAM_FILE, ROC_FILE = "scores.png", "roc.png"
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
    pixel: bool = True,
) -> dict:
    """Metrics of one set; pixel metrics are None ("n/a") for an image-level set (no masks)."""
    return {
        "pixel_roc_auc": metrics.pixel_roc_auc(maps, masks) if pixel else None,
        "pro_auc": metrics.pro_auc(maps, masks, fpr_limit) if pixel else None,
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
    pixel: bool = True,
    image_only: frozenset[str] = frozenset(),
) -> dict:
    """{"overall", "per_type"} metric sets; each defect type is judged against all good images. Types in
    `image_only` (added without masks, e.g. missed defects from the line) get image metrics only, and stay out of
    the overall pixel metrics, where their unmarked defect pixels would count as normal ones."""
    anomalous = types != datasets.GOOD
    masked = ~np.isin(types, sorted(image_only))
    if pixel and not masks[anomalous & masked].any():
        raise DataError(f"all ground-truth masks in {Path(data_dir) / 'ground_truth'} are empty")
    per_type = {}
    for name in sorted(set(types[anomalous].tolist())):
        keep = (types == name) | ~anomalous
        type_pixel = pixel and name not in image_only
        if type_pixel and not masks[types == name].any():
            raise DataError(f"all ground-truth masks of defect type {name!r} in {data_dir} are empty")
        per_type[name] = metric_set(maps[keep], scores[keep], masks[keep], anomalous[keep], fpr_limit, type_pixel)
    overall = metric_set(maps, scores, masks, anomalous, fpr_limit, pixel and not image_only)
    if pixel and image_only:
        masked_set = metric_set(maps[masked], scores[masked], masks[masked], anomalous[masked], fpr_limit, True)
        overall["pixel_roc_auc"], overall["pro_auc"] = masked_set["pixel_roc_auc"], masked_set["pro_auc"]
    return {"overall": overall, "per_type": per_type}


def judged_nok(maps: np.ndarray, scores: np.ndarray, calibration: Calibration) -> np.ndarray:
    """NOK per image by the daemon's own verdict rule at the calibration's thresholds."""
    from linewatch.line.verdict import judge
    from linewatch.protocol.wire import Verdict

    return np.array([judge(m, float(s), calibration).verdict == Verdict.NOK for m, s in zip(maps, scores)], bool)


def confusion(nok: np.ndarray, types: np.ndarray, calibration: Calibration) -> dict:
    """False rejects (good judged NOK) and escapes (defective judged OK), overall and per defect type."""
    good = types == datasets.GOOD
    n_good, n_defect = int(good.sum()), int((~good).sum())
    false_rejects, escapes = int(nok[good].sum()), int((~nok[~good]).sum())
    per_type = {}
    for name in sorted(set(types[~good].tolist())):
        judged = nok[types == name]
        per_type[name] = {"images": int(judged.size), "nok": int(judged.sum()), "escapes": int((~judged).sum())}
    return {
        "calibration_version": int(calibration.version),
        "pixel_threshold": calibration.pixel_threshold,
        "image_threshold": calibration.image_threshold,
        "min_defect_area": calibration.min_defect_area,
        "n_good": n_good,
        "false_rejects": false_rejects,
        "false_reject_rate": false_rejects / n_good,
        "n_defect": n_defect,
        "escapes": escapes,
        "escape_rate": escapes / n_defect,
        "per_type": per_type,
    }


def evaluate_scorer(
    scorer: Scorer,
    data_dir: str | Path,
    batch: int = 8,
    progress: bool = False,
    overlays_dir: str | Path | None = None,
    fpr_limit: float = metrics.PRO_FPR_LIMIT,
    calibration: Calibration | None = None,
    plots_dir: str | Path | None = None,
    feedback: str | Path | None = None,
) -> dict:
    """Metrics per defect type and overall for `scorer` on the MVTec-layout category `data_dir`; with a
    calibration also the verdicts (false rejects, escapes) at its thresholds. `feedback`: a feedback folder whose
    missed defects join the set as defect type "missed_defect" (image metrics only)."""
    samples = datasets.read_test_set(data_dir)
    if feedback is not None:
        samples = datasets.with_missed_defects(samples, feedback)
    pixel = not datasets.is_image_level(samples)
    check_images([s.path for s in samples] + [s.mask_path for s in samples if s.mask_path], f"files in {data_dir}")
    maps, scores, masks = score_samples(scorer, samples, batch, progress)
    types = np.array([s.defect_type for s in samples])
    image_only = frozenset(s.defect_type for s in samples if s.is_anomalous and s.mask_path is None and pixel)
    table = metrics_by_type(maps, scores, masks, types, data_dir, fpr_limit, pixel, image_only)
    result = {
        "data": str(data_dir),
        "level": "pixel" if pixel else "image",
        "input_size": [int(v) for v in scorer.input_size],
        "pro_fpr_limit": fpr_limit,
        **table,
        "verdicts": None,
    }
    if calibration is not None:
        result["verdicts"] = confusion(judged_nok(maps, scores, calibration), types, calibration)
    if overlays_dir is not None:
        result["overlays"] = write_overlays(Path(overlays_dir), samples, maps, masks, types != datasets.GOOD)
    if plots_dir is not None:
        result["plots"] = write_plots(Path(plots_dir), scores, types, calibration, result["verdicts"])
    corrections = [s.feedback for s in samples if s.feedback is not None]
    if corrections:
        result["feedback"] = {
            "folder": str(Path(feedback if feedback is not None else data_dir).resolve()),
            **{kind: sum(e.kind == kind for e in corrections) for kind in FEEDBACK_KINDS},
            "files": [{"file": e.relative, "sha256": e.sha256, "kind": e.kind} for e in corrections],
        }
    return result


def mark_feedback_used(result: dict, model: str | Path) -> None:
    """Record the missed defects this evaluation used in the feedback folder's used.json (the dashboard's count of
    corrections waiting then drops); a folder that cannot record it only costs a warning, never the result."""
    from linewatch.feedback import MISSED_DEFECT, FeedbackError, entries, mark_used

    info = result.get("feedback")
    if not info or not info[MISSED_DEFECT]:
        return
    evaluated = {(f["file"], f["sha256"]) for f in info["files"] if f["kind"] == MISSED_DEFECT}
    try:
        folder = Path(info["folder"])
        used = [e for e in entries(folder, MISSED_DEFECT) if (e.relative, e.sha256) in evaluated]
        mark_used(folder, used, by="eval", target=str(Path(model).resolve()))
    except FeedbackError as exc:
        log.warning("the missed defects were evaluated but not marked used: %s", exc)


def write_plots(
    out_dir: Path, scores: np.ndarray, types: np.ndarray, calibration: Calibration | None, verdicts: dict | None
) -> dict:
    """scores.png (image scores of good and each defect type, thresholds drawn) and roc.png (image ROC, overall
    and per type, with the calibrated operating point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    anomalous = types != datasets.GOOD
    names = [datasets.GOOD, *sorted(set(types[anomalous].tolist()))]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bins = np.linspace(float(scores.min()), float(scores.max()), 40)
    if calibration is not None:
        bins = np.linspace(min(bins[0], calibration.pixel_threshold), max(bins[-1], calibration.pixel_threshold), 40)
    for name in names:
        ax.hist(scores[types == name], bins=bins, histtype="step", lw=2 if name == datasets.GOOD else 1, label=name)
    if calibration is not None:
        ax.axvline(
            calibration.pixel_threshold,
            color="k",
            ls="--",
            label=f"pixel threshold {calibration.pixel_threshold:.4g} (a NOK part scores above it)",
        )
        if calibration.image_threshold is not None:
            ax.axvline(
                calibration.image_threshold, color="k", label=f"image threshold {calibration.image_threshold:.4g}"
            )
    ax.set_xlabel("image score (max of the anomaly map)")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    hist_path = out_dir / HISTOGRAM_FILE
    fig.savefig(hist_path, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    fpr, tpr = metrics.roc_curve(scores, anomalous, "image ROC")
    ax.plot(fpr, tpr, lw=2, label=f"all defects (AUC {metrics.roc_auc(scores, anomalous):.4f})")
    for name in names[1:]:
        keep = (types == name) | ~anomalous
        f, t = metrics.roc_curve(scores[keep], anomalous[keep], f"image ROC {name}")
        ax.plot(f, t, lw=1, label=name)
    if verdicts is not None:
        ax.plot(
            verdicts["false_reject_rate"],
            1 - verdicts["escape_rate"],
            "ko",
            label=f"calibration v{verdicts['calibration_version']} (daemon verdicts)",
        )
    ax.plot([0, 1], [0, 1], color="0.7", ls=":")
    ax.set_xlabel("false reject rate (good parts judged NOK)")
    ax.set_ylabel("detection rate (defective parts judged NOK)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    roc_path = out_dir / ROC_FILE
    fig.savefig(roc_path, dpi=100)
    plt.close(fig)
    return {"histogram": str(hist_path), "roc": str(roc_path)}


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
        picture = overlay(image, maps[i], vmin, vmax, masks[i] if s.mask_path is not None else None)
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


def _cell(value: float | None) -> str:
    return f"{'n/a':>9}" if value is None else f"{value:>9.4f}"


def format_table(result: dict) -> str:
    rows = [(name, m) for name, m in result["per_type"].items()] + [("overall", result["overall"])]
    verdicts = result.get("verdicts")
    width = max(12, *(len(name) for name, _ in rows))
    head = f"{'defect type':<{width}}  {'images':>6}  {'pixel AUC':>9}  {'PRO-AUC':>9}  {'image AUC':>9}"
    lines = [head + (f"  {'NOK':>6}  {'escapes':>7}" if verdicts else "")]
    for name, m in rows:
        line = (
            f"{name:<{width}}  {m['n_defect']:>6}  {_cell(m['pixel_roc_auc'])}  {_cell(m['pro_auc'])}  "
            f"{_cell(m['image_roc_auc'])}"
        )
        if verdicts:
            counts = verdicts["per_type"].get(name) or {"nok": verdicts["n_defect"] - verdicts["escapes"]}
            escapes = verdicts["per_type"][name]["escapes"] if name in verdicts["per_type"] else verdicts["escapes"]
            line += f"  {counts['nok']:>6}  {escapes:>7}"
        lines.append(line)
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    if verdicts:
        v = verdicts
        lines.append(
            f"calibration v{v['calibration_version']} (daemon verdicts): false rejects {v['false_rejects']} of "
            f"{v['n_good']} good ({100 * v['false_reject_rate']:.1f} %), escapes {v['escapes']} of {v['n_defect']} "
            f"defective ({100 * v['escape_rate']:.1f} %)"
        )
    return "\n".join(lines)


def write_json(result: dict, target: str) -> None:
    text = json.dumps(result, indent=2) + "\n"
    if target == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        bundle.atomic_write_bytes(target, text.encode())


def eval_calibration(model: str | Path, given: str | None, backend: str, precision: str) -> Calibration | None:
    """--calibration FILE (checked against the graph that scores), else the bundle's calibration.json when the
    ONNX graph it was set with scores; None (with a note) when there is none to use."""
    from linewatch.calibrate.store import bundle_graph, read_calibration_file

    if given is None and not (Path(model) / bundle.CALIBRATION).is_file():
        return None
    if backend != "onnx":
        if given is not None:
            raise BundleError("--calibration needs the ONNX graph its thresholds were set with (--backend onnx)")
        log.warning("torch backend: verdicts at the calibrated thresholds need the ONNX graph (--backend onnx)")
        return None
    sha, graph = bundle_graph(model, precision)
    if given is not None:
        return read_calibration_file(given, sha, precision, graph)
    try:
        return read_calibration_file(Path(model) / bundle.CALIBRATION, sha, precision, graph)
    except BundleError as exc:
        log.warning("no verdicts at calibrated thresholds: %s", exc)
        return None


def cli_eval(args) -> int:
    scorer, backend = load_scorer(args.model, args.backend, args.precision)
    calibration = eval_calibration(args.model, getattr(args, "calibration", None), backend, args.precision)
    t0 = time.perf_counter()
    result = evaluate_scorer(
        scorer,
        args.data,
        progress=True,
        overlays_dir=args.overlays,
        calibration=calibration,
        plots_dir=getattr(args, "plots", None),
        feedback=getattr(args, "feedback", None),
    )
    meta = bundle.read_metadata(args.model)
    if "feedback" in result:  # false rejects the model was trained on say little about its false-reject rate
        trained = {f["sha256"] for f in (meta.get("training") or {}).get("feedback", {}).get("files", [])}
        result["feedback"]["false_reject_trained_on"] = sum(
            f["kind"] == "false_reject" and f["sha256"] in trained for f in result["feedback"]["files"]
        )
    result = {
        "model": str(args.model),
        "backend": backend,
        "precision": args.precision,
        "model_id": bundle.model_id(meta),
        "seconds": round(time.perf_counter() - t0, 3),
        **result,
    }
    label = backend if backend == "torch" else f"{backend} {args.precision}"
    level = f"PRO to FPR {result['pro_fpr_limit']}" if result["level"] == "pixel" else "image-level: no masks"
    print(
        f"{args.data} ({label}, {result['overall']['n_defect']} defect + {result['overall']['n_good']} good "
        f"images, {level})\n{format_table(result)}",
        file=sys.stderr,
    )
    if "feedback" in result:
        fb = result["feedback"]
        print(
            f"feedback {fb['folder']}: {fb['missed_defect']} missed defect(s) as defect type missed_defect"
            + (
                f", {fb['false_reject']} false reject(s) as good ({fb['false_reject_trained_on']} of them in the "
                f"model's training images)"
                if fb["false_reject"]
                else ""
            ),
            file=sys.stderr,
        )
    if "plots" in result:
        print(f"plots: {result['plots']['histogram']}, {result['plots']['roc']}", file=sys.stderr)
    if args.overlays:
        print(f"overlays: {result['overlays']['dir']} (grid: {result['overlays']['grid']})", file=sys.stderr)
    if args.json:
        write_json(result, args.json)
    mark_feedback_used(result, args.model)
    return 0
