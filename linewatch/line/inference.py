"""Inference worker: batches frames across cameras through one engine and turns maps into verdicts (torch-free).

The rule that matters on a line: a frame that was captured either becomes a result or is counted as dropped.
Anything that goes wrong on the way (bad frame, engine failure, non-finite score, missing calibration) gives an
ERROR result with the reason; nothing here can produce OK without a calibrated judgement.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

import numpy as np

from linewatch import bundle
from linewatch.errors import BundleError, LinewatchError
from linewatch.images import resize_to_model
from linewatch.line.frames import Frame, FrameQueue
from linewatch.line.ignore_mask import IgnoreMask, mask_for
from linewatch.line.verdict import Judgement, judge
from linewatch.protocol.wire import ProtocolError, ResultHeader, Verdict
from linewatch.validation import validate

if TYPE_CHECKING:
    from linewatch.calibrate.store import Calibration
    from linewatch.line.config import EngineConfig

log = logging.getLogger("linewatch.line.inference")


class Scorer(Protocol):
    """The Scorer protocol of docs/DESIGN.md (linewatch.line.engine.Engine implements it)."""

    @property
    def input_size(self) -> tuple[int, int]: ...

    def score(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class EngineOffline(LinewatchError):
    """A remote engine cannot score now (unreachable, failing, or refused): its frames become ERROR results
    while it reconnects, like an offline camera's, instead of counting as a hung engine."""


@dataclass(frozen=True)
class Model:
    """Everything a reload swaps in one assignment: engine, calibration and their identities."""

    bundle_dir: Path
    engine: Scorer
    calibration: Calibration | None
    uncalibrated_reason: str | None
    model_id: str
    input_size: tuple[int, int]
    batch_s: float | None = None  # one full batch once warm, measured at warm-up (None: no warm-up)
    # the recipe this model judges for (linewatch/line/recipes.py): its name goes into every result header, its
    # per-camera crop (inside the camera's image) is applied here, so a batch is never judged half one recipe
    recipe: str = "default"
    rois: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    ignore_masks: Mapping[str, Any] = field(default_factory=dict)  # camera -> polygons replacing the camera's own

    @property
    def calibration_version(self) -> int | None:
        return None if self.calibration is None else int(self.calibration.version)

    @property
    def thresholds(self) -> dict[str, float | None]:
        cal = self.calibration
        if cal is None:
            return {"pixel": None, "image": None}
        return {"pixel": cal.pixel_threshold, "image": cal.image_threshold}


def load_calibration_or_reason(bundle_dir: Path, precision: str = "fp32") -> tuple[Calibration | None, str | None]:
    """(calibration, None), or (None, why) when the bundle is not calibrated (results are then ERROR)."""
    if not (bundle_dir / bundle.CALIBRATION).is_file():
        return None, f"uncalibrated: no {bundle.CALIBRATION} in {bundle_dir} (run linewatch calibrate)"
    from linewatch.calibrate.store import load_calibration

    return load_calibration(bundle_dir, precision), None


def load_model(
    bundle_dir: Path,
    providers: tuple[str, ...] = ("auto",),
    threads: int = 0,
    precision: str = "fp32",
    max_batch: int = 8,
    require_calibration: bool = False,
    warmup: bool = False,
    trt_cache_dir: Path | None = None,
    reuse: Model | None = None,
    remote: EngineConfig | None = None,
) -> Model:
    """Load and check a bundle. With require_calibration (reload), a bad calibration raises instead of
    degrading to uncalibrated, so the caller can keep the model it has; it is checked before any engine is built,
    so a refused reload costs no warm-up.

    `reuse` (reload): the running model, whose engine is kept when it runs this very graph (same file hash and
    precision; engine settings only change with a restart): a new calibration then swaps in at once, without a
    session build or warm-up taking CPU from inference.

    `trt_cache_dir`: TensorRT engines go to `<trt_cache_dir>/<model id>-<precision>` (one folder per graph, so a
    new bundle never meets engines built for another), else into the bundle as before.

    `remote`: the config's engine section; with `backend: triton` the frames are scored by a Triton server
    (linewatch/line/remote_engine.py), checked against this bundle and calibration before this returns."""
    from linewatch.line.engine import Engine

    bundle_dir = Path(bundle_dir)
    meta = bundle.read_metadata(bundle_dir)
    try:
        calibration, reason = load_calibration_or_reason(bundle_dir, precision)
    except LinewatchError as exc:
        if require_calibration:
            raise
        calibration, reason = None, f"uncalibrated: invalid calibration: {exc}"
    if calibration is None and require_calibration:
        raise BundleError(reason)
    if reuse is not None and _runs_graph(reuse, bundle_dir, meta, precision):
        log.info("graph %s unchanged: engine kept, calibration swapped in without warm-up", reuse.model_id)
        engine: Scorer = reuse.engine
        batch_s = reuse.batch_s
    elif remote is not None and remote.backend == "triton":
        from linewatch.line.remote_engine import TritonScorer

        engine = TritonScorer.connect(bundle_dir, precision, remote, max_batch, calibration)
        batch_s = warm_up(engine, max_batch) if warmup and engine_status(engine)["state"] == "online" else None
    else:
        cache = None if trt_cache_dir is None else Path(trt_cache_dir) / f"{bundle.model_id(meta)}-{precision}"
        engine = Engine(
            bundle_dir,
            providers=list(providers),
            precision=precision,
            threads=threads or None,
            max_batch=max_batch,
            trt_cache_dir=cache,
        )
        batch_s = warm_up(engine, max_batch) if warmup else None
    if reason:
        log.error("%s: every result will be ERROR", reason)
    return Model(bundle_dir, engine, calibration, reason, bundle.model_id(meta), engine.input_size, batch_s)


def engine_status(engine: Scorer) -> dict[str, Any]:
    """The status topic's `engine` (docs/PROTOCOL.md): a remote scorer reports its own; a local one is online."""
    status = getattr(engine, "status", None)
    return dict(status()) if callable(status) else {"backend": "local", "state": "online"}


def _runs_graph(model: Model, bundle_dir: Path, meta: dict[str, Any], precision: str) -> bool:
    """Whether `model`'s engine runs the graph file this bundle names for `precision` (hashed, not trusted)."""
    from linewatch.line.engine import graph_file

    engine = model.engine
    if getattr(engine, "precision", None) != precision or model.model_id != bundle.model_id(meta):
        return False
    _, sha = graph_file(bundle_dir, meta, precision)  # BundleError for a graph that does not match its metadata
    return bool(sha == getattr(engine, "graph_sha256", None))


def warm_up(engine: Scorer, max_batch: int) -> float:
    """Run the batch sizes the worker will use first, so lazy provider set-up (TensorRT engine builds, CUDA
    allocations) happens before READY=1 and not while the watchdog is counting. Returns the seconds of one full
    batch once warm: what this machine needs per batch, the floor of the inference stall limit."""
    t0 = time.monotonic()
    height, width = engine.input_size
    batches = sorted({1, max_batch})
    full = np.full((max_batch, height, width, 3), 128, np.uint8)
    for n in batches:
        engine.score(full[:n])
    warm = time.monotonic()
    engine.score(full)
    batch_s = time.monotonic() - warm
    log.info(
        "engine warm-up (batch %s) took %.2f s; a warm batch of %d takes %.3f s", batches, warm - t0, max_batch, batch_s
    )
    return batch_s


@dataclass(frozen=True)
class Result:
    """What became of one frame: ERROR with the reason, or the judgement behind OK/NOK."""

    frame: Frame
    verdict: Verdict
    model: Model
    score: float | None = None
    judgement: Judgement | None = None
    reason: str | None = None
    anomaly_map: np.ndarray | None = None  # kept (a view of the batch's maps) only for a preview's heat map


def result_header(result: Result, seq: int, mask_size: tuple[int, int] | None = None) -> ResultHeader:
    """The wire header of a result, checked by the protocol's schema: ProtocolError for a result that must not go
    out (OK without a finite score, say). `mask_size=(width, height)` exactly when a mask PNG goes with it."""
    frame, model, judgement = result.frame, result.model, result.judgement
    fields = {
        "camera": frame.camera,
        "seq": seq,
        "frame_time": frame.captured_wall,
        "part_id": frame.part_id,
        "verdict": result.verdict,
        "image_score": result.score,
        "thresholds": model.thresholds,
        "calibration_version": model.calibration_version,
        "model_id": model.model_id,
        "recipe": model.recipe,
        "regions": [] if judgement is None else judgement.regions,
        "regions_total": 0 if judgement is None else judgement.regions_total,
        "defect_regions": 0 if judgement is None else judgement.defect_regions,
        "error": result.reason,
        "frame_index": frame.index,
        "mask": None if mask_size is None else {"width": mask_size[0], "height": mask_size[1]},
    }
    return validate(ResultHeader, fields, f"camera {frame.camera} result {seq}", error=ProtocolError)


def judge_frames(model: Model, frames: list[Frame], camera_masks: Mapping[str, Any] | None = None) -> list[Result]:
    """Score a batch and judge each frame; every frame in gives exactly one result out, in order.
    `camera_masks`: camera -> the config's ignore_mask polygons, used where the model (recipe) has none of its own."""
    results: dict[int, Result] = {}  # frame index -> its result
    height, width = model.input_size
    batch, slots = [], []
    for i, frame in enumerate(frames):
        if frame.error is not None or frame.image is None:
            results[i] = Result(frame, Verdict.ERROR, model, reason=frame.error or "no image")
            continue
        try:
            image = frame.image
            roi = model.rois.get(frame.camera)
            if roi is not None:
                image = _recipe_crop(image, roi, model.recipe)
            batch.append(resize_to_model(image, height, width))
            slots.append(i)
        except Exception as exc:
            results[i] = Result(frame, Verdict.ERROR, model, reason=f"cannot prepare frame: {exc}")
    if batch:
        try:
            maps, scores = model.engine.score(np.stack(batch))
            maps, scores = np.asarray(maps), np.asarray(scores)
            if maps.shape != (len(batch), height, width) or scores.shape != (len(batch),):
                raise LinewatchError(
                    f"engine returned maps {maps.shape} and scores {scores.shape} "
                    f"for {len(batch)} frames of {height}x{width}"
                )
        except Exception as exc:  # an offline remote engine logs its own changes of state, not every batch
            (log.debug if isinstance(exc, EngineOffline) else log.error)(
                "inference failed for %d frames: %s", len(batch), exc
            )
            for i in slots:
                results[i] = Result(frames[i], Verdict.ERROR, model, reason=f"inference failed: {exc}")
        else:
            for k, i in enumerate(slots):
                polygons = model.ignore_masks.get(frames[i].camera) or (camera_masks or {}).get(frames[i].camera)
                results[i] = _judge_one(model, frames[i], maps[k], float(scores[k]), mask_for(polygons))
    return [results[i] for i in range(len(frames))]


def _recipe_crop(image: np.ndarray, roi: tuple[int, ...], recipe: str) -> np.ndarray:
    x, y, w, h = roi
    if x + w > image.shape[1] or y + h > image.shape[0]:
        raise LinewatchError(
            f"recipe {recipe!r} roi {list(roi)} does not fit in the {image.shape[1]}x{image.shape[0]} image"
        )
    return image[y : y + h, x : x + w]


def _judge_one(model: Model, frame: Frame, amap: np.ndarray, score: float, ignore: IgnoreMask | None = None) -> Result:
    if not np.isfinite(score) or not np.all(np.isfinite(amap)):
        return Result(frame, Verdict.ERROR, model, reason="non-finite anomaly score")
    if ignore is not None:  # before thresholding: nothing inside can fail the part or appear in mask and regions
        amap = ignore.apply(amap)
        score = float(amap.max())
    if model.calibration is None:
        return Result(frame, Verdict.ERROR, model, score=score, reason=model.uncalibrated_reason, anomaly_map=amap)
    try:
        judgement = judge(amap, score, model.calibration)
    except Exception as exc:
        return Result(frame, Verdict.ERROR, model, score=score, reason=f"cannot judge: {exc}", anomaly_map=amap)
    return Result(frame, judgement.verdict, model, score=score, judgement=judgement, anomaly_map=amap)


STALL_FACTOR = 3.0  # a batch this many times slower than the slowest recent one is a hang, not a slow machine
BATCH_HISTORY = 50  # recent batch times kept for the stall limit


class InferenceWorker:
    """The one thread that runs the engine. `model` may be replaced at any time (reload); each batch uses
    the model it started with.

    A hang is told from a slow machine by the measured batch time: the stall limit is the configured one or
    STALL_FACTOR × the slowest of the recent batches (and of the model's warm-up batch), whichever is longer.
    """

    def __init__(
        self,
        queue: FrameQueue,
        model: Model,
        on_results: Callable[[list[Result]], None],
        max_batch: int,
        max_wait_s: float,
        idle_wake_s: float = 0.2,
    ):
        self.queue = queue
        self.model = model
        self.on_results = on_results
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.idle_wake_s = idle_wake_s
        self.last_progress = time.monotonic()  # updated after each batch and each idle wake
        self.ignore_masks: dict[str, Any] = {}  # camera -> its config's ignore_mask polygons (see judge_frames)
        self.in_flight: list[Frame] = []  # the batch being scored/published, for accounting at shutdown
        self._batch_s: deque[float] = deque(maxlen=BATCH_HISTORY)  # scoring + judging time of recent batches
        self._batch_lock = threading.Lock()  # the main thread reads what this thread appends
        self._draining = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stalled_for(self, now: float | None = None) -> float:
        return (now or time.monotonic()) - self.last_progress

    def slowest_batch_s(self) -> float:
        """The slowest recent batch, or the current model's warm-up batch if slower (0 before either exists)."""
        with self._batch_lock:
            recent = max(self._batch_s, default=0.0)
        return max(recent, self.model.batch_s or 0.0)

    def stall_limit(self, configured_s: float) -> float:
        """Seconds without a finished batch (while frames wait) after which inference counts as hung."""
        return max(configured_s, STALL_FACTOR * self.slowest_batch_s())

    def stall_reason(self, configured_s: float, pending: int = 0, now: float | None = None) -> str | None:
        """Why inference counts as hung, or None; `pending` (frames waiting) only goes into the text."""
        stalled, limit = self.stalled_for(now), self.stall_limit(configured_s)
        if stalled <= limit:
            return None
        return (
            f"inference stalled: no batch finished for {stalled:.1f} s (limit {limit:.1f} s, slowest recent batch "
            f"{self.slowest_batch_s():.2f} s; {pending} frames waiting)"
        )

    def drain(self) -> None:
        """Finish every queued frame, then stop (capture must be stopped first)."""
        self._draining.set()
        self.queue.close()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            batch = self.queue.take(self.max_batch, self.max_wait_s, self.idle_wake_s)
            if not batch:
                self.last_progress = time.monotonic()
                if self._draining.is_set() and self.queue.pending() == 0:
                    return
                continue
            self.in_flight = batch
            t0 = time.monotonic()
            results = judge_frames(self.model, batch, self.ignore_masks)
            with self._batch_lock:
                self._batch_s.append(time.monotonic() - t0)
            self.on_results(results)  # hands over only: publishing guards each result
            self.in_flight = []
            self.last_progress = time.monotonic()
