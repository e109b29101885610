"""What the operator's page shows, as a pure model fed by decoded protocol Messages.

No sockets, threads or clocks of its own: the caller passes `now` (monotonic seconds) and gets back the events to
push to browsers, so every rule here (counts, trend, gallery, banners, the life bit) is unit-testable from real
encoded messages. Everything held is bounded: the trend keeps `history` parts per camera, previews (JPEG + heat
map) are kept for the last `previews` parts per camera, the gallery for the last `gallery` NOK/ERROR parts.
"""

from __future__ import annotations

import statistics
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from linewatch.protocol.client import CameraTrack
from linewatch.protocol.wire import PREVIEW, RESULT, STATUS, Message

VERDICTS = ("OK", "NOK", "ERROR")
DEFAULT_STATUS_INTERVAL_S = 1.0  # PROTOCOL.md's default publish.status_interval_s
LIFE_BIT_INTERVALS = 3  # PROTOCOL.md: no status for 3 intervals means the daemon (or the network) is gone
HOUR_S = 3600.0
MINUTE_S = 60.0
RECENT = 12  # recent parts with a preview listed for opening (OK parts can be marked "missed defect" from there)
DRIFT_ADVICE = (
    "the scores have moved away from the calibration's good parts: check lighting, focus and the camera, "
    "then recalibrate on current good parts (linewatch calibrate)"
)

Event = tuple[str, dict[str, Any]]  # (SSE event name, JSON data)


def iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def part_links(camera: str, seq: int) -> dict[str, str]:
    base = f"{camera}/{seq}"
    return {
        "frame": f"/api/frame/{base}.jpg",
        "heatmap": f"/api/heatmap/{base}.png",
        "mask": f"/api/mask/{base}.png",
        "part": f"/api/part/{base}",
    }


def reason(header: dict[str, Any]) -> str:
    """Why the part got its verdict, in the operator's words (from the published header only)."""
    verdict, score = header.get("verdict"), header.get("image_score")
    thresholds = header.get("thresholds") or {}
    pixel, image = thresholds.get("pixel"), thresholds.get("image")
    if verdict == "ERROR":
        return f"not inspected: {header.get('error') or 'no reason given'}"
    defects = [r for r in header.get("regions") or [] if r.get("defect")]
    n_defects = header.get("defect_regions")
    if verdict == "NOK":
        if defects or n_defects:
            big = defects[0] if defects else None
            where = ""
            if big is not None:
                x, y, w, h = big["bbox"]
                where = f"; largest {big['area']} px at x={x} y={y} ({w}×{h}), peak {big['peak']:.4g}"
            count = n_defects if n_defects is not None else len(defects)
            return f"{count} defect region(s) above the pixel threshold {_num(pixel)}{where}"
        if image is not None and score is not None and score > image:
            return f"image score {_num(score)} above the image threshold {_num(image)}"
        return f"NOK (image score {_num(score)})"
    specks = header.get("regions_total") or 0
    if specks:
        return (
            f"image score {_num(score)}; {specks} speck(s) above the pixel threshold {_num(pixel)}, "
            "none large enough to fail the part"
        )
    return f"image score {_num(score)}, nothing above the pixel threshold {_num(pixel)}"


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}"


@dataclass(eq=False)  # identity: a part is the same part, never equal by content
class Part:
    """One result as the dashboard holds it, with its preview once that arrives."""

    camera: str
    seq: int
    run_id: str | None
    header: dict[str, Any]
    mask: bytes | None
    received: float  # wall time
    preview: dict[str, Any] | None = None
    jpeg: bytes | None = None
    heatmap: bytes | None = None

    def summary(self) -> dict[str, Any]:
        h = self.header
        return {
            "camera": self.camera,
            "seq": self.seq,
            "run_id": self.run_id,
            "verdict": h.get("verdict"),
            "image_score": h.get("image_score"),
            "part_id": h.get("part_id"),
            "time": iso(h.get("publish_time") or self.received),
            "reason": reason(h),
            "has_preview": self.jpeg is not None,
            "links": part_links(self.camera, self.seq),
        }


@dataclass
class CameraView:
    name: str
    history: int
    run_id: str | None = None
    latest: Part | None = None
    latest_preview: Part | None = None
    status: dict[str, Any] | None = None
    status_heard: float | None = None  # monotonic, when the last status arrived
    first_heard: float = 0.0  # monotonic, when this camera was first seen (the life bit's grace before a status)
    status_times: deque[float] = field(default_factory=lambda: deque(maxlen=6))  # publish_time of recent statuses
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VERDICTS, 0))  # received here
    unconfirmed: deque[tuple[int, str]] = field(default_factory=lambda: deque(maxlen=100_000))  # since the status
    minutes: deque[list[Any]] = field(default_factory=deque)  # [minute index, {verdict: n}], last hour
    # (x, seq, score, verdict, pixel threshold, image threshold)
    trend: deque[tuple[int, int, float | None, str, float | None, float | None]] = field(init=False)
    parts: OrderedDict[int, Part] = field(default_factory=OrderedDict)  # by seq, the last `history` results
    previewed: deque[int] = field(default_factory=deque)  # seqs whose preview is held, oldest first
    track: CameraTrack = field(default_factory=CameraTrack)
    x: int = 0  # results received: the trend's x axis (seq restarts with the daemon)

    def __post_init__(self) -> None:
        self.trend = deque(maxlen=self.history)


class DashboardState:
    """Per camera: latest result and status, counts, trend, held parts; across cameras: gallery, recent, banners.

    `on_message(msg, now)` and `tick(now)` return the events for the page: `result`, `status`, `preview` and
    `banner` (a banner event carries `active`: false when its condition cleared).
    """

    def __init__(
        self,
        *,
        history: int = 200,
        gallery: int = 24,
        previews: int = 50,
        status_interval_s: float | None = None,
        source: str = "the daemon",
        now: float | None = None,
    ):
        if history < 1 or gallery < 1 or previews < 1:
            raise ValueError("history, gallery and previews must be at least 1")
        self.history, self.gallery_size, self.previews_kept = history, gallery, previews
        self.fixed_interval = status_interval_s
        self.source = source
        self.started = time.monotonic() if now is None else now
        self.cameras: dict[str, CameraView] = {}
        self.gallery: deque[Part] = deque(maxlen=gallery)  # newest first
        self.recent: deque[Part] = deque(maxlen=RECENT)  # newest first, parts with a preview
        self.banners: dict[tuple[str, str], dict[str, Any]] = {}
        self.heard: float | None = None  # monotonic, any message
        self.invalid = 0  # messages the subscriber skipped as malformed (set by the feeder)

    # --- feeding ----------------------------------------------------------------------------------------------
    def on_message(self, msg: Message, now: float) -> list[Event]:
        self.heard = now
        cam = self._camera(msg.camera, now)
        if msg.kind == RESULT:
            events = self._on_result(cam, msg, now)
        elif msg.kind == STATUS:
            events = self._on_status(cam, msg.header, now)
        elif msg.kind == PREVIEW:
            events = self._on_preview(cam, msg)
        else:
            events = []
        return events + self.tick(now)

    def _camera(self, name: str, now: float) -> CameraView:
        if name not in self.cameras:
            self.cameras[name] = CameraView(name, self.history, first_heard=now)
        return self.cameras[name]

    def _on_result(self, cam: CameraView, msg: Message, now: float) -> list[Event]:
        header = msg.header
        seq: int = header["seq"]
        run_id = header.get("run_id")
        if cam.run_id is not None and run_id != cam.run_id:
            self._forget_run(cam)  # the daemon restarted: seq starts at 1 again, old parts cannot be told apart
        cam.run_id = run_id
        cam.track.on_result(seq, run_id)
        verdict: str = header["verdict"]
        part = Part(cam.name, seq, run_id, header, msg.mask, time.time())
        cam.latest = part
        cam.parts[seq] = part
        cam.parts.move_to_end(seq)
        while len(cam.parts) > self.history:
            cam.parts.popitem(last=False)
        cam.counts[verdict] = cam.counts.get(verdict, 0) + 1
        counted = (cam.status or {}).get("results")
        if not (type(counted) is int and (cam.status or {}).get("run_id") == run_id and seq <= counted):
            cam.unconfirmed.append((seq, verdict))  # not yet in the daemon's own counters
        self._count_minute(cam, verdict, now)
        cam.x += 1
        score = header.get("image_score")
        thresholds = header.get("thresholds") or {}
        pixel, image = thresholds.get("pixel"), thresholds.get("image")
        cam.trend.append((cam.x, seq, score, verdict, pixel, image))
        gallery_item = None
        if verdict in ("NOK", "ERROR"):
            self.gallery.appendleft(part)
            gallery_item = part.summary()
        data = self._camera_summary(cam, now)
        data["point"] = {"x": cam.x, "seq": seq, "score": score, "verdict": verdict, "pixel": pixel, "image": image}
        data["gallery_item"] = gallery_item
        return [("result", data)]

    def _forget_run(self, cam: CameraView) -> None:
        cam.parts.clear()
        cam.previewed.clear()
        cam.unconfirmed.clear()
        cam.latest_preview = None
        cam.track = CameraTrack()
        self.gallery = deque((p for p in self.gallery if p.camera != cam.name), maxlen=self.gallery_size)
        self.recent = deque((p for p in self.recent if p.camera != cam.name), maxlen=RECENT)

    def _count_minute(self, cam: CameraView, verdict: str, now: float) -> None:
        minute = int(now // MINUTE_S)
        if not cam.minutes or cam.minutes[-1][0] != minute:
            cam.minutes.append([minute, dict.fromkeys(VERDICTS, 0)])
        cam.minutes[-1][1][verdict] = cam.minutes[-1][1].get(verdict, 0) + 1
        self._prune_minutes(cam, now)

    @staticmethod
    def _prune_minutes(cam: CameraView, now: float) -> None:
        first = int(now // MINUTE_S) - int(HOUR_S // MINUTE_S) + 1  # the last 60 minutes, this one included
        while cam.minutes and cam.minutes[0][0] < first:
            cam.minutes.popleft()

    def _on_status(self, cam: CameraView, status: dict[str, Any], now: float) -> list[Event]:
        if cam.status is not None and status.get("run_id") != cam.status.get("run_id"):
            cam.status_times.clear()
        cam.status = status
        cam.status_heard = now
        results = status.get("results")
        if type(results) is int:
            while cam.unconfirmed and cam.unconfirmed[0][0] <= results:
                cam.unconfirmed.popleft()
        cam.status_times.append(float(status["publish_time"]))
        cam.track.on_status(status)
        return [("status", self._camera_summary(cam, now))]

    def _on_preview(self, cam: CameraView, msg: Message) -> list[Event]:
        header = msg.header
        seq: int = header["seq"]
        part = cam.parts.get(seq)
        if part is None or part.run_id != header.get("run_id"):
            return []  # its result never arrived (or belongs to another run): nothing to show it with
        part.preview, part.jpeg, part.heatmap = header, msg.image, msg.mask
        cam.previewed.append(seq)
        while len(cam.previewed) > self.previews_kept:
            old = cam.parts.get(cam.previewed.popleft())
            if old is not None and old is not part and old not in self.gallery:
                old.jpeg = old.heatmap = old.preview = None
        cam.latest_preview = part
        self.recent = deque((p for p in self.recent if p is not part), maxlen=RECENT)
        self.recent.appendleft(part)
        data = part.summary()
        data["latest_preview"] = self._preview_view(part)
        data["in_gallery"] = part in self.gallery
        return [("preview", data)]

    # --- time ---------------------------------------------------------------------------------------------------
    def status_interval(self, cam: CameraView) -> float:
        if self.fixed_interval is not None:
            return self.fixed_interval
        times = list(cam.status_times)
        steps = [b - a for a, b in zip(times, times[1:]) if b > a]
        return statistics.median(steps) if steps else DEFAULT_STATUS_INTERVAL_S

    def alive(self, cam: CameraView, now: float) -> bool:
        """A camera first seen through a result has the same grace as one whose status stopped: its first status
        may be up to one interval away, and a banner for that would be a false alarm."""
        heard = cam.first_heard if cam.status_heard is None else cam.status_heard
        return now - heard <= LIFE_BIT_INTERVALS * self.status_interval(cam)

    def tick(self, now: float) -> list[Event]:
        """Banners that follow from the time passing (the life bit) and from the latest status of each camera."""
        events: list[Event] = []
        grace = LIFE_BIT_INTERVALS * (self.fixed_interval or DEFAULT_STATUS_INTERVAL_S)
        silent = self.heard is None and now - self.started > grace
        events += self._banner(
            "lifebit",
            "",
            silent,
            "error",
            f"nothing received from {self.source} for more than {grace:g} s: is the daemon running, is this its "
            "publish.endpoint, are the CURVE keys right?",
        )
        for cam in self.cameras.values():
            interval = self.status_interval(cam)
            missing = not self.alive(cam, now)
            events += self._banner(
                "lifebit",
                cam.name,
                missing,
                "error",
                f"{cam.name}: no life bit (no status for more than {LIFE_BIT_INTERVALS * interval:.2g} s): the daemon "
                "stopped or is unreachable; do not trust this line",
            )
            status = cam.status or {}
            state = status.get("state")
            offline = state is not None and state != "online"
            detail = f": {status['last_error']}" if status.get("last_error") else ""
            events += self._banner("offline", cam.name, offline, "error", f"{cam.name}: camera {state}{detail}")
            raw_engine = status.get("engine")
            engine: dict[str, Any] = raw_engine if isinstance(raw_engine, dict) else {}
            engine_down = engine.get("state") == "offline"  # a remote (Triton) engine: every part is ERROR meanwhile
            events += self._banner(
                "engine",
                cam.name,
                engine_down,
                "error",
                f"{cam.name}: inference server offline ({engine.get('url') or engine.get('backend')})"
                + (f": {engine['last_error']}" if engine.get("last_error") else "")
                + "; every part is published as ERROR until it is back",
            )
            raw = status.get("drift")
            drift: dict[str, Any] = raw if isinstance(raw, dict) else {}
            drift_state = drift.get("state")
            drifting = drift_state in ("warn", "alarm")
            text = ""
            if drifting:
                stat = drift.get("statistic")
                limit = drift.get("alarm_at" if drift_state == "alarm" else "warn_at")
                text = (
                    f"{cam.name}: drift {drift_state}"
                    + (f" since {drift['since']}" if drift.get("since") else "")
                    + (f" (statistic {stat:.3g} ≥ {limit:.3g})" if stat is not None and limit is not None else "")
                    + f": {drift.get('advice') or DRIFT_ADVICE}"
                )
            events += self._banner("drift", cam.name, drifting, "error" if drift_state == "alarm" else "warn", text)
        return events

    def _banner(self, kind: str, camera: str, active: bool, level: str, text: str) -> list[Event]:
        key = (kind, camera)
        current = self.banners.get(key)
        if not active:
            if current is None:
                return []
            del self.banners[key]
            return [("banner", {**current, "active": False})]
        if current is not None and current["text"] == text and current["level"] == level:
            return []
        since = current["since"] if current is not None else iso(time.time())
        banner = {"kind": kind, "camera": camera, "level": level, "text": text, "since": since, "active": True}
        self.banners[key] = banner
        return [("banner", banner)]

    # --- reading ------------------------------------------------------------------------------------------------
    def part(self, camera: str, seq: int) -> Part | None:
        cam = self.cameras.get(camera)
        if cam is not None and seq in cam.parts:
            return cam.parts[seq]
        for part in self.gallery:
            if part.camera == camera and part.seq == seq:
                return part
        return None

    def _preview_view(self, part: Part | None) -> dict[str, Any] | None:
        if part is None or part.jpeg is None:
            return None
        links = part_links(part.camera, part.seq)
        return {
            "seq": part.seq,
            "verdict": part.header.get("verdict"),
            "image_score": part.header.get("image_score"),
            "frame": links["frame"],
            "heatmap": links["heatmap"] if part.heatmap is not None else None,
            "mask": links["mask"] if part.mask is not None else None,
            "image": (part.preview or {}).get("image"),
            "time": iso(part.header.get("publish_time") or part.received),
        }

    def counts(self, cam: CameraView) -> dict[str, int]:
        """Since the daemon started: its own counters (the latest status's `verdicts`, which include results this
        dashboard missed) plus the results received after that status. Before any status: what arrived here."""
        status = cam.status or {}
        verdicts = status.get("verdicts")
        if not isinstance(verdicts, dict) or status.get("run_id") != cam.run_id and cam.run_id is not None:
            return dict(cam.counts)
        totals = {v: int(n) if type(n) is int else 0 for v, n in ((v, verdicts.get(v, 0)) for v in VERDICTS)}
        for _, verdict in cam.unconfirmed:
            totals[verdict] = totals.get(verdict, 0) + 1
        return totals

    def per_hour(self, cam: CameraView, now: float) -> dict[str, int]:
        self._prune_minutes(cam, now)
        totals = dict.fromkeys(VERDICTS, 0)
        for _, counts in cam.minutes:
            for verdict, n in counts.items():
                totals[verdict] = totals.get(verdict, 0) + n
        return totals

    def _camera_summary(self, cam: CameraView, now: float) -> dict[str, Any]:
        latest = cam.latest.header if cam.latest is not None else {}
        status = cam.status or {}
        latency = None
        if latest.get("publish_time") is not None and latest.get("frame_time") is not None:
            latency = (latest["publish_time"] - latest["frame_time"]) * 1000.0
        return {
            "camera": cam.name,
            "run_id": cam.run_id or status.get("run_id"),
            "seq": latest.get("seq"),
            "verdict": latest.get("verdict"),
            "image_score": latest.get("image_score"),
            "part_id": latest.get("part_id"),
            "error": latest.get("error"),
            "reason": reason(latest) if latest else None,
            "latency_ms": latency,
            "thresholds": latest.get("thresholds") or {"pixel": None, "image": None},
            "calibration_version": latest.get("calibration_version", status.get("calibration_version")),
            "model_id": latest.get("model_id", status.get("model_id")),
            "state": status.get("state"),
            "fps": status.get("fps"),
            "latency": status.get("latency_ms"),
            "healthy": status.get("healthy"),
            "unhealthy_reason": status.get("unhealthy_reason"),
            "last_error": status.get("last_error"),
            "stopping": status.get("stopping"),
            "drift": status.get("drift"),
            "daemon_verdicts": status.get("verdicts"),
            "counts": self.counts(cam),
            "per_hour": self.per_hour(cam, now),
            "missed": cam.track.missed,
            "alive": self.alive(cam, now),
            "status_interval_s": self.status_interval(cam),
        }

    def snapshot(self, now: float) -> dict[str, Any]:
        cameras = {}
        for name, cam in sorted(self.cameras.items()):
            view = self._camera_summary(cam, now)
            view["trend"] = {
                "x": [p[0] for p in cam.trend],
                "seq": [p[1] for p in cam.trend],
                "score": [p[2] for p in cam.trend],
                "verdict": [p[3] for p in cam.trend],
                "pixel": [p[4] for p in cam.trend],
                "image": [p[5] for p in cam.trend],
            }
            view["latest_preview"] = self._preview_view(cam.latest_preview)
            cameras[name] = view
        return {
            "cameras": cameras,
            "daemon": {
                "source": self.source,
                "heard": self.heard is not None,
                "seconds_since_heard": None if self.heard is None else round(now - self.heard, 3),
                "invalid_messages": self.invalid,
                "run_ids": sorted({c.run_id for c in self.cameras.values() if c.run_id}),
            },
            "gallery": [p.summary() for p in self.gallery],
            "recent": [p.summary() for p in self.recent if p.jpeg is not None],
            "banners": list(self.banners.values()),
            "history": self.history,
            "gallery_size": self.gallery_size,
        }
