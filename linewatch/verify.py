"""Golden-sample verification: known good and known defective parts judged exactly as the daemon judges them
(torch-free).

A model, a calibration or a recipe goes live only when every good part of its golden set is OK and every defective
part NOK (docs/RECIPES.md): a threshold that drifted, a bundle swapped by mistake or a calibration made on
contaminated samples is caught on parts whose answer is known, before the line relies on it. The judging is
`linewatch.line.inference.judge_frames`, the daemon's own path (recipe crop, scoring, verdict), so a pass here means
the daemon would answer the same.

Layout of a golden set DIR: `good/` and `defect/` (judged as they are), and optionally `<camera>/good/`,
`<camera>/defect/` (judged as that camera's frames: with the recipe's crop and ignore mask for the camera).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from linewatch.errors import DataError, LinewatchError
from linewatch.images import IMAGE_SUFFIXES, read_image

if TYPE_CHECKING:
    from linewatch.line.inference import Model

log = logging.getLogger("linewatch.verify")

GOOD, DEFECT = "good", "defect"
EXPECTED = {GOOD: "OK", DEFECT: "NOK"}
ANY_CAMERA = "golden"  # the camera name top-level images are judged under (no camera's crop or mask)
BATCH = 8
MAX_LISTED = 20  # failures named in a one-line summary (the report has them all)


@dataclass(frozen=True)
class GoldenItem:
    camera: str | None  # None: top-level good/ or defect/
    kind: str  # good | defect
    path: Path


@dataclass(frozen=True)
class GoldenOutcome:
    item: GoldenItem
    verdict: str  # OK, NOK or ERROR
    score: float | None
    reason: str | None  # why an ERROR (unreadable image, uncalibrated, ...)

    @property
    def passed(self) -> bool:
        return self.verdict == EXPECTED[self.item.kind]

    def why(self) -> str:
        expected = EXPECTED[self.item.kind]
        score = "no score" if self.score is None else f"score {self.score:.4g}"
        text = f"{self.item.path}: expected {expected}, got {self.verdict} ({score}"
        return text + (f": {self.reason})" if self.reason else ")")


@dataclass
class GoldenReport:
    golden: Path
    recipe: str
    model_id: str
    calibration_version: int | None
    thresholds: dict[str, float | None]
    outcomes: list[GoldenOutcome] = field(default_factory=list)
    seconds: float = 0.0
    finished: float = 0.0  # Unix time

    @property
    def passed(self) -> bool:
        return bool(self.outcomes) and all(o.passed for o in self.outcomes)

    @property
    def failures(self) -> list[GoldenOutcome]:
        return [o for o in self.outcomes if not o.passed]

    def count(self, kind: str) -> tuple[int, int]:
        """(passed, total) of one kind."""
        of_kind = [o for o in self.outcomes if o.item.kind == kind]
        return sum(o.passed for o in of_kind), len(of_kind)

    def summary(self) -> dict[str, Any]:
        """The JSON the status topic, the trigger reply and `linewatch verify --json` carry."""
        good, defect = self.count(GOOD), self.count(DEFECT)
        return {
            "recipe": self.recipe,
            "golden": str(self.golden),
            "passed": self.passed,
            "model_id": self.model_id,
            "calibration_version": self.calibration_version,
            "good": {"ok": good[0], "total": good[1]},
            "defect": {"nok": defect[0], "total": defect[1]},
            "failed": [
                {
                    "image": str(o.item.path),
                    "camera": o.item.camera,
                    "expected": EXPECTED[o.item.kind],
                    "verdict": o.verdict,
                    "score": o.score,
                    "reason": o.reason,
                }
                for o in self.failures
            ],
            "seconds": round(self.seconds, 3),
            "time": self.finished,
        }

    def text(self) -> str:
        (gp, gt), (dp, dt) = self.count(GOOD), self.count(DEFECT)
        head = (
            f"golden set {self.golden} (recipe {self.recipe}, model {self.model_id}, calibration "
            f"{self.calibration_version}): {'PASSED' if self.passed else 'FAILED'}: {gp}/{gt} good parts OK, "
            f"{dp}/{dt} defective parts NOK"
        )
        return "\n".join([head, *(f"  failed: {o.why()}" for o in self.failures)])

    def one_line(self) -> str:
        text = self.text().splitlines()
        more = len(text) - 1 - MAX_LISTED
        return "; ".join(t.strip() for t in text[: 1 + MAX_LISTED]) + (f"; and {more} more" if more > 0 else "")


def golden_items(golden: str | Path, cameras: list[str] | None = None) -> list[GoldenItem]:
    """Every image of a golden set, top level first, then per camera (`cameras`: only those; None: every folder
    that holds good/ or defect/). A set without a good and a defective part is refused: it could not fail a model
    that passes everything or rejects everything."""
    root = Path(golden)
    if not root.is_dir():
        raise DataError(f"golden set not found: {root}")
    items = _kind_items(root, None)
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in (GOOD, DEFECT)):
        if (sub / GOOD).is_dir() or (sub / DEFECT).is_dir():
            if cameras is not None and sub.name not in cameras:
                log.warning("golden set %s: folder %s is no camera of this daemon: not judged", root, sub.name)
                continue
            items += _kind_items(sub, sub.name)
    kinds = {i.kind for i in items}
    if kinds != {GOOD, DEFECT}:
        missing = " and ".join(k for k in (GOOD, DEFECT) if k not in kinds)
        raise DataError(
            f"golden set {root}: no {missing} images (expected {GOOD}/ and {DEFECT}/ with images, optionally per "
            "camera: <camera>/good/, <camera>/defect/)"
        )
    return items


def _kind_items(folder: Path, camera: str | None) -> list[GoldenItem]:
    items = []
    for kind in (GOOD, DEFECT):
        d = folder / kind
        if d.is_dir():
            files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            items += [GoldenItem(camera, kind, p) for p in files]
    return items


def verify_model(
    model: Model, golden: str | Path, cameras: list[str] | None = None, camera_masks: Mapping[str, Any] | None = None
) -> GoldenReport:
    """Judge every golden part with `model` through the daemon's judge path. Never raises for a part: an image
    that cannot be read is an ERROR outcome, i.e. a failure. DataError for a golden set that is not one.
    `camera_masks`: the cameras' own ignore masks (config), for per-camera folders, as the daemon applies them."""
    from linewatch.line.frames import Frame
    from linewatch.line.inference import judge_frames

    t0 = time.monotonic()
    items = golden_items(golden, cameras)
    report = GoldenReport(Path(golden), model.recipe, model.model_id, model.calibration_version, model.thresholds)
    for start in range(0, len(items), BATCH):
        chunk = items[start : start + BATCH]
        frames = []
        for i, item in enumerate(chunk):
            now = time.time()
            try:
                image, error = read_image(item.path), None
            except DataError as exc:
                image, error = None, f"cannot read golden image: {exc}"
            frames.append(Frame(item.camera or ANY_CAMERA, start + i, now, time.monotonic(), image, error))
        for item, result in zip(chunk, judge_frames(model, frames, camera_masks)):
            report.outcomes.append(GoldenOutcome(item, str(result.verdict), result.score, result.reason))
    report.seconds = time.monotonic() - t0
    report.finished = time.time()
    return report


def cli_verify(args: argparse.Namespace) -> int:
    """`linewatch verify MODEL --golden DIR`: exit 0 when every golden part is judged right, 1 otherwise (each
    failure named, with its verdict, score and reason)."""
    from linewatch.line.inference import load_model

    providers = tuple(p.strip() for p in str(args.providers).split(",") if p.strip())
    model = load_model(Path(args.model), providers, precision=args.precision)
    report = verify_model(model, args.golden)
    (log.info if report.passed else log.error)("%s", report.text())
    if args.json:
        data = json.dumps(report.summary(), indent=2)
        if args.json == "-":
            print(data)
        else:
            Path(args.json).write_text(data + "\n")
    return 0 if report.passed else 1


class GoldenFailed(LinewatchError):
    """A swap refused because its golden set failed; `report` says which parts."""

    def __init__(self, report: GoldenReport):
        super().__init__(f"golden set failed: {report.one_line()}")
        self.report = report


def check_golden(
    model: Model,
    golden: Path | None,
    cameras: list[str] | None,
    force: bool,
    camera_masks: Mapping[str, Any] | None = None,
) -> GoldenReport | None:
    """The gate before a swap: None without a golden set; the report when it passed or was forced; GoldenFailed
    otherwise (a golden set that cannot be read fails too: an unverifiable swap is not a verified one)."""
    if golden is None:
        return None
    try:
        report = verify_model(model, golden, cameras, camera_masks)
    except LinewatchError as exc:
        if force:
            log.error("golden set %s could not be judged (%s): forced, going live anyway", golden, exc)
            return None
        raise LinewatchError(f"golden set {golden} could not be judged: {exc}") from None
    if report.passed:
        log.info("%s", report.one_line())
        return report
    if force:
        log.error("%s: forced, going live anyway", report.one_line())
        return report
    raise GoldenFailed(report)
