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
import math
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
    read_calibration_file,
    rollback,
    save_calibration,
)
from linewatch.calibrate.thresholds import (
    OUTLIER_Z,
    REGIONS_PER_IMAGE,
    RealisedRate,
    check_enough_parts,
    check_enough_samples,
    contamination_outliers,
    exceedance_rate,
    holdout_split,
    min_area_for_reject_rate,
    pixel_threshold_for_fpr,
    pixel_threshold_for_reject_rate,
    realised_image_fpr,
    realised_part_rate,
    realised_pixel_fpr,
)
from linewatch.errors import BundleError, ConfigError, DataError, LinewatchError
from linewatch.feedback import is_feedback_folder
from linewatch.images import check_images, list_images, load_for_model, read_mask, resize_to_model
from linewatch.line.verdict import defect_mask, judge
from linewatch.protocol.wire import Verdict

if TYPE_CHECKING:
    from linewatch.line.engine import Engine
    from linewatch.line.ignore_mask import IgnoreMask

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
    if args.to is not None and not args.rollback:
        raise ConfigError("--to N goes with --rollback (restore version N)")
    if args.rollback:
        return
    if bool(args.good) == bool(args.camera):
        raise ConfigError("give exactly one source of good samples: --good DIR or --camera NAME (with --config)")
    if args.good and is_feedback_folder(Path(args.good)):
        raise ConfigError(
            f"--good {args.good} holds corrections from the line (a dashboard feedback folder): its false rejects are "
            "parts the model scores high, and calibrating on them would raise the thresholds until real defects pass. "
            "Retrain with them instead (linewatch train --feedback, docs/FEEDBACK.md), then calibrate on fresh good "
            "parts"
        )
    if args.camera and not args.config:
        raise ConfigError("--camera needs --config (the daemon config that defines the camera)")
    if args.camera and args.frames < 1:
        raise ConfigError(f"--frames must be >= 1, got {args.frames}")
    if args.fpr is not None and args.reject_rate is not None:
        raise ConfigError("give --reject-rate (parts) or --fpr (pixels), not both")
    if args.fpr is not None and not (0.0 <= args.fpr < 1.0):
        raise ConfigError(f"--fpr must be in [0, 1), got {args.fpr}")
    if args.reject_rate is not None and not (0.0 < args.reject_rate < 1.0):
        raise ConfigError(f"--reject-rate must be in (0, 1), got {args.reject_rate}")
    if args.image_fpr is not None and not (0.0 <= args.image_fpr < 1.0):
        raise ConfigError(f"--image-fpr must be in [0, 1), got {args.image_fpr}")
    if args.image_fpr is not None and args.no_image_threshold:
        raise ConfigError("give --image-fpr or --no-image-threshold, not both")
    if args.min_defect_area is not None and args.min_defect_area < 0:
        raise ConfigError(f"--min-defect-area must be >= 0, got {args.min_defect_area}")
    if args.holdout is not None and not (0.0 <= args.holdout <= 0.9):
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
        check_images(files, f"--good images in {args.good}")  # every bad file named at once, before the work
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


def calibration_ignore_mask(args: argparse.Namespace) -> tuple[IgnoreMask | None, str]:
    """The daemon's ignore mask for these samples: --ignore-mask FILE, else the --camera's `ignore_mask` in
    --config (the very polygons the daemon applies), else none."""
    from linewatch.line.ignore_mask import from_config, load_ignore_mask

    path = getattr(args, "ignore_mask", None)
    if path:
        return load_ignore_mask(path), str(path)
    if args.camera and args.config:
        from linewatch.line.config import load_config

        mask = from_config(load_config(args.config).camera(args.camera).ignore_mask)
        return mask, f"camera {args.camera!r} in {args.config}"
    return None, ""


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

MODES = ("reject_rate", "fpr")
DEFAULT_REJECT_RATE = 0.02  # a first calibration without --fpr/--reject-rate: at most 2 % of good parts rejected
DEFAULT_HOLDOUT = 0.3
JUMP_FACTOR = 1.5  # a new pixel threshold more than this over the active one needs --force


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
    min_area: int = 0
    min_area_derived: str | None = None  # how the area was derived from the data, when it was
    calib_part_rate: float = 0.0
    hold_part: RealisedRate | None = None


def part_verdicts(maps: np.ndarray, scores: np.ndarray, pixel: float, image: float | None, min_area: int) -> np.ndarray:
    """NOK (True) per part by the daemon's own rule (linewatch.line.verdict.judge)."""
    cal = Calibration(
        version=1, model_sha256="0" * 64, pixel_threshold=pixel, image_threshold=image, min_defect_area=min_area
    )
    return np.array([judge(m, s, cal).verdict == Verdict.NOK for m, s in zip(maps, scores)], bool)


def grid_cell_area(bundle_dir: Path) -> int:
    """Input pixels of one cell of the model's regional grid (pool² ; the map is computed on that grid and
    upsampled, so nothing smaller is a region the model resolved): the first calibration's area in reject-rate
    mode when none is given or carried over."""
    pool = (bundle.read_metadata(bundle_dir).get("dfr") or {}).get("pool", 4)
    return int(pool) ** 2 if isinstance(pool, int) and pool >= 1 else 16


def set_thresholds(
    maps: np.ndarray,
    scores: np.ndarray,
    fpr: float | None,
    image_fpr: float | None,
    holdout: float,
    seed: int = SEED,
    regions_per_image: int = REGIONS_PER_IMAGE,
    reject_rate: float | None = None,
    min_area: int | None = 0,
    cell_area: int = 16,
) -> Thresholds:
    """Thresholds on the calibration split, realised rates (with bounds) on the holdout split.

    With `reject_rate` the pixel threshold is the lowest at which at most that share of calibration parts fails
    the daemon's verdict rule at `min_area`; with `fpr` it holds the pixel false-positive rate. `min_area` None
    derives it: `cell_area` in reject-rate mode, in fpr mode the smallest area at which at most
    DEFAULT_REJECT_RATE of the calibration parts fail (see docs/CALIBRATION.md)."""
    if (fpr is None) == (reject_rate is None):
        raise ValueError("give exactly one of fpr and reject_rate")
    calib, hold = holdout_split(len(maps), holdout, seed)
    try:
        if reject_rate is not None:
            check_enough_parts(len(calib), reject_rate)
        else:
            check_enough_samples(len(calib), fpr or 0.0, "pixel", regions_per_image)
        if image_fpr is not None:
            check_enough_samples(len(calib), image_fpr, "image-score", 1)
    except ValueError as exc:
        raise ConfigError(f"{exc} ({len(maps)} images, {len(hold)} held out)") from exc
    if holdout > 0 and len(hold) == 0:
        raise ConfigError(f"--holdout {holdout:g} leaves no held-out image out of {len(maps)}; give more images")
    derived = None
    if reject_rate is not None:
        if min_area is None:
            min_area = cell_area
            derived = f"one cell of the model's regional grid ({cell_area} input pixels)"
        pixel = pixel_threshold_for_reject_rate(maps[calib], reject_rate, min_area)
    else:
        pixel = pixel_threshold_for_fpr(maps[calib], fpr or 0.0)
        if min_area is None:
            min_area = min_area_for_reject_rate(maps[calib], pixel, DEFAULT_REJECT_RATE)
            derived = (
                f"the smallest area at which at most {DEFAULT_REJECT_RATE:.0%} of the {len(calib)} calibration "
                f"parts fail at this pixel threshold"
            )
    image = None if image_fpr is None else pixel_threshold_for_fpr(scores[calib], image_fpr)
    warnings: list[str] = []
    hold_pixel = hold_image = hold_part = None
    calib_nok = part_verdicts(maps[calib], scores[calib], pixel, image, min_area)
    if len(hold):
        hold_pixel = realised_pixel_fpr(maps[hold], pixel, CONFIDENCE)
        if fpr is not None and hold_pixel.misses(fpr):
            warnings.append(miss_message("pixel", fpr, hold_pixel))
        if image is not None and image_fpr is not None:  # image is set exactly when image_fpr is
            hold_image = realised_image_fpr(scores[hold], image, CONFIDENCE)
            if hold_image.misses(image_fpr):
                warnings.append(miss_message("image", image_fpr, hold_image))
        hold_part = realised_part_rate(part_verdicts(maps[hold], scores[hold], pixel, image, min_area), CONFIDENCE)
        if reject_rate is not None and hold_part.lower > reject_rate:
            warnings.append(miss_message("part reject rate", reject_rate, hold_part))
    else:
        warnings.append("no holdout (--holdout 0): the reject rate on unseen good parts is not checked")
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
        min_area,
        derived,
        float(calib_nok.mean()),
        hold_part,
    )


def miss_message(what: str, target: float, rate: RealisedRate) -> str:
    side = (
        "MORE false alarms than asked: the calibration images do not represent the held-out ones (drift within "
        "the batch, too few or too similar images)"
        if rate.lower > target
        else "fewer false alarms than asked (less sensitive than intended: ties or too few images)"
    )
    return (
        f"{what} target {target:g} is outside the {rate.confidence:.0%} interval of the realised rate on "
        f"held-out good images: {rate.rate:.3g} [{rate.lower:.3g}, {rate.upper:.3g}]: {side}"
    )


# --- settings: given, carried over, or default ---------------------------------------------------------------


@dataclass
class Plan:
    """The settings this calibration runs with and where each came from (shown in the log and the report)."""

    mode: str
    target: float
    min_area: int | None  # None: derived from the data (see set_thresholds)
    image_fpr: float | None
    holdout: float
    origin: dict[str, str]


def active_calibration(bundle_dir: Path, sha: str) -> tuple[Calibration | None, bool]:
    """(the bundle's current calibration if it is one at all, whether it was made with this graph)."""
    path = bundle_dir / bundle.CALIBRATION
    if not path.is_file():
        return None, False
    try:
        cal = read_calibration_file(path, None)
    except BundleError as exc:
        log.warning("the current calibration cannot be read, nothing is carried over from it: %s", exc)
        return None, False
    return cal, cal.model_sha256 == sha


def plan_settings(args: argparse.Namespace, active: Calibration | None, input_size: tuple[int, int]) -> Plan:
    """Each setting from the command line, else carried over from the active calibration, else a default.

    A carried-over min area of 0 is never used (it made every speck fail a part): the area is then derived."""
    origin: dict[str, str] = {}
    was = f"carried over from v{active.version}" if active else ""
    mode, target = None, None
    if args.reject_rate is not None:
        mode, target, origin["mode"] = "reject_rate", args.reject_rate, "given"
    elif args.fpr is not None:
        mode, target, origin["mode"] = "fpr", args.fpr, "given"
    elif active is not None and active.effective_mode == "reject_rate" and active.reject_rate_target is not None:
        mode, target, origin["mode"] = "reject_rate", active.reject_rate_target, was
    elif active is not None and active.effective_mode == "fpr" and active.fpr_target is not None:
        mode, target, origin["mode"] = "fpr", active.fpr_target, was
    else:
        mode, target, origin["mode"] = "reject_rate", DEFAULT_REJECT_RATE, "default"

    min_area: int | None = None
    same_size = active is not None and active.settings.get("input_size", list(input_size)) == list(input_size)
    if args.min_defect_area is not None:
        min_area, origin["min_defect_area"] = args.min_defect_area, "given"
    elif active is not None and same_size and active.min_defect_area > 0:
        min_area, origin["min_defect_area"] = active.min_defect_area, was
    else:
        origin["min_defect_area"] = "derived"  # the how is filled in from set_thresholds

    image_fpr = None
    if args.no_image_threshold:
        origin["image_fpr"] = "given (--no-image-threshold)"
    elif args.image_fpr is not None:
        image_fpr, origin["image_fpr"] = args.image_fpr, "given"
    elif active is not None and active.image_fpr_target is not None:
        image_fpr, origin["image_fpr"] = active.image_fpr_target, was
    else:
        origin["image_fpr"] = "default (no image threshold)"

    held = active.settings.get("holdout") if active is not None else None
    if args.holdout is not None:
        holdout, origin["holdout"] = args.holdout, "given"
    elif isinstance(held, (int, float)) and 0.0 <= held <= 0.9:
        holdout, origin["holdout"] = float(held), was
    else:
        holdout, origin["holdout"] = DEFAULT_HOLDOUT, "default"
    return Plan(mode, float(target), min_area, image_fpr, holdout, origin)


def exclude_contamination(
    scores: np.ndarray, names: list[str], previous: Calibration | None
) -> tuple[np.ndarray, list[dict[str, Any]], str | None]:
    """(indices kept, the images excluded with score and why, a note when the whole batch moved)."""
    prev = None if previous is None or not previous.good_image_scores else np.array(previous.good_image_scores)
    outliers, note = contamination_outliers(scores, prev, OUTLIER_Z)
    gone = {o.index for o in outliers}
    excluded = [
        {"image": names[o.index], "score": o.score, "z": o.z if math.isfinite(o.z) else None, "why": o.why}
        for o in outliers
    ]  # z is infinite above a constant bulk: JSON has no inf
    return np.array([i for i in range(len(scores)) if i not in gone], np.int64), excluded, note


def check_jump(th: Thresholds, active: Calibration | None, same_graph: bool, force: bool) -> str | None:
    """Refuse (DataError) a pixel threshold more than JUMP_FACTOR above the active one unless forced; with --force
    return the warning instead."""
    if active is None or not same_graph or active.pixel_threshold <= 0:
        return None
    factor = th.pixel / active.pixel_threshold
    if factor <= JUMP_FACTOR:
        return None
    text = (
        f"the new pixel threshold {th.pixel:.6g} is {factor:.2f}x the active one ({active.pixel_threshold:.6g}, "
        f"v{active.version}), above the {JUMP_FACTOR:g}x a recalibration may move it without --force"
    )
    if force:
        return f"{text}; written anyway (--force)"
    raise DataError(
        f"{text}: defective parts among the calibration samples raise the threshold until defects pass. Check "
        "the samples (the report lists the images it excluded); if the good parts really changed (lighting, "
        "material, camera), run again with --force"
    )


# --- old vs new -----------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _part_rate_text(rate: dict[str, Any] | None) -> str:
    if not rate:
        return "-"
    return f"{rate['rate']:.3g} [{rate['lower']:.3g}, {rate['upper']:.3g}] of {rate['n_effective']:.0f}"


def comparison(old: Calibration | None, new: Calibration, origin: dict[str, str]) -> list[tuple[str, str, str, str]]:
    """(setting, active, new, where the new value comes from) rows."""

    def target(c: Calibration) -> str:
        if c.effective_mode == "reject_rate":
            return f"part reject rate {_fmt(c.reject_rate_target)}"
        if c.effective_mode == "fpr":
            return f"pixel FPR {_fmt(c.fpr_target)}"
        return "set by hand"

    def row(name: str, get: Any, key: str = "") -> tuple[str, str, str, str]:
        return (name, "-" if old is None else get(old), get(new), origin.get(key, "computed"))

    return [
        row("version", lambda c: f"v{c.version}"),
        row("target", target, "mode"),
        row("pixel threshold", lambda c: _fmt(c.pixel_threshold)),
        row("image threshold", lambda c: _fmt(c.image_threshold)),
        row("image FPR target", lambda c: _fmt(c.image_fpr_target), "image_fpr"),
        row("min defect area (px)", lambda c: _fmt(c.min_defect_area), "min_defect_area"),
        row("holdout", lambda c: _fmt(c.settings.get("holdout")), "holdout"),
        row("parts used / held out", lambda c: f"{c.n_samples} / {c.n_holdout}"),
        row("held-out part reject rate", lambda c: _part_rate_text(c.holdout_part_reject_rate)),
        row("held-out pixel FPR", lambda c: _part_rate_text(c.holdout_pixel_fpr)),
    ]


def comparison_table(rows: list[tuple[str, str, str, str]], old: Calibration | None) -> str:
    head = ("setting", "active" if old is None else f"active (v{old.version})", "new", "from")
    table = [head, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table)


def reload_hint(args: argparse.Namespace) -> str:
    """How to apply it: the systemd instance is the daemon config's file name (linewatch@line1 reads line1.yaml)."""
    name = Path(args.config).stem if getattr(args, "config", None) else "NAME"
    return f"apply it: sudo systemctl reload linewatch@{name}   (SIGHUP: the daemon reloads without restarting)"


def readability_text(path: Path, args: argparse.Namespace, reason: str | None) -> str:
    user = daemon_user(args)
    if user is None:
        return f"not checked who can read {path}: no user {DAEMON_USER!r} here (pass --daemon-user NAME)"
    if reason:
        return f"the daemon's user {user.pw_name} could NOT read it: {reason}"
    return f"the daemon's user {user.pw_name} can read {path}"


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


def overlay_image(
    frame: np.ndarray, amap: np.ndarray, threshold: float, truth: np.ndarray | None, min_defect_area: int = 1
) -> np.ndarray:
    """Heat map blended over the frame, ground truth outlined green, and red outlines around the defect regions
    only (what fails a part): specks smaller than `min_defect_area` never fail one, so they are not drawn."""
    scale = max(float(amap.max()), threshold * 2, 1e-12)
    heat = cv2.applyColorMap(np.clip(amap / scale * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    out = cv2.addWeighted(frame, 0.6, heat, 0.4, 0)
    if truth is not None:
        contours, _ = cv2.findContours(truth.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (0, 255, 0), 1)
    defects = defect_mask(amap > threshold, min_defect_area).astype(np.uint8)
    contours, _ = cv2.findContours(defects, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (0, 0, 255), 1)
    return out


def evaluate_defects(
    engine: Engine, root: str | Path, cal: Calibration, report_dir: Path, ignore: IgnoreMask | None = None
) -> tuple[dict[str, Any], np.ndarray]:
    """Detection rate, PRO at the chosen threshold and good-image reject rate; writes a few overlays."""
    h, w = engine.input_size
    samples = defect_samples(root)
    check_images([p for _, p, _ in samples] + [m for _, _, m in samples if m], f"--defects files in {root}")
    frames = np.stack([load_for_model(p, h, w) for _, p, _ in samples])
    maps, scores = score_frames(engine, frames, "defect samples")
    if ignore is not None:
        maps, scores = ignore.apply_batch(maps, scores)
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
            picture = overlay_image(frames[i], maps[i], cal.pixel_threshold, truth, cal.min_defect_area)
            cv2.imwrite(str(report_dir / name), picture)
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
        "escape_rate": 1.0 - sum(v["nok"] for v in defect_types.values()) / n_def if n_def else None,
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
        label=f"pixel threshold {cal.pixel_threshold:.4g} ({target_text(cal)})",
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


def target_text(cal: Calibration) -> str:
    if cal.effective_mode == "reject_rate":
        return f"target part reject rate {cal.reject_rate_target:g}"
    if cal.effective_mode == "fpr":
        return f"target pixel FPR {cal.fpr_target:g}"
    return "set by hand"


def _rate_line(name: str, target: float | None, calib: float | None, rate: RealisedRate | None) -> str:
    held = (
        "not checked (no holdout)"
        if rate is None
        else (
            f"{rate.rate:.4g}, {rate.confidence:.0%} interval [{rate.lower:.4g}, {rate.upper:.4g}] "
            f"(effective n {rate.n_effective:.0f})"
        )
    )
    return f"| {name} | {'-' if target is None else f'{target:g}'} | {calib:.4g} | {held} |"


def report_markdown(result: dict[str, Any], cal: Calibration, th: Thresholds, table: str = "") -> str:
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
        f"- chosen for: {target_text(cal)}",
        "",
        "| rate | target | on calibration split | realised on held-out good images |",
        "| --- | --- | --- | --- |",
        _rate_line("part reject rate", cal.reject_rate_target, th.calib_part_rate, th.hold_part),
        _rate_line("pixel FPR", cal.fpr_target, th.calib_pixel_fpr, th.hold_pixel),
    ]
    if cal.image_threshold is not None:
        lines.append(_rate_line("image FPR", cal.image_fpr_target, th.calib_image_fpr, th.hold_image))
    if table:
        lines += ["", "## Active vs new", "", "```", table, "```"]
    lines += ["", f"- {result.get('readable', '')}", f"- {result.get('apply', '')}"]
    excluded = result.get("excluded") or []
    if excluded:
        lines += ["", "## Excluded images (probably not good parts)", ""]
        lines += ["| image | image score | why |", "| --- | --- | --- |"]
        lines += [f"| {e['image']} | {e['score']:.6g} | {e['why']} |" for e in excluded]
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
            f"- escape rate (defective images judged OK): {'n/a' if rate is None else f'{1.0 - rate:.3f}'}",
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


def check_golden_before_activation(
    args: argparse.Namespace, bundle_dir: Path, engine: Engine, cal: Calibration, ignore: IgnoreMask | None
) -> dict[str, Any] | None:
    """--golden DIR: the new calibration judges the golden set exactly as the daemon would before it is written;
    a failure refuses it (the active calibration stays) unless --force. docs/RECIPES.md."""
    golden = getattr(args, "golden", None)
    if not golden:
        return None
    from linewatch.line.inference import Model
    from linewatch.verify import ANY_CAMERA, GoldenFailed, check_golden

    masks = {} if ignore is None else {ANY_CAMERA: ignore.polygons}
    meta = bundle.read_metadata(bundle_dir)
    model = Model(bundle_dir, engine, cal, None, bundle.model_id(meta), engine.input_size, ignore_masks=masks)
    try:
        report = check_golden(model, Path(golden), None, bool(args.force), masks)
    except GoldenFailed as exc:
        raise LinewatchError(
            f"calibration v{cal.version} not written: {exc} (the active calibration stays; --force writes it anyway)"
        ) from None
    return None if report is None else report.summary()


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
    cal = rollback(args.model, precision_for(args), to=getattr(args, "to", None))
    path = Path(args.model) / bundle.CALIBRATION
    reason = warn_if_daemon_cannot_read(path, args)
    log.info(
        "rolled back: calibration v%d restored as v%d (replacing v%d); pixel threshold %.6g\n%s\n%s",
        cal.restored_version,
        cal.version,
        cal.rolled_back_from,
        cal.pixel_threshold,
        readability_text(path, args, reason),
        reload_hint(args),
    )
    _emit_json(args.json, {"rolled_back": True, "calibration": cal.to_dict(), "path": str(path)})
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
    active, same_graph = active_calibration(bundle_dir, model_sha)
    plan = plan_settings(args, active, engine.input_size)
    frames, names, source = good_frames(args, engine.input_size)
    maps, scores = score_frames(engine, frames, "good samples")
    ignore, ignore_from = calibration_ignore_mask(args)
    if ignore is not None:  # the daemon's own mask: no threshold is set on what it never judges
        maps, scores = ignore.apply_batch(maps, scores)
        ignored = float(ignore.raster(*maps.shape[1:]).mean())
        log.info("ignore mask from %s: %.1f%% of the map left out of the thresholds", ignore_from, 100 * ignored)
        source = {**source, "ignore_mask": [[list(p) for p in poly] for poly in ignore.polygons]}
        source["ignore_mask_from"] = ignore_from
    keep, excluded, shift_note = exclude_contamination(scores, names, active if same_graph else None)
    for item in excluded:
        log.warning("excluded %s (image score %.6g): %s", item["image"], item["score"], item["why"])
    th = set_thresholds(
        maps[keep],
        scores[keep],
        plan.target if plan.mode == "fpr" else None,
        plan.image_fpr,
        plan.holdout,
        reject_rate=plan.target if plan.mode == "reject_rate" else None,
        min_area=plan.min_area,
        cell_area=grid_cell_area(bundle_dir),
    )
    if th.min_area_derived:
        plan.origin["min_defect_area"] = f"derived: {th.min_area_derived}"
    if excluded:
        th.warnings.append(
            f"{len(excluded)} of {len(frames)} images excluded as probably defective: "
            + ", ".join(f"{e['image']} ({e['score']:.4g})" for e in excluded)
        )
    if shift_note:
        th.warnings.append(shift_note)
    jump = check_jump(th, active, same_graph, args.force)
    if jump:
        th.warnings.append(jump)
    calib_names = [names[keep[i]] for i in th.calib_idx]
    hold_names = [names[keep[i]] for i in th.hold_idx]
    settings = {
        **source,
        "n_images": len(frames),
        "holdout": plan.holdout,
        "seed": SEED,
        "regions_per_image": REGIONS_PER_IMAGE,
        "confidence": CONFIDENCE,
        "input_size": list(engine.input_size),
        "providers": list(engine.providers),
        "precision": precision,
        "linewatch": __version__,
        "origin": plan.origin,
        "outlier_z": OUTLIER_Z,
    }
    cal = Calibration(
        version=next_version(bundle_dir),
        model_sha256=model_sha,
        pixel_threshold=th.pixel,
        image_threshold=th.image,
        min_defect_area=th.min_area,
        mode=plan.mode,
        fpr_target=plan.target if plan.mode == "fpr" else None,
        reject_rate_target=plan.target if plan.mode == "reject_rate" else None,
        image_fpr_target=plan.image_fpr,
        n_samples=len(th.calib_idx),
        n_holdout=len(th.hold_idx),
        holdout_pixel_fpr=th.hold_pixel.as_dict() if th.hold_pixel else None,
        holdout_image_fpr=th.hold_image.as_dict() if th.hold_image else None,
        holdout_part_reject_rate=th.hold_part.as_dict() if th.hold_part else None,
        good_image_scores=sorted(float(s) for s in scores[keep]),
        excluded=excluded,
        settings=settings,
        previous_version=current_version(bundle_dir),
    )

    report_dir = Path(args.report) if args.report else bundle_dir / REPORT_DIR
    report_dir.mkdir(parents=True, exist_ok=True)
    rows = comparison(active, cal, plan.origin)
    result = {
        "calibration": cal.to_dict(),
        "path": str(bundle_dir / bundle.CALIBRATION),
        "calibration_split": {
            "pixel_fpr": th.calib_pixel_fpr,
            "image_fpr": th.calib_image_fpr,
            "part_reject_rate": th.calib_part_rate,
            "images": calib_names,
        },
        "holdout_images": hold_names,
        "excluded": excluded,
        "comparison": [dict(zip(("setting", "active", "new", "from"), r)) for r in rows],
        "warnings": th.warnings,
        "report": str(report_dir),
    }
    defect_pixels = None
    if args.defects:
        result["defects"], defect_pixels = evaluate_defects(engine, args.defects, cal, report_dir, ignore)

    golden = check_golden_before_activation(args, bundle_dir, engine, cal, ignore)
    if golden is not None:
        result["golden"] = golden
    path = save_calibration(bundle_dir, cal)
    unreadable = warn_if_daemon_cannot_read(path, args)
    if unreadable:
        result["warnings"] = [*th.warnings, f"the daemon could not load {path}: {unreadable}"]
    result["apply"] = reload_hint(args)
    result["readable"] = readability_text(path, args, unreadable)
    plot_distributions(report_dir / "distributions.png", maps[keep], scores[keep], th, cal, defect_pixels)
    (report_dir / "report.md").write_text(report_markdown(result, cal, th, comparison_table(rows, active)) + "\n")
    bundle.atomic_write_json(report_dir / "report.json", result)

    for warning in th.warnings:
        log.warning("%s", warning)
    hp = th.hold_part
    log.info(
        "calibration v%d: pixel threshold %.6g (%s), image threshold %s, min area %d px; held-out part reject "
        "rate %s; report in %s\n%s\n%s\n%s",
        cal.version,
        cal.pixel_threshold,
        f"part reject rate {plan.target:g}" if plan.mode == "reject_rate" else f"pixel FPR {plan.target:g}",
        "none" if cal.image_threshold is None else f"{cal.image_threshold:.6g}",
        cal.min_defect_area,
        "n/a" if hp is None else f"{hp.rate:.3g} [{hp.lower:.3g}, {hp.upper:.3g}] of {hp.n_effective:.0f} parts",
        report_dir,
        comparison_table(rows, active),
        result["readable"],
        result["apply"],
    )
    _emit_json(args.json, result)
    return 0
