"""`linewatch run`: cameras -> inference -> ZeroMQ results, trigger replies, status, metrics, archive (torch-free).

Threads: one per camera (capture), one inference worker, the publisher's and trigger server's own, and the main
thread, which owns signals, reloads, the per-camera status (the life bit) and the systemd notifications.

Watchdog policy: WATCHDOG=1 is sent only while the pipeline is healthy: the inference thread is alive and either
finishing batches (within the stall limit, which follows the measured batch time) or idle with nothing queued, no
capture call is hung, and every other long-lived thread (publishing, trigger server, CURVE authenticator, archive
writer, metrics server) is alive. Cameras that are offline but reconnecting are healthy (a restart would not bring
the camera back; the status topic reports them). A stuck engine, a hung capture call or a dead thread stops the
pings, so systemd's WatchdogSec restarts the service; the reason is in the status topic (`unhealthy_reason`).

Reloads (SIGHUP) load the new model on their own thread, so status and pings go on meanwhile; the main thread
swaps it in (the inference thread takes the model per batch) or keeps the old one when loading failed. The
calibration is checked before any engine is built, and a new calibration for the graph already running keeps the
running engine (no session build, no warm-up taking CPU from inference).

Shutdown (SIGTERM): every captured frame gets exactly one message. What is not inspected and published within
health.drain_timeout_s goes out as ERROR ("shutdown: not inspected"); status keeps its interval during the drain.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

from linewatch.errors import ConfigError, LinewatchError
from linewatch.line.archive import entry_name
from linewatch.line.cameras import FINISHED, Camera
from linewatch.line.config import Config, load_config
from linewatch.line.drift import ALARM, OK, DriftDesign, DriftWatch, calibration_scores
from linewatch.line.drift import design as drift_design
from linewatch.line.frames import DROPPED_REASON, SHUTDOWN_REASON, FrameQueue, TriggerFuture
from linewatch.line.ignore_mask import mask_for
from linewatch.line.inference import (
    STALL_FACTOR,
    InferenceWorker,
    Model,
    Result,
    engine_status,
    load_model,
    result_header,
)
from linewatch.line.recipes import RecipeBook, RecipeRefused
from linewatch.line.systemd_notify import StartupExtender, SystemdNotifier
from linewatch.protocol.wire import (
    PreviewHeader,
    Verdict,
    encode_heatmap_png,
    encode_mask_png,
    encode_preview_jpeg,
)

if TYPE_CHECKING:
    from linewatch.line.archive import Archive
    from linewatch.line.history import History
    from linewatch.line.prometheus import DaemonMetrics
    from linewatch.line.trigger import TriggerServer
    from linewatch.protocol.curve import CurveConfig

log = logging.getLogger("linewatch.line.daemon")

LATENCY_WINDOW = 2000  # results kept per camera for p50/p99
FPS_WINDOW_S = 5.0
TICK_S = 0.05
EXIT_UNANSWERED = 1  # the stop left captured frames without a message (the socket refused them): see PROTOCOL.md
MAX_REASON_CHARS = 500  # an ERROR result made from a failed publish carries at most this much of the failure
RELOADED = ("model", "recipes", "recipe", "verify")  # config sections a SIGHUP applies; others need a restart
STATUS_GOLDEN_FAILURES = 10  # failed golden parts listed in the status topic (the log and the reply list all)


class HealthReporter(Protocol):
    """A part with its own thread(s): `health()` is None while they run, else why not."""

    def health(self) -> str | None: ...


class CameraStats:
    """What the status topic reports per camera, beyond the capture thread's own counters."""

    def __init__(self) -> None:
        self.seq = 0  # results handed to ZeroMQ: the last seq sent
        self.publish_dropped = 0  # results that got no seq: refused by the socket, or no valid header
        self.previews = 0  # previews handed to ZeroMQ (never results)
        self.previews_dropped = 0  # previews refused by the socket or not buildable
        self.last_ok_preview = float("-inf")  # monotonic time of the last OK part's preview (the rate limit)
        self.verdicts = dict.fromkeys(Verdict, 0)
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.done_times: deque[float] = deque()
        self.lock = threading.Lock()

    def record(self, verdict: Verdict, latency_s: float, now: float) -> None:
        with self.lock:
            self.verdicts[Verdict(verdict)] += 1
            self.latencies.append(latency_s)
            self.done_times.append(now)

    def fps_and_latency(self, now: float) -> tuple[float, float | None, float | None]:
        with self.lock:
            while self.done_times and now - self.done_times[0] > FPS_WINDOW_S:
                self.done_times.popleft()
            fps = len(self.done_times) / FPS_WINDOW_S
            lat = np.asarray(self.latencies, dtype=np.float64)
        if lat.size == 0:
            return fps, None, None
        p50, p99 = np.percentile(lat, [50, 99])
        return fps, float(p50) * 1000, float(p99) * 1000


class PublishThread:
    """Mask encoding, publishing, trigger replies and archiving off the inference thread, so the engine only
    scores. Bounded: when publishing falls behind, the inference thread waits and the camera queues drop (counted).
    """

    def __init__(self, publish: Callable[[list[Result]], None], max_batches: int = 4):
        self._publish = publish
        self._queue: queue.Queue[list[Result] | None] = queue.Queue(maxsize=max_batches)  # None: stop
        self._current: list[Result] = []  # the batch being published: at a drain timeout its rest is answered
        self._thread = threading.Thread(target=self._run, name="publish", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, results: list[Result]) -> None:
        self._queue.put(results)

    def close(self) -> None:
        """No more results will come: finish the queued ones and stop."""
        self._queue.put(None)

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def abandon(self) -> list[Result]:
        """Results not published yet at a drain timeout, oldest first: the batch being published (the caller
        skips those already out) and those queued."""
        left: list[Result] = list(self._current)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return left
            if item is not None:
                left.extend(item)

    def _run(self) -> None:
        while (results := self._queue.get()) is not None:
            self._current = results
            self._publish(results)  # guards each result itself: a failure here is a bug, and health reports it
            self._current = []


class Daemon:
    def __init__(self, cfg: Config):
        from linewatch.line.publisher import ResultPublisher

        self.cfg = cfg
        self.queue = FrameQueue(track=True)  # every frame taken stays on its books until its message is out
        self.cameras = {c.name: Camera(c, self.queue) for c in cfg.cameras}
        for cam_cfg in cfg.cameras:
            self.queue.set_frames_are_parts(cam_cfg.name, cam_cfg.frames_are_parts)
        self.stats = {name: CameraStats() for name in self.cameras}
        self.notifier = SystemdNotifier()
        # recipes (linewatch/line/recipes.py): every recipe's model preloaded, so a changeover costs no load time
        self.swap_lock = threading.Lock()  # one recipe switch, verify or reload swap at a time
        self.last_golden: dict[str, Any] | None = None  # the latest golden-set check (status `golden`)
        with StartupExtender(self.notifier):  # session creation and warm-up can outlast TimeoutStartSec
            self.recipes = RecipeBook.load(cfg, self._load_model, cfg.recipe)
            self.recipes.drift_plans = {n: self._drift_plan(m) for n, m in self.recipes.models.items()}
            self.model: Model = self.recipes.models[cfg.recipe]
            self._golden_gate(self.model, "start", cfg.verify.force_swaps, cfg)
        self._check_batch_time(self.model)
        self._reload_recipes: RecipeBook | None = None  # loaded on the reload thread
        # drift watch per camera, with the model its design came from: results of another model are not counted
        self.drift: tuple[Model, dict[str, DriftWatch]] = self._drift_watches(
            self.model, self.recipes.drift_plans[cfg.recipe]
        )
        self._reload_drift_plan: DriftDesign | str | None = None  # computed on the reload thread
        self.curve = self._curve_config()
        self.publisher = ResultPublisher(
            cfg.publish.endpoint,
            cfg.publish.hwm,
            self.curve,
            allow_insecure_bind=cfg.security.allow_insecure_bind,
            cameras=list(self.cameras),
        )
        self.trigger: TriggerServer | None = None
        self.metrics: DaemonMetrics | None = None
        self.archive: Archive | None = None
        self.history: History | None = None  # every result recorded (docs/HISTORY.md), on its own thread
        self.outbox = PublishThread(self.publish_results)
        self.worker = InferenceWorker(
            self.queue, self.model, self.outbox.submit, cfg.engine.max_batch, cfg.engine.max_wait_ms / 1000.0
        )
        # ignore masks (linewatch/line/ignore_mask.py): applied to each camera's maps before thresholding
        self.worker.ignore_masks = {c.name: c.ignore_mask for c in cfg.cameras if c.ignore_mask}
        self.stop_requested = threading.Event()
        self.reload_requested = threading.Event()
        self.reloading: Future[tuple[Config, Model]] | None = None  # the model a reload is loading, off this thread
        self.stopping = False
        self.publish_lock = threading.Lock()
        self.abandoned = False  # drain timed out: late results are not published (their frames were answered)
        self.unhealthy_reason: str | None = None
        self._next_drain_status = 0.0  # shutdown: when the next status is due

    # --- wiring -----------------------------------------------------------------------------------------
    def _curve_config(self) -> CurveConfig | None:
        sec = self.cfg.security
        if not sec.curve:
            return None
        from linewatch.protocol.curve import CurveConfig

        key_file, keys_dir = sec.server_secret_key_file, sec.authorized_keys_dir
        if key_file is None or keys_dir is None:  # SecurityConfig refuses curve without them
            raise ConfigError("security.curve needs server_secret_key_file and authorized_keys_dir")
        return CurveConfig.from_files(key_file, keys_dir)

    def start(self) -> None:
        cfg = self.cfg
        if cfg.metrics.enabled:
            from linewatch.line.prometheus import DaemonMetrics

            self.metrics = DaemonMetrics(allow_insecure_bind=cfg.security.allow_insecure_bind)
            self.metrics.watch_cameras(self._camera_totals)
            self.metrics.watch_drift(self._drift_gauges)
            self.metrics.watch_gating(lambda: {n: c.gate.snapshot() for n, c in self.cameras.items() if c.gate})
            self.metrics.set_model(self.model)
            if self.last_golden is not None:  # the start's golden check ran before the metrics existed
                self.metrics.set_golden(self.last_golden["recipe"], bool(self.last_golden["passed"]))
        if cfg.archive.enabled:
            from linewatch.line.archive import Archive

            if cfg.archive.dir is None:  # ArchiveConfig refuses enabled without it
                raise ConfigError("archive.enabled needs archive.dir")
            self.archive = Archive(cfg.archive.dir, int(cfg.archive.max_mb * 1024 * 1024), cfg.archive.queue_size)
            if self.metrics:
                self.metrics.watch_archive(self.archive)
            self.archive.start()
        if cfg.trigger.enabled:
            from linewatch.line.trigger import TriggerServer

            self.trigger = TriggerServer(
                cfg.trigger.endpoint,
                self.handle_trigger,
                curve=self.curve,
                timeout_s=cfg.trigger.timeout_s,
                allow_insecure_bind=cfg.security.allow_insecure_bind,
                control=self.handle_control,
            )
            if self.metrics:
                self.metrics.watch_triggers(self.trigger.outcomes.copy)
            self.trigger.start()
        if cfg.history.enabled:
            from linewatch.line.history import History

            self.history = History.from_config(cfg)
            if self.metrics:
                self.metrics.watch_history(self.history)
            self.history.start()
        if self.metrics:  # served once every part is watched: the first scrape already has every series
            self.metrics.serve(cfg.metrics.host, cfg.metrics.port)
        self.outbox.start()
        self.worker.start()
        for cam in self.cameras.values():
            cam.start()
        log.info(
            "running: model %s (calibration %s), %d camera(s), results on %s",
            self.model.model_id,
            self.model.calibration_version,
            len(self.cameras),
            cfg.publish.endpoint,
        )

    # --- results ----------------------------------------------------------------------------------------
    def publish_results(self, results: list[Result]) -> None:
        """Publishing thread: each result out on its own, so one that cannot be published (sent as ERROR instead,
        or, if not even that can be, counted with its trigger failed) never takes the rest of the batch, other
        cameras' results included, with it."""
        if self.metrics:
            self.metrics.batch_size.observe(len(results))
        for result in results:
            with self.publish_lock:
                if self.abandoned:
                    return
                try:
                    self._publish_one(result)
                except Exception:  # a bug past every guard in there: logged, and the rest of the batch still goes
                    log.exception("camera %s: result of frame %d lost", result.frame.camera, result.frame.index)

    def _publish_one(self, result: Result) -> None:
        stats = self.stats[result.frame.camera]
        try:
            sent = self._send_or_error(result, stats.seq + 1)
        finally:
            self.queue.settle(result.frame)  # its message went out, or it is counted as not publishable below
        if sent is None:
            self._count_dropped(result, stats)
            return
        published, header, mask_png = sent
        stats.seq = header["seq"]  # handed to ZeroMQ: the seq is used, whatever happens to the bookkeeping
        try:
            self._count_published(published, stats, header, mask_png)
        except Exception:  # a bug in counting or archiving; the result itself went out
            log.exception("camera %s seq %d: bookkeeping after publishing failed", published.frame.camera, stats.seq)
        if self.cfg.publish.preview.enabled:
            self._preview(published, stats, header)

    def _preview(self, result: Result, stats: CameraStats, header: dict[str, Any]) -> None:
        """After its result went out: a preview for every NOK and ERROR part, for OK parts at most max_fps per
        camera. Built only when selected; a failure or a full socket drops the preview (counted), never a result."""
        cfg = self.cfg.publish.preview
        now = time.monotonic()
        if result.verdict == Verdict.OK:
            if now - stats.last_ok_preview < 1.0 / cfg.max_fps:
                return
            stats.last_ok_preview = now
        frame = result.frame
        try:
            if frame.image is None:  # an ERROR without a picture: nothing to show beyond the result
                return
            ignore = mask_for(result.model.ignore_masks.get(frame.camera) or self.worker.ignore_masks.get(frame.camera))
            shown = frame.image if ignore is None else ignore.outline(frame.image)  # the ignored area, hatched
            jpeg, (width, height) = encode_preview_jpeg(shown, cfg.width, cfg.jpeg_quality)
            heat_png, heatmap = None, None
            if result.anomaly_map is not None:
                pixel = result.model.thresholds["pixel"]
                if pixel is not None and np.isfinite(pixel) and pixel > 0:
                    scale = 2.0 * float(pixel)  # the mask is about where the heat map is >= 128
                else:
                    scale = max(float(np.max(result.anomaly_map)), 1e-12)
                heat_png, (hw, hh) = encode_heatmap_png(result.anomaly_map, cfg.heatmap_size, scale)
                heatmap = {"width": hw, "height": hh, "scale": scale, "pixel_threshold": pixel}
            fields = {
                "camera": frame.camera,
                "seq": header["seq"],
                "frame_time": frame.captured_wall,
                "frame_index": frame.index,
                "verdict": result.verdict,
                "image_score": result.score,
                "image": {"width": width, "height": height},
                "heatmap": heatmap,
            }
            preview = PreviewHeader.model_validate(fields).model_dump(mode="json")
        except Exception:
            stats.previews_dropped += 1
            log.exception("camera %s seq %d: preview not built", frame.camera, header["seq"])
            return
        if self.publisher.publish_preview(preview, jpeg, heat_png):
            stats.previews += 1
        else:
            stats.previews_dropped += 1

    def _send_or_error(self, result: Result, seq: int) -> tuple[Result, dict[str, Any], bytes | None] | None:
        """Publish `result`; when it cannot be (no valid header, mask not encodable: a bug), publish an ERROR
        result for its frame instead, with the reason, so the frame and its trigger still get an answer.
        (result as published, header as sent, mask PNG), or None when nothing went out."""
        frame = result.frame
        try:
            return self._send(result, seq)
        except Exception as exc:  # logged with its traceback: the result is replaced, the bug must be found
            log.exception("camera %s: result of frame %d cannot be published; sending ERROR", frame.camera, frame.index)
            reason = f"result could not be published ({type(exc).__name__}: {exc})"[:MAX_REASON_CHARS]
        error = Result(frame, Verdict.ERROR, result.model, reason=reason)
        try:
            return self._send(error, seq)
        except Exception:
            log.exception(
                "camera %s: not even an ERROR result for frame %d could be published", frame.camera, frame.index
            )
            return None

    def _send(self, result: Result, seq: int) -> tuple[Result, dict[str, Any], bytes | None] | None:
        """(result, header as sent, mask PNG), or None when the socket refused it: `seq` is used only if it went
        out. Raises when the result has no valid header or mask."""
        mask_png, mask_size = self._encode_mask(result)
        header = self.publisher.publish_result(result_header(result, seq, mask_size), mask_png)
        return None if header is None else (result, header, mask_png)

    def _encode_mask(self, result: Result) -> tuple[bytes | None, tuple[int, int] | None]:
        """(PNG, (width, height)) of the judged mask at the configured size; (None, None) without one."""
        mask_cfg = self.cfg.publish.mask
        if not mask_cfg.enabled or result.judgement is None:
            return None, None
        mask = result.judgement.mask
        size = (mask_cfg.width or mask.shape[1], mask_cfg.height or mask.shape[0])
        return encode_mask_png(mask, size), size

    def _count_published(
        self, result: Result, stats: CameraStats, header: dict[str, Any], mask_png: bytes | None
    ) -> None:
        frame = result.frame
        now = time.monotonic()
        latency = now - frame.captured_mono
        stats.record(result.verdict, latency, now)
        self._watch_drift(result)
        if frame.future is not None:
            _resolve(frame.future, {"header": header, "mask": mask_png})
        archived = self._archive(result, stats.seq, mask_png, header)
        if self.history is not None:  # never blocks: a full writer queue counts the record as lost
            self.history.submit(header, archived)
        if self.metrics:
            self.metrics.verdicts.labels(frame.camera, result.verdict).inc()
            self.metrics.latency.labels(frame.camera).observe(latency)
        if result.verdict == Verdict.ERROR:
            log.debug("camera %s seq %d: ERROR: %s", frame.camera, stats.seq, result.reason)

    def _count_dropped(self, result: Result, stats: CameraStats) -> None:
        stats.publish_dropped += 1
        result.frame.fail_trigger("result could not be published")
        if self.metrics:
            self.metrics.publish_drops.labels(result.frame.camera).inc()

    def _archive(self, result: Result, seq: int, mask_png: bytes | None, header: dict[str, Any]) -> str | None:
        """Queue the result for the archive; the file name its frame will have (for the history), if any."""
        if self.archive is None or result.verdict not in self.cfg.archive.verdicts:
            return None
        frame, now = result.frame, time.time()  # a full queue and failed writes are counted by the archive
        if not self.archive.submit(frame.camera, seq, result.verdict, frame.image, mask_png, header, now):
            return None
        return None if frame.image is None else entry_name(frame.camera, seq, result.verdict, now) + ".png"

    def handle_trigger(self, camera: str, part_id: str) -> TriggerFuture:
        """Trigger server callback: the next frame captured from `camera` is inspected for `part_id`."""
        if self.stopping:
            raise LinewatchError("daemon is stopping")
        cam = self.cameras.get(camera)
        if cam is None:
            raise LinewatchError(f"unknown camera {camera!r} (known: {', '.join(self.cameras)})")
        if cam.state == FINISHED:
            raise LinewatchError(f"camera {camera!r} has finished its source")
        future: TriggerFuture = Future()
        cam.request_trigger(part_id, future)
        return future

    # --- recipes and golden sets (linewatch/line/recipes.py, linewatch/verify.py) ---------------------------
    def handle_control(self, request: dict[str, Any]) -> Future[dict[str, Any]]:
        """Trigger server callback for `recipe` and `verify` requests: the work (a golden set, a drift design)
        runs on a thread of its own; the future resolves to the reply's payload."""
        if self.stopping:
            raise LinewatchError("daemon is stopping")
        future: Future[dict[str, Any]] = Future()
        future.set_running_or_notify_cancel()

        def work() -> None:
            try:
                if request["request"] == "recipe":
                    future.set_result(self.switch_recipe(str(request["recipe"]), bool(request.get("force"))))
                else:
                    future.set_result(self.run_verify())
            except BaseException as exc:  # a bug: the request gets `failed` with the text, the daemon goes on
                log.exception("%s request failed", request["request"])
                future.set_exception(exc)

        threading.Thread(target=work, name=f"{request['request']}-request", daemon=True).start()
        return future

    def switch_recipe(self, name: str, force: bool = False) -> dict[str, Any]:
        """Switch to a preloaded recipe between batches, after its golden set passed (unless forced); refused
        (the recipe running stays) for an unknown or broken recipe or a failed golden set."""
        t0 = time.monotonic()
        with self.swap_lock:
            old = self.model
            try:
                if self.reloading is not None:
                    raise RecipeRefused("a reload is in progress: try again when it is done")
                model = self.recipes.get(name)
                golden = None
                if model is not old:
                    force = force or self.cfg.verify.force_swaps
                    golden = self._golden_gate(model, f"switch to recipe {name}", force, self.cfg)
                    plan = self.recipes.drift_plans.get(name) or self._drift_plan(model)
                    self.model = model
                    self.worker.model = model  # taken by the next batch; the one running finishes with the old
                    self.drift = self._drift_watches(model, plan)
                    self.recipes.active = name
                    if self.metrics:
                        self.metrics.set_model(model)
            except RecipeRefused as exc:
                log.error("recipe switch to %r refused, keeping recipe %s: %s", name, old.recipe, exc)
                if self.metrics:
                    self.metrics.recipe_switches.labels("refused").inc()
                return {"ok": False, "code": "refused", "error": str(exc), "recipe": old.recipe, "golden": exc.golden}
        switch_ms = (time.monotonic() - t0) * 1000
        log.info(
            "recipe %s -> %s (model %s, calibration %s) in %.1f ms%s",
            old.recipe,
            name,
            model.model_id,
            model.calibration_version,
            switch_ms,
            "" if golden is None else f", golden set {'passed' if golden['passed'] else 'FAILED (forced)'}",
        )
        if self.metrics:
            self.metrics.recipe_switches.labels("ok").inc()
        return {"ok": True, "recipe": name, "previous": old.recipe, "switch_ms": round(switch_ms, 3), "golden": golden}

    def run_verify(self) -> dict[str, Any]:
        """`verify` request (a PLC at shift start): the active recipe's golden set, judged by its model; the
        outcome goes to the status topic (`golden`), the metrics and the log."""
        from linewatch.verify import verify_model

        with self.swap_lock:
            model = self.model
            golden = self.recipes.golden(model.recipe)
            if golden is None:
                return {
                    "ok": False,
                    "code": "refused",
                    "error": f"recipe {model.recipe!r} has no golden set (model.golden or recipes.<name>.golden)",
                    "recipe": model.recipe,
                }
            try:
                report = verify_model(model, golden, list(self.cameras), self.worker.ignore_masks)
            except LinewatchError as exc:  # a golden set that cannot be read fails the check
                log.error("verify: golden set %s of recipe %s cannot be judged: %s", golden, model.recipe, exc)
                self._record_golden({"recipe": model.recipe, "golden": str(golden), "passed": False, "error": str(exc)})
                return {"ok": False, "code": "verify_failed", "error": str(exc), "recipe": model.recipe}
            summary = report.summary()
            self._record_golden(summary)
        (log.info if report.passed else log.error)("verify: %s", report.one_line())
        if report.passed:
            return {"ok": True, "recipe": model.recipe, "verify": summary}
        return {
            "ok": False,
            "code": "verify_failed",
            "error": report.one_line(),
            "recipe": model.recipe,
            "verify": summary,
        }

    def _golden_gate(self, model: Model, what: str, force: bool, cfg: Config) -> dict[str, Any] | None:
        """Before `model` goes live (start, reload, recipe switch): its recipe's golden set must pass, unless
        forced. Returns the check's summary (None without a golden set); RecipeRefused when it failed."""
        from linewatch.verify import GoldenFailed, check_golden

        golden = cfg.model.golden if model.recipe == "default" else cfg.recipes[model.recipe].golden
        masks = {c.name: c.ignore_mask for c in cfg.cameras if c.ignore_mask}
        try:
            report = check_golden(model, golden, [c.name for c in cfg.cameras], force, masks)
        except GoldenFailed as exc:
            self._record_golden(exc.report.summary())
            raise RecipeRefused(f"{what}: {exc}", exc.report.summary()) from None
        except LinewatchError as exc:
            self._record_golden({"recipe": model.recipe, "golden": str(golden), "passed": False, "error": str(exc)})
            raise RecipeRefused(f"{what}: {exc}") from None
        if report is None:
            return None
        summary = report.summary()
        self._record_golden(summary)
        return summary

    def _record_golden(self, summary: dict[str, Any]) -> None:
        shown = dict(summary)
        if len(shown.get("failed", [])) > STATUS_GOLDEN_FAILURES:
            shown["failed"] = shown["failed"][:STATUS_GOLDEN_FAILURES]
        self.last_golden = shown
        metrics = getattr(self, "metrics", None)  # None before start(): the start's check is set in start()
        if metrics is not None:
            metrics.set_golden(summary["recipe"], bool(summary["passed"]))

    # --- status, health, systemd ------------------------------------------------------------------------
    def camera_status(self, name: str, now: float) -> dict[str, Any]:
        cam, stats = self.cameras[name], self.stats[name]
        fps, p50, p99 = stats.fps_and_latency(now)
        return {
            "state": cam.state,
            "fps": round(fps, 2),
            "captured": cam.captured,
            "results": stats.seq,
            "dropped": self.queue.dropped[name],
            "dropped_as_error": self.queue.dropped_as_error[name],
            "publish_dropped": stats.publish_dropped,
            "previews": stats.previews,
            "previews_dropped": stats.previews_dropped,
            "skipped": cam.skipped,
            "frame_errors": cam.frame_errors,
            "reconnects": cam.reconnects,
            "verdicts": dict(stats.verdicts),
            "latency_ms": {"p50": _round(p50), "p99": _round(p99)},
            "last_error": cam.last_error,
            "model_id": self.model.model_id,
            "calibration_version": self.model.calibration_version,
            "healthy": self.unhealthy_reason is None,
            "unhealthy_reason": self.unhealthy_reason,
            "stopping": self.stopping,
            "drift": self.drift[1][name].snapshot(),
            "recipe": self.model.recipe,
            "recipes": self.recipes.summary(),
            "golden": self.last_golden,
            "history": None if self.history is None else self.history.status(name),  # docs/HISTORY.md
            "camera_settings": cam.settings.report(),  # docs/CAMERAS.md: {property: {set, read, state}}
            "gated": {} if cam.gate is None else cam.gate.snapshot(),  # frames gated (ERROR) by reason
            "engine": engine_status(self.model.engine),  # docs/PROTOCOL.md: a remote engine's state
        }

    # --- drift watch (linewatch/line/drift.py) ---------------------------------------------------------------
    def _drift_plan(self, model: Model) -> DriftDesign | str:
        """The CUSUM design for a model's calibration (exact ARL solves: up to ~1 s, so reloads do it on their
        thread), or why drift is not watched."""
        d = self.cfg.drift
        if not d.enabled:
            return "drift watch disabled (drift.enabled: false)"
        if model.calibration is None:
            return "no calibration"
        try:
            scores = calibration_scores(model.calibration)
            return drift_design(scores, d.quantile, d.detect_rate, d.confidence, d.warn_arl0, d.alarm_arl0)
        except Exception as exc:  # a design that cannot be made must never stop inspection
            log.exception("drift watch unavailable")
            return f"drift watch design failed: {exc}"

    def _drift_watches(self, model: Model, plan: DriftDesign | str) -> tuple[Model, dict[str, DriftWatch]]:
        if isinstance(plan, str):
            log.info("drift watch unavailable: %s", plan)
        else:
            log.info(
                "drift watch: parts outside scores %.6g..%.6g (%d good scores) count; warn at %.2f, alarm at %.2f "
                "(exact ARL0 %.3g and %.3g parts at outside rate <= %.3f, confidence %.2f)",
                plan.low,
                plan.high,
                plan.n_good,
                plan.warn_at * plan.unit,
                plan.alarm_at * plan.unit,
                plan.warn_arl0,
                plan.alarm_arl0,
                plan.p0,
                self.cfg.drift.confidence,
            )
        return model, {name: DriftWatch(plan) for name in self.cameras}

    def _watch_drift(self, result: Result) -> None:
        """Publishing thread: OK/NOK parts judged by the model the watches belong to; log each change of state."""
        model, watches = self.drift
        if result.verdict == Verdict.ERROR or result.score is None or result.model is not model:
            return
        change = watches[result.frame.camera].update(result.score)
        if change is None:
            return
        old, new = change
        stat = watches[result.frame.camera].snapshot()
        if new == OK:
            log.info("camera %s: drift %s -> ok (statistic %.2f)", result.frame.camera, old, stat["statistic"])
        else:
            (log.error if new == ALARM else log.warning)(
                "camera %s: drift %s -> %s (statistic %.2f, %s at %.2f; of %d parts, %d scored above and %d below "
                "the good parts' band %.4g..%.4g): %s",
                result.frame.camera,
                old,
                new,
                stat["statistic"],
                new,
                stat["alarm_at" if new == ALARM else "warn_at"],
                stat["parts"],
                stat["above"],
                stat["below"],
                *stat["band"],
                stat["advice"],
            )

    def _drift_gauges(self) -> dict[str, tuple[int, float]]:
        return {name: watch.gauge() for name, watch in self.drift[1].items()}

    def _camera_totals(self) -> dict[str, dict[str, int]]:
        return {
            name: {
                "captured": cam.captured,
                "reconnects": cam.reconnects,
                "frame_errors": cam.frame_errors,
                "dropped": self.queue.dropped[name],
            }
            for name, cam in self.cameras.items()
        }

    def publish_status(self) -> None:
        now = time.monotonic()
        for name, cam in self.cameras.items():
            status = self.camera_status(name, now)
            try:
                with self.publish_lock:  # one thread at a time on the ZeroMQ socket
                    self.publisher.publish_status(name, status)
            except Exception:
                log.exception("status for camera %s not published", name)
            if self.metrics:
                self.metrics.set_camera_state(name, status["state"])
        if self.metrics:
            version = self.model.calibration_version
            self.metrics.calibration_version.set(-1 if version is None else version)

    def health(self) -> str | None:
        """None when the pipeline moves and every long-lived thread runs; otherwise why systemd should restart us."""
        h = self.cfg.health
        if not self.worker.alive:
            return "inference thread has died"
        if not self.outbox.alive:
            return "publishing thread has died"
        stall = self.worker.stall_reason(h.inference_stall_s, self.queue.pending())
        if stall is not None:
            return stall
        for cam in self.cameras.values():
            if not cam.alive and cam.state != FINISHED:
                return f"capture thread of camera {cam.name} has died"
            blocked = cam.blocked_for()
            if blocked > h.camera_hang_s:
                return f"camera {cam.name}: capture call blocked for {blocked:.0f} s"
        for name, part in self._threaded_parts():
            try:
                reason = part.health()
            except Exception as exc:  # a check that cannot tell is not a pass
                log.exception("health check of the %s failed", name)
                reason = f"health check failed: {exc}"
            if reason is not None:
                return reason if reason.startswith(name) else f"{name}: {reason}"
        return None

    def _threaded_parts(self) -> list[tuple[str, HealthReporter]]:
        """The parts with their own threads besides inference, publishing and capture (None: not configured)."""
        parts: list[tuple[str, HealthReporter | None]] = [
            ("result publisher", self.publisher),  # its CURVE authenticator
            ("trigger server", self.trigger),
            ("archive", self.archive),
            ("history", self.history),
            ("metrics server", self.metrics),
            ("remote engine", self.model.engine if hasattr(self.model.engine, "health") else None),  # type: ignore[list-item]
        ]
        return [(name, part) for name, part in parts if part is not None]

    def _systemd_status(self) -> str:
        states: dict[str, list[str]] = {}
        for cam in self.cameras.values():
            states.setdefault(cam.state, []).append(cam.name)
        parts = [f"{k}: {','.join(v)}" for k, v in sorted(states.items())]
        cal = self.model.calibration_version
        text = f"model {self.model.model_id} cal {cal if cal is not None else 'NONE'}; " + "; ".join(parts)
        engine = engine_status(self.model.engine)
        if engine["state"] != "online":  # an outage is reported, not a reason to be restarted
            text = f"engine {engine['state']} ({engine.get('last_error')}); {text}"
        return text if self.unhealthy_reason is None else f"UNHEALTHY ({self.unhealthy_reason}); {text}"

    # --- reload -----------------------------------------------------------------------------------------
    def start_reload(self) -> None:
        """SIGHUP: load the config's model section on a thread of its own (engine build and warm-up only for a new
        graph); the main loop goes on publishing status and pinging the watchdog, and `finish_reload` swaps the
        model in once loaded."""
        self.notifier.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        future: Future[tuple[Config, Model]] = Future()
        future.set_running_or_notify_cancel()

        def load() -> None:
            try:
                future.set_result(self._load_for_reload())
            except BaseException as exc:  # every failure refuses the reload; the old model stays
                future.set_exception(exc)

        self.reloading = future
        threading.Thread(target=load, name="reload", daemon=True).start()
        log.info("reload: loading %s", self.cfg.path)

    def _load_for_reload(self) -> tuple[Config, Model]:
        """The new config and model, all checked (the reload thread); raises when the reload must be refused."""
        if self.cfg.path is None:
            raise ConfigError("the config was not read from a file: nothing to reload")
        new_cfg = load_config(self.cfg.path)
        changed = [
            name
            for name in Config.model_fields
            if name not in RELOADED and getattr(new_cfg, name) != getattr(self.cfg, name)
        ]
        if changed:
            log.warning(
                "reload: changes to %s need a restart; only %s are reloaded", ", ".join(changed), ", ".join(RELOADED)
            )
        # the config's recipe when it changed, else the one running (a PLC's choice survives a recalibration)
        active = new_cfg.recipe if new_cfg.recipe != self.cfg.recipe else self.recipes.active
        # same graph: only the calibration changes, swapped in without a warm-up
        book = RecipeBook.load(new_cfg, self._load_model, active, self.recipes, require_active_calibration=True)
        model = book.models[active]
        self._golden_gate(model, "reload", new_cfg.verify.force_swaps, new_cfg)
        book.drift_plans = {n: self._drift_plan(m) for n, m in book.models.items()}
        self._reload_recipes = book
        self._reload_drift_plan = book.drift_plans[active]
        return new_cfg, model

    def _load_model(self, bundle_dir: Path, precision: str, require_calibration: bool, reuse: Model | None) -> Model:
        """One recipe's model with this daemon's engine settings (a change of those needs a restart)."""
        cfg = self.cfg
        return load_model(
            bundle_dir,
            cfg.engine.providers,
            cfg.engine.threads,
            precision,
            cfg.engine.max_batch,
            require_calibration=require_calibration,
            warmup=cfg.engine.warmup,
            trt_cache_dir=trt_cache_dir(cfg),
            reuse=reuse,
            remote=cfg.engine,  # engine.backend: triton -> linewatch/line/remote_engine.py
        )

    def finish_reload(self) -> bool | None:
        """Main loop: once the reload thread is done, swap the new model in (True) or keep the old one (False);
        None while it still loads or when no reload runs."""
        future = self.reloading
        if future is None or not future.done():
            return None
        self.reloading = None
        try:
            new_cfg, model = future.result()
        except BaseException as exc:
            log.error(
                "reload refused, keeping model %s calibration %s: %s",
                self.model.model_id,
                self.model.calibration_version,
                exc,
            )
            if self.metrics:
                self.metrics.reloads.labels("refused").inc()
            self.notifier.notify("READY=1")
            return False
        old = self.model
        self.model = model
        self.worker.model = model  # taken by the next batch; the one running finishes with the old model
        self.cfg = self.cfg.model_copy(update={name: getattr(new_cfg, name) for name in RELOADED})
        if self._reload_recipes is not None:
            self.recipes, self._reload_recipes = self._reload_recipes, None
        plan = self._reload_drift_plan if self._reload_drift_plan is not None else self._drift_plan(model)
        self.drift = self._drift_watches(model, plan)  # a new calibration: the watch starts afresh
        log.info(
            "reloaded: model %s -> %s, calibration %s -> %s",
            old.model_id,
            model.model_id,
            old.calibration_version,
            model.calibration_version,
        )
        self._check_batch_time(model)
        if self.metrics:
            self.metrics.reloads.labels("ok").inc()
            self.metrics.set_model(model)
        self.notifier.notify("READY=1")
        return True

    def _check_batch_time(self, model: Model) -> None:
        """Warn when warm-up measured a batch slower than health.inference_stall_s: the stall limit then follows
        the measured time (a slow CPU is not a hang), and the setting is worth raising."""
        configured = self.cfg.health.inference_stall_s
        if model.batch_s is not None and model.batch_s > configured:
            log.warning(
                "a warm batch of %d took %.2f s, longer than health.inference_stall_s (%.1f s): the stall limit "
                "follows the measured batch time (at least %.1f s now); raise inference_stall_s or lower "
                "engine.max_batch",
                self.cfg.engine.max_batch,
                model.batch_s,
                configured,
                max(configured, STALL_FACTOR * model.batch_s),
            )

    # --- main loop and shutdown -------------------------------------------------------------------------
    def run(self) -> int:
        try:
            self.start()
        except BaseException:
            self.stopping = True
            for cam in self.cameras.values():
                cam.stop()
            self._close_sockets()
            raise
        self.notifier.notify("READY=1")
        interval = self.cfg.publish.status_interval_s
        ping_every = _watchdog_interval(interval)
        next_status = next_ping = time.monotonic()
        while not self.stop_requested.wait(TICK_S):
            now = time.monotonic()
            if self.swap_lock.acquire(blocking=False):  # never swaps under a recipe switch or verify; never waits
                try:
                    self.finish_reload()
                finally:
                    self.swap_lock.release()
            # one at a time; a later SIGHUP waits, as it does for a recipe switch or verify running
            if self.reload_requested.is_set() and self.reloading is None and not self.swap_lock.locked():
                self.reload_requested.clear()
                self.start_reload()
            for cam in self.cameras.values():
                cam.expire_triggers(self.cfg.trigger.timeout_s)
            if now >= next_ping:
                next_ping = now + ping_every
                self._watchdog()
            if now >= next_status:
                next_status = now + interval
                self.publish_status()
                self.notifier.notify("STATUS=" + self._systemd_status())
            if self.cfg.health.exit_when_sources_end and self._all_finished():
                log.info("all sources finished; stopping")
                break
        return self.shutdown()

    def _watchdog(self) -> None:
        """WATCHDOG=1 only while healthy; the reason otherwise goes to the log (on change) and the status."""
        reason = self.health()
        if (reason is None) != (self.unhealthy_reason is None):
            if reason:
                log.error("unhealthy, watchdog pings stopped: %s", reason)
            else:
                log.info("healthy again, watchdog pings resumed")
        self.unhealthy_reason = reason
        if reason is None:
            self.notifier.notify("WATCHDOG=1")

    def _all_finished(self) -> bool:
        return all(c.state == FINISHED for c in self.cameras.values()) and self.queue.pending() == 0

    def shutdown(self) -> int:
        """Stop capture, inspect and publish what was captured within health.drain_timeout_s, publish the rest as
        ERROR ("shutdown: not inspected"): every captured frame gets exactly one message. Status keeps its interval
        meanwhile (the life bit). Exit 0, or EXIT_UNANSWERED when some frame's message could not be sent."""
        self.stopping = True
        self.notifier.notify("STOPPING=1")
        t0 = time.monotonic()
        deadline = t0 + self.cfg.health.drain_timeout_s
        unsendable = self._publish_drops()
        self._next_drain_status = t0
        for cam in self.cameras.values():
            cam.stop()
        # capture threads get a moment even with no drain time: a frame they queue later would get no message
        self._drain_until(max(deadline, t0 + 0.2), lambda: not any(cam.alive for cam in self.cameras.values()))
        for cam in self.cameras.values():
            if cam.alive:
                log.warning("camera %s: capture call still blocked at shutdown", cam.name)
            cam.fail_pending_triggers("daemon stopping: no frame was taken for this request")
        self.worker.drain()
        if self._drain_until(deadline, lambda: not self.worker.alive):
            self.outbox.close()
            self._drain_until(deadline, lambda: not self.outbox.alive)
        answered = self._answer_the_rest()
        if answered:
            log.warning(
                "drain timeout (%.1f s): %d frames not inspected in time, published as ERROR",
                self.cfg.health.drain_timeout_s,
                answered,
            )
        unsendable = self._publish_drops() - unsendable
        self.publish_status()  # final counts: captured == results + publish_dropped + dropped + skipped
        totals = {n: self.camera_status(n, time.monotonic()) for n in self.cameras}
        for name, st in totals.items():
            log.info(
                "camera %s: captured %d, results %d (publish dropped %d), dropped %d, skipped %d",
                name,
                st["captured"],
                st["results"],
                st["publish_dropped"],
                st["dropped"],
                st["skipped"],
            )
        self._close_sockets()
        log.info("stopped in %.2f s", time.monotonic() - t0)
        if unsendable:
            log.error("%d frames captured before the stop got no message: the socket refused them", unsendable)
            return EXIT_UNANSWERED
        return 0

    def _drain_until(self, deadline: float, done: Callable[[], bool]) -> bool:
        """Wait for `done` until `deadline`, publishing status (stopping: true) at its interval meanwhile."""
        while not done():
            now = time.monotonic()
            if now >= deadline:
                return False
            if now >= self._next_drain_status:
                self._next_drain_status = now + self.cfg.publish.status_interval_s
                self.publish_status()
                self.notifier.notify("STATUS=stopping: " + self._systemd_status())
            for cam in self.cameras.values():
                cam.expire_triggers(self.cfg.trigger.timeout_s)
            time.sleep(min(TICK_S, max(0.0, deadline - now)))
        return True

    def _answer_the_rest(self) -> int:
        """After the drain: results already made are published, every other frame without a message (being scored,
        being published, still queued) goes out as ERROR, per camera in capture order. Returns how many ERRORs."""
        with self.publish_lock:
            self.abandoned = True  # the inference and publishing threads, if still busy, publish nothing more
            for result in self.outbox.abandon():
                if not self.queue.is_settled(result.frame):
                    self._publish_guarded(result)
            left = self.queue.unanswered()
            for frame in left:
                reason = frame.error if frame.error == DROPPED_REASON else SHUTDOWN_REASON
                self._publish_guarded(Result(frame, Verdict.ERROR, self.model, reason=reason))
        return len(left)

    def _publish_guarded(self, result: Result) -> None:
        try:
            self._publish_one(result)
        except Exception:  # a bug past every guard in there: logged, and the other frames still get theirs
            log.exception("camera %s: result of frame %d lost", result.frame.camera, result.frame.index)

    def _publish_drops(self) -> int:
        return sum(stats.publish_dropped for stats in self.stats.values())

    def _close_sockets(self) -> None:
        if self.trigger is not None:
            self.trigger.close()
        self.publisher.close()
        if self.archive is not None:
            self.archive.close()
        if self.history is not None:
            self.history.close()  # writes what is queued (a few seconds at most)
        if self.metrics is not None:
            self.metrics.close()
        self.notifier.close()


def trt_cache_dir(cfg: Config) -> Path | None:
    """Where TensorRT engines are cached: the config's folder, else systemd's state directory, so the service never
    writes into its (read-only) bundle; None (the bundle) when run by hand without either."""
    if cfg.engine.trt_cache_dir is not None:
        return cfg.engine.trt_cache_dir
    state = os.environ.get("STATE_DIRECTORY")  # systemd: a colon-separated list, ours first
    return Path(state.split(":")[0]) / "trt_cache" if state else None


def _watchdog_interval(status_interval: float) -> float:
    usec = os.environ.get("WATCHDOG_USEC")
    try:
        half = int(usec) / 2e6 if usec else None
    except ValueError:
        half = None
    return min(status_interval, half) if half else status_interval


def _resolve(future: TriggerFuture, value: dict[str, Any]) -> None:
    """Hand a result to a trigger request, unless it was cancelled meanwhile (trigger timeout)."""
    try:
        future.set_result(value)
    except InvalidStateError:
        pass


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def cli_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    logging.getLogger().setLevel(getattr(logging, cfg.logging.level))
    if getattr(args, "verbose", False):
        logging.getLogger().setLevel(logging.DEBUG)
    daemon = Daemon(cfg)

    def on_term(signum: int, _frame: FrameType | None) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        daemon.stop_requested.set()

    def on_hup(_signum: int, _frame: FrameType | None) -> None:
        daemon.reload_requested.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_hup)
    code = daemon.run()
    if daemon.worker.alive or daemon.outbox.alive or (daemon.reloading is not None and not daemon.reloading.done()):
        # The engine is stuck in native code: a normal interpreter exit would wait on (or abort in) it.
        logging.shutdown()
        os._exit(code)
    return code
