"""`linewatch calibrate`: thresholds from fresh good samples at a target false-positive rate, and its report.

Runs the bundle's ONNX graph (torch-free) over fresh good images or camera frames, sets the thresholds on a seeded
calibration split, checks the realised rates on the held-out split, writes the next calibration version atomically
and a report a person can read (plot, report.md, report.json; detection rate and PRO when defects are given).
"""

from __future__ import annotations

import argparse
import grp
import json
import logging
import pwd
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from linewatch import __version__, bundle
from linewatch.calibrate.store import (
    Calibration,
    current_version,
    graph_sha256,
    next_version,
    rollback,
    save_calibration,
)
from linewatch.calibrate.thresholds import (
    REGIONS_PER_IMAGE,
    RealisedRate,
    check_enough_samples,
    exceedance_rate,
    holdout_split,
    pixel_threshold_for_fpr,
    realised_image_fpr,
    realised_pixel_fpr,
)
from linewatch.errors import ConfigError, DataError, LinewatchError
from linewatch.images import list_images, load_for_model, read_mask, resize_to_model
from linewatch.line.verdict import judge
from linewatch.protocol.wire import Verdict

if TYPE_CHECKING:
    from linewatch.line.engine import Engine

log = logging.getLogger("linewatch.calibrate.command")

SEED = 0
CONFIDENCE = 0.95
BATCH = 8
MAX_OVERLAYS = 6
REPORT_DIR = "calibration_report"
DAEMON_USER = "linewatch"  # the account systemd/linewatch.service runs the daemon as
READ_BITS = (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)  # owner, group, other
SEARCH_BITS = (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)


# --- inputs ---------------------------------------------------------------------------------------------------


def check_args(args: argparse.Namespace) -> None:
    daemon_user(args)  # an unknown --daemon-user is a usage error before any work is done
    if args.rollback:
        return
    if bool(args.good) == bool(args.camera):
        raise ConfigError("give exactly one source of good samples: --good DIR or --camera NAME (with --config)")
    if args.camera and not args.config:
        raise ConfigError("--camera needs --config (the daemon config that defines the camera)")
    if args.camera and args.frames < 1:
        raise ConfigError(f"--frames must be >= 1, got {args.frames}")
    if not (0.0 <= args.fpr < 1.0):
        raise ConfigError(f"--fpr must be in [0, 1), got {args.fpr}")
    if args.image_fpr is not None and not (0.0 <= args.image_fpr < 1.0):
        raise ConfigError(f"--image-fpr must be in [0, 1), got {args.image_fpr}")
    if args.min_defect_area < 0:
        raise ConfigError(f"--min-defect-area must be >= 0, got {args.min_defect_area}")
    if not (0.0 <= args.holdout <= 0.9):
        raise ConfigError(f"--holdout must be in [0, 0.9], got {args.holdout}")


def daemon_user(args: argparse.Namespace) -> pwd.struct_passwd | None:
    """The account the daemon runs as: --daemon-user, else DAEMON_USER when that account exists, else None."""
    name = getattr(args, "daemon_user", None)
    try:
        return pwd.getpwnam(name or DAEMON_USER)
    except KeyError:
        if name:
            raise ConfigError(f"--daemon-user {name}: no such user on this machine") from None
        return None


def unreadable_by(path: Path, user: pwd.struct_passwd) -> str | None:
    """Why `user` could not read `path` (a folder on the way it may not enter, or the file's own mode), or None.

    Judged from owner, group and other bits and the user's groups (`pwd`/`grp`); ACLs are not consulted."""
    if user.pw_uid == 0:
        return None
    groups = {user.pw_gid} | {g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem}
    path = path.absolute()
    steps = [(folder, SEARCH_BITS, "enter") for folder in reversed(path.parents)] + [(path, READ_BITS, "read")]
    for target, bits, what in steps:
        try:
            st = target.stat()
        except OSError as exc:
            return f"cannot check {target}: {exc}"
        bit = bits[0] if st.st_uid == user.pw_uid else bits[1] if st.st_gid in groups else bits[2]
        if not st.st_mode & bit:
            return (
                f"user {user.pw_name} cannot {what} {target} "
                f"({stat.filemode(st.st_mode)} {owner_name(st.st_uid)}:{group_name(st.st_gid)})"
            )
    return None


def owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def warn_if_daemon_cannot_read(path: Path, args: argparse.Namespace) -> str | None:
    """Warn (and return the reason) when the daemon's user could not read the calibration just written: the next
    reload would be refused and, after a restart, every result would be ERROR."""
    user = daemon_user(args)
    if user is None:
        log.debug("no %r user on this machine and no --daemon-user: not checking who can read %s", DAEMON_USER, path)
        return None
    reason = unreadable_by(path, user)
    if reason:
        log.warning(
            "%s: the daemon (user %s) could not load this calibration: %s. Fix the permissions (e.g. chown or "
            "chmod o+r) before reloading; pass --daemon-user if the daemon runs as another user",
            path,
            user.pw_name,
            reason,
        )
    return reason


def good_frames(args: argparse.Namespace, size: tuple[int, int]) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """(frames N×H×W×3 at model size, their names, settings describing the source)."""
    h, w = size
    if args.good:
        files = list_images(args.good)
        frames = np.stack([load_for_model(p, h, w) for p in files])
        return frames, [p.name for p in files], {"source_kind": "folder", "source": str(Path(args.good).resolve())}
    from linewatch.line.cameras import grab_frames

    grabbed = grab_frames(args.config, args.camera, args.frames)
    frames = np.stack([resize_to_model(f, h, w) for f in grabbed])
    names = [f"{args.camera}_{i:05d}" for i in range(len(grabbed))]
    return (
        frames,
        names,
        {
            "source_kind": "camera",
            "source": args.camera,
            "config": str(Path(args.config).resolve()),
            "frames": args.frames,
        },
    )


def score_frames(engine: Engine, frames: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    from tqdm import tqdm

    map_batches: list[np.ndarray] = []
    score_batches: list[np.ndarray] = []
    with tqdm(total=len(frames), desc=f"scoring {what}", unit="img", file=sys.stderr, leave=False) as bar:
        for start in range(0, len(frames), BATCH):
            m, s = engine.score(frames[start : start + BATCH])
            map_batches.append(m)
            score_batches.append(s)
            bar.update(len(m))
    maps, scores = np.concatenate(map_batches), np.concatenate(score_batches)
    bad = ~np.isfinite(maps).all(axis=(1, 2)) | ~np.isfinite(scores)
    if bad.any():
        raise LinewatchError(
            f"the model produced non-finite scores for {int(bad.sum())} of {len(frames)} {what} "
            f"image(s) (first at index {int(np.argmax(bad))}); cannot calibrate on them"
        )
    return maps, scores


# --- thresholds -------------------------------------------------------------------------------------------------


@dataclass
class Thresholds:
    pixel: float
    image: float | None
    calib_idx: np.ndarray
    hold_idx: np.ndarray
    calib_pixel_fpr: float
    calib_image_fpr: float | None
    hold_pixel: RealisedRate | None
    hold_image: RealisedRate | None
    warnings: list[str]


def set_thresholds(
    maps: np.ndarray,
    scores: np.ndarray,
    fpr: float,
    image_fpr: float | None,
    holdout: float,
    seed: int = SEED,
    regions_per_image: int = REGIONS_PER_IMAGE,
) -> Thresholds:
    """Thresholds on the calibration split, realised rates (with bounds) on the holdout split."""
    calib, hold = holdout_split(len(maps), holdout, seed)
    try:
        check_enough_samples(len(calib), fpr, "pixel", regions_per_image)
        if image_fpr is not None:
            check_enough_samples(len(calib), image_fpr, "image-score", 1)
    except ValueError as exc:
        raise ConfigError(f"{exc} ({len(maps)} images, {len(hold)} held out)") from exc
    if holdout > 0 and len(hold) == 0:
        raise ConfigError(f"--holdout {holdout:g} leaves no held-out image out of {len(maps)}; give more images")
    pixel = pixel_threshold_for_fpr(maps[calib], fpr)
    image = None if image_fpr is None else pixel_threshold_for_fpr(scores[calib], image_fpr)
    warnings: list[str] = []
    hold_pixel = hold_image = None
    if len(hold):
        hold_pixel = realised_pixel_fpr(maps[hold], pixel, CONFIDENCE)
        if hold_pixel.misses(fpr):
            warnings.append(miss_message("pixel", fpr, hold_pixel))
        if image is not None and image_fpr is not None:  # image is set exactly when image_fpr is
            hold_image = realised_image_fpr(scores[hold], image, CONFIDENCE)
            if hold_image.misses(image_fpr):
                warnings.append(miss_message("image", image_fpr, hold_image))
    else:
        warnings.append("no holdout (--holdout 0): the false-positive rate on unseen good parts is not checked")
    return Thresholds(
        pixel,
        image,
        calib,
        hold,
        exceedance_rate(maps[calib], pixel),
        None if image is None else exceedance_rate(scores[calib], image),
        hold_pixel,
        hold_image,
        warnings,
    )


def miss_message(what: str, target: float, rate: RealisedRate) -> str:
    side = (
        "MORE false alarms than asked: the calibration images do not represent the held-out ones (drift within "
        "the batch, too few or too similar images)"
        if rate.lower > target
        else "fewer false alarms than asked (less sensitive than intended: ties or too few images)"
    )
    return (
        f"{what} FPR target {target:g} is outside the {rate.confidence:.0%} interval of the realised rate on "
        f"held-out good images: {rate.rate:.3g} [{rate.lower:.3g}, {rate.upper:.3g}]: {side}"
    )


# --- defects (MVTec layout) ---------------------------------------------------------------------------------------

# One defect type's counts: images, nok, regions (ground-truth regions) and overlap_sum (their summed coverage).
Tally = dict[str, float]


def defect_samples(root: str | Path) -> list[tuple[str, Path, Path | None]]:
    """(defect type, image, mask or None for 'good') from root/test/<type>/ and root/ground_truth/<type>/."""
    root = Path(root)
    test = root / "test"
    if not test.is_dir():
        raise DataError(f"--defects {root}: expected MVTec layout with {test}/<defect type>/ folders")
    samples = []
    for type_dir in sorted(p for p in test.iterdir() if p.is_dir()):
        for image in list_images(type_dir):
            mask = None
            if type_dir.name != "good":
                mask = root / "ground_truth" / type_dir.name / f"{image.stem}_mask.png"
                if not mask.is_file():
                    raise DataError(f"no ground-truth mask for {image}: expected {mask}")
            samples.append((type_dir.name, image, mask))
    if not samples:
        raise DataError(f"--defects {root}: no images under {test}")
    return samples


def region_overlaps(pred: np.ndarray, truth: np.ndarray) -> list[float]:
    """Per ground-truth region (8-connected): fraction of its pixels the prediction covers."""
    n, labels = cv2.connectedComponents(truth.astype(np.uint8), connectivity=8)
    if n <= 1:
        return []
    covered = np.bincount(labels[pred], minlength=n)[1:]
    sizes = np.bincount(labels.ravel(), minlength=n)[1:]
    return list((covered / sizes).astype(float))


def overlay_image(frame: np.ndarray, amap: np.ndarray, threshold: float, truth: np.ndarray | None) -> np.ndarray:
    """Heat map blended over the frame, predicted regions outlined red, ground truth green."""
    scale = max(float(amap.max()), threshold * 2, 1e-12)
    heat = cv2.applyColorMap(np.clip(amap / scale * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    out = cv2.addWeighted(frame, 0.6, heat, 0.4, 0)
    if truth is not None:
        contours, _ = cv2.findContours(truth.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (0, 255, 0), 1)
    contours, _ = cv2.findContours((amap > threshold).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (0, 0, 255), 1)
    return out


def evaluate_defects(
    engine: Engine, root: str | Path, cal: Calibration, report_dir: Path
) -> tuple[dict[str, Any], np.ndarray]:
    """Detection rate, PRO at the chosen threshold and good-image reject rate; writes a few overlays."""
    h, w = engine.input_size
    samples = defect_samples(root)
    frames = np.stack([load_for_model(p, h, w) for _, p, _ in samples])
    maps, scores = score_frames(engine, frames, "defect samples")
    per_type: dict[str, Tally] = {}
    overlaps: list[float] = []
    defect_pixels: list[np.ndarray] = []
    overlays: list[str] = []
    for i, (kind, image, mask_path) in enumerate(samples):
        verdict = judge(maps[i], scores[i], cal).verdict
        truth = None if mask_path is None else read_mask(mask_path, (h, w))
        tally = per_type.setdefault(kind, {"images": 0, "nok": 0, "regions": 0, "overlap_sum": 0.0})
        overlaps += tally_sample(tally, verdict == Verdict.NOK, maps[i], cal.pixel_threshold, truth)
        if truth is not None:
            defect_pixels.append(maps[i][truth])
        if len(overlays) < MAX_OVERLAYS and (truth is not None or kind == "good"):
            name = f"overlay_{kind}_{image.stem}_{verdict}.png"
            cv2.imwrite(str(report_dir / name), overlay_image(frames[i], maps[i], cal.pixel_threshold, truth))
            overlays.append(name)
    result = defect_summary(root, per_type, overlaps, overlays)
    return result, (np.concatenate(defect_pixels) if defect_pixels else np.empty(0, np.float32))


def tally_sample(tally: Tally, nok: bool, amap: np.ndarray, threshold: float, truth: np.ndarray | None) -> list[float]:
    """Count one image into its type's tally; returns the overlaps of its ground-truth regions (none if good)."""
    tally["images"] += 1
    tally["nok"] += nok
    if truth is None:
        return []
    ov = region_overlaps(amap > threshold, truth)
    tally["regions"] += len(ov)
    tally["overlap_sum"] += float(sum(ov))
    return ov


def defect_summary(
    root: str | Path, per_type: dict[str, Tally], overlaps: list[float], overlays: list[str]
) -> dict[str, Any]:
    """The report's `defects` section from the per-type tallies; rates are None where nothing was counted."""
    defect_types = {k: v for k, v in per_type.items() if k != "good"}
    n_def = sum(v["images"] for v in defect_types.values())
    return {
        "root": str(Path(root).resolve()),
        "defect_images": n_def,
        "detection_rate": sum(v["nok"] for v in defect_types.values()) / n_def if n_def else None,
        "pro_at_threshold": float(np.mean(overlaps)) if overlaps else None,
        "gt_regions": len(overlaps),
        "per_type": {
            k: {
                "images": v["images"],
                "nok_rate": v["nok"] / v["images"],
                "pro_at_threshold": v["overlap_sum"] / v["regions"] if v["regions"] else None,
            }
            for k, v in per_type.items()
        },
        "good_images": per_type.get("good", {}).get("images", 0),
        "good_reject_rate": per_type["good"]["nok"] / per_type["good"]["images"] if "good" in per_type else None,
        "overlays": overlays,
    }


# --- report ---------------------------------------------------------------------------------------------------


def plot_distributions(
    path: Path, maps: np.ndarray, scores: np.ndarray, th: Thresholds, cal: Calibration, defect_pixels: np.ndarray | None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_px, ax_img) = plt.subplots(1, 2, figsize=(12, 4.5))
    parts = [(maps[th.calib_idx].ravel(), "good pixels (calibration)", "tab:blue")]
    if len(th.hold_idx):
        parts.append((maps[th.hold_idx].ravel(), "good pixels (held out)", "tab:green"))
    if defect_pixels is not None and defect_pixels.size:
        parts.append((defect_pixels.ravel(), "defect pixels (in masks)", "tab:red"))
    hi = max(max(float(p.max()) for p, _, _ in parts), cal.pixel_threshold) * 1.05 or 1.0
    bins = np.linspace(min(float(p.min()) for p, _, _ in parts), hi, 120)
    for values, label, colour in parts:
        ax_px.hist(values, bins=bins, histtype="step", color=colour, label=label, density=True)
    ax_px.axvline(
        cal.pixel_threshold,
        color="k",
        ls="--",
        label=f"pixel threshold {cal.pixel_threshold:.4g} (target FPR {cal.fpr_target:g})",
    )
    ax_px.set_yscale("log")
    ax_px.set_xlabel("anomaly map value")
    ax_px.set_ylabel("density (log)")
    ax_px.set_title("pixel scores")
    ax_px.legend(fontsize=8)

    ax_img.hist(scores[th.calib_idx], bins=30, alpha=0.6, color="tab:blue", label="calibration images")
    if len(th.hold_idx):
        ax_img.hist(scores[th.hold_idx], bins=30, alpha=0.6, color="tab:green", label="held-out images")
    if cal.image_threshold is not None:
        ax_img.axvline(
            cal.image_threshold,
            color="k",
            ls="--",
            label=f"image threshold {cal.image_threshold:.4g} (target {cal.image_fpr_target:g})",
        )
    ax_img.set_xlabel("image score (max of map)")
    ax_img.set_ylabel("images")
    ax_img.set_title("image scores of good samples")
    ax_img.legend(fontsize=8)
    fig.suptitle(f"calibration v{cal.version}, model {cal.model_sha256[:12]}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _rate_line(name: str, target: float | None, calib: float | None, rate: RealisedRate | None) -> str:
    held = (
        "not checked (no holdout)"
        if rate is None
        else (
            f"{rate.rate:.4g}, {rate.confidence:.0%} interval [{rate.lower:.4g}, {rate.upper:.4g}] "
            f"(effective n {rate.n_effective:.0f})"
        )
    )
    return f"| {name} | {target:g} | {calib:.4g} | {held} |"


def report_markdown(result: dict[str, Any], cal: Calibration, th: Thresholds) -> str:
    lines = [
        f"# Calibration v{cal.version}",
        "",
        f"- model: `{cal.model_sha256[:12]}`; created {cal.created}",
        f"- source: {cal.settings.get('source_kind')} `{cal.settings.get('source')}`; "
        f"{cal.n_samples} calibration + {cal.n_holdout} held-out images (seed {cal.settings.get('seed')})",
        f"- pixel threshold: **{cal.pixel_threshold:.6g}** (a pixel is anomalous when its score is strictly above)",
        f"- image threshold: **{'none' if cal.image_threshold is None else f'{cal.image_threshold:.6g}'}**",
        f"- min defect area: {cal.min_defect_area} px (a part is NOK when a region of >= "
        f"{max(1, cal.min_defect_area)} px is above the pixel threshold)",
        "",
        "| rate | target | on calibration split | realised on held-out good images |",
        "| --- | --- | --- | --- |",
        _rate_line("pixel FPR", cal.fpr_target, th.calib_pixel_fpr, th.hold_pixel),
    ]
    if cal.image_threshold is not None:
        lines.append(_rate_line("image FPR", cal.image_fpr_target, th.calib_image_fpr, th.hold_image))
    lines += ["", "![score distributions](distributions.png)", ""]
    if th.warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in th.warnings] + [""]
    defects = result.get("defects")
    if defects:
        rate = defects["detection_rate"]
        pro = defects["pro_at_threshold"]
        lines += [
            "## Defective samples",
            "",
            f"- detection rate (NOK verdicts on {defects['defect_images']} defective images): "
            f"{'n/a' if rate is None else f'{rate:.3f}'}",
            f"- PRO at the pixel threshold (mean overlap of {defects['gt_regions']} ground-truth regions): "
            f"{'n/a' if pro is None else f'{pro:.3f}'}",
        ]
        if defects["good_reject_rate"] is not None:
            lines.append(f"- good test images rejected: {defects['good_reject_rate']:.3f} of {defects['good_images']}")
        lines += ["", "| type | images | NOK rate | PRO at threshold |", "| --- | --- | --- | --- |"]
        for kind, v in defects["per_type"].items():
            pro_t = "n/a" if v["pro_at_threshold"] is None else f"{v['pro_at_threshold']:.3f}"
            lines.append(f"| {kind} | {v['images']} | {v['nok_rate']:.3f} | {pro_t} |")
        lines += [""] + [f"![{name}]({name})" for name in defects["overlays"]] + [""]
    return "\n".join(lines)


# --- command --------------------------------------------------------------------------------------------------


def _emit_json(target: str | None, result: dict[str, Any]) -> None:
    if not target:
        return
    text = json.dumps(result, indent=2)
    if target == "-":
        print(text)
    else:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(text + "\n")


def precision_for(args: argparse.Namespace) -> str:
    """--precision, else the daemon config's model.precision (thresholds must come from the graph that runs)."""
    if getattr(args, "precision", None):
        precision: str = args.precision
        return precision
    if getattr(args, "config", None):
        from linewatch.line.config import load_config

        configured: str = load_config(args.config).model.precision
        return configured
    return "fp32"


def cli_rollback(args: argparse.Namespace) -> int:
    cal = rollback(args.model, precision_for(args))
    warn_if_daemon_cannot_read(Path(args.model) / bundle.CALIBRATION, args)
    log.info(
        "rolled back: calibration v%d restored as v%d (replacing v%d); pixel threshold %.6g",
        cal.restored_version,
        cal.version,
        cal.rolled_back_from,
        cal.pixel_threshold,
    )
    _emit_json(
        args.json,
        {"rolled_back": True, "calibration": cal.to_dict(), "path": str(Path(args.model) / bundle.CALIBRATION)},
    )
    return 0


def cli_calibrate(args: argparse.Namespace) -> int:
    check_args(args)
    if args.rollback:
        return cli_rollback(args)
    from linewatch.line.engine import Engine

    bundle_dir = Path(args.model)
    precision = precision_for(args)
    model_sha = graph_sha256(bundle_dir, precision)
    engine = Engine(bundle_dir, precision=precision)
    frames, names, source = good_frames(args, engine.input_size)
    maps, scores = score_frames(engine, frames, "good samples")
    th = set_thresholds(maps, scores, args.fpr, args.image_fpr, args.holdout)
    settings = {
        **source,
        "n_images": len(frames),
        "holdout": args.holdout,
        "seed": SEED,
        "regions_per_image": REGIONS_PER_IMAGE,
        "confidence": CONFIDENCE,
        "input_size": list(engine.input_size),
        "providers": list(engine.providers),
        "precision": precision,
        "linewatch": __version__,
    }
    cal = Calibration(
        version=next_version(bundle_dir),
        model_sha256=model_sha,
        pixel_threshold=th.pixel,
        image_threshold=th.image,
        min_defect_area=args.min_defect_area,
        fpr_target=args.fpr,
        image_fpr_target=args.image_fpr,
        n_samples=len(th.calib_idx),
        n_holdout=len(th.hold_idx),
        holdout_pixel_fpr=th.hold_pixel.as_dict() if th.hold_pixel else None,
        holdout_image_fpr=th.hold_image.as_dict() if th.hold_image else None,
        settings=settings,
        previous_version=current_version(bundle_dir),
    )

    report_dir = Path(args.report) if args.report else bundle_dir / REPORT_DIR
    report_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "calibration": cal.to_dict(),
        "path": str(bundle_dir / bundle.CALIBRATION),
        "calibration_split": {
            "pixel_fpr": th.calib_pixel_fpr,
            "image_fpr": th.calib_image_fpr,
            "images": [names[i] for i in th.calib_idx],
        },
        "holdout_images": [names[i] for i in th.hold_idx],
        "warnings": th.warnings,
        "report": str(report_dir),
    }
    defect_pixels = None
    if args.defects:
        result["defects"], defect_pixels = evaluate_defects(engine, args.defects, cal, report_dir)

    path = save_calibration(bundle_dir, cal)
    unreadable = warn_if_daemon_cannot_read(path, args)
    if unreadable:
        result["warnings"] = [*th.warnings, f"the daemon could not load {path}: {unreadable}"]
    plot_distributions(report_dir / "distributions.png", maps, scores, th, cal, defect_pixels)
    (report_dir / "report.md").write_text(report_markdown(result, cal, th) + "\n")
    bundle.atomic_write_json(report_dir / "report.json", result)

    for warning in th.warnings:
        log.warning("%s", warning)
    hp = th.hold_pixel
    log.info(
        "calibration v%d: pixel threshold %.6g (target FPR %g; held out %s), image threshold %s, "
        "min area %d; report in %s",
        cal.version,
        cal.pixel_threshold,
        args.fpr,
        "n/a" if hp is None else f"{hp.rate:.3g} [{hp.lower:.3g}, {hp.upper:.3g}]",
        "none" if cal.image_threshold is None else f"{cal.image_threshold:.6g}",
        cal.min_defect_area,
        report_dir,
    )
    _emit_json(args.json, result)
    return 0
