"""`linewatch demo`: the whole product on built-in images, the way a line runs it.

Builds a demo line from the shipped CC0 brick photo (good parts for training and calibration, a lossless video of
good and defective parts as the camera), then runs the real commands as subprocesses: `train --preset fast`,
`export`, `calibrate`, and `run` (the daemon) on the video. Verdicts are received over ZeroMQ like a PLC would,
matched to the known truth by frame index, printed one line per part, and summarised in an HTML report with
overlays. Runtime only (no torch in this process): training and export run in their own interpreters.

Part i of the line is video frame WARMUP + i: the first frames only give the subscriber time to connect (a ZeroMQ
subscriber misses what is published before its subscription reaches the publisher), and are not counted.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from linewatch.errors import ConfigError, LinewatchError
from linewatch.protocol.wire import Verdict

log = logging.getLogger("linewatch.demo.run")

CAMERA = "line1"
SIZE = 128  # part images are made at the fast preset's input size: the daemon's resize is then the identity
DEFECT_RATE = 0.3
TILE = 192  # overlay grid tile size in pixels
MARKER = ".linewatch-demo"  # marks a folder this command made, so a re-run may replace it
# replaced by a re-run; the dashboard's feedback/ folder is not: marks a person made are kept
SUBDIRS = ("data", "line", "model", "report", "daemon.yaml", "daemon.log", "calibration.json", "dashboard.log")
DASHBOARD_URL = re.compile(r"^dashboard: (http://\S+)", re.M)  # the line `linewatch dashboard` prints on start


@dataclass(frozen=True)
class Settings:
    """What a demo run builds and how the model is set; `quick` is the test-sized run."""

    train_images: int = 60
    calibrate_images: int = 90  # 63 set the threshold, 27 are held out to check the realised rate
    epochs: int = 6
    # the demo calibrates by parts (`calibrate --reject-rate`, what the README recommends): at most this share of
    # the good calibration parts is judged NOK; needs >= 1/R calibration parts (50 of the 63)
    reject_rate: float = 0.02
    # pixels a region above the threshold needs to fail a part: ~1 % of the part. The map is coarse (one value per
    # 4×4 pixels, upsampled), so the demo's smallest painted defect (~50 px) already lights up a region of ~500 px,
    # while noise on good parts stays in regions of < ~150 px.
    min_defect_area: int = 200
    fps: float = 10.0  # camera rate: the line's pace
    warmup_frames: int = 10  # good frames before the first counted part (1 s at 10 fps)


FULL = Settings()
QUICK = Settings(
    train_images=24, calibrate_images=34, epochs=2, reject_rate=0.05, warmup_frames=6, fps=12.0
)  # 34 images: >= 20 calibration parts for 0.05 even when a few score like defects and are excluded


# --- step 1: the demo line ----------------------------------------------------------------------------------


@dataclass
class LinePart:
    number: int  # 1-based, as printed
    frame_index: int  # the daemon's frame counter for this part
    kind: str  # "good" or the defect kind
    image: np.ndarray  # BGR, SIZE×SIZE
    mask: np.ndarray  # bool, True on defect pixels

    @property
    def defective(self) -> bool:
        return self.kind != "good"


def prepare_out(out: Path) -> None:
    """A new or empty folder, or one a previous demo made (its demo files are replaced, nothing else)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise ConfigError(f"--out {out} is not empty and not a previous demo folder; choose a new folder")
        for name in SUBDIRS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by `linewatch demo`; a re-run replaces its contents\n")


def write_folder(folder: Path, images: list[np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        if not cv2.imwrite(str(folder / f"{i:04d}.png"), image):
            raise LinewatchError(f"cannot write {folder / f'{i:04d}.png'}")
    return folder


def write_video(path: Path, frames: list[np.ndarray], fps: float) -> tuple[Path, str, int]:
    """A lossless FFV1 .avi (MJPG only if this OpenCV cannot write FFV1), then read back and compared:
    (path, codec, largest pixel difference between what was written and what a camera reads)."""
    h, w = frames[0].shape[:2]
    for codec in ("FFV1", "MJPG"):
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, (w, h))
        if writer.isOpened():
            break
        writer.release()
    else:
        raise LinewatchError(f"this OpenCV build can write neither FFV1 nor MJPG video ({path})")
    for frame in frames:
        writer.write(frame)
    writer.release()
    cap = cv2.VideoCapture(str(path))
    decoded = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        decoded.append(frame)
    cap.release()
    if len(decoded) != len(frames):
        raise LinewatchError(f"{path}: wrote {len(frames)} frames, OpenCV reads back {len(decoded)}")
    diff = max(int(np.abs(a.astype(np.int16) - b).max()) for a, b in zip(frames, decoded))
    return path, codec, diff


def build_line(out: Path, n_parts: int, seed: int, s: Settings) -> list[LinePart]:
    """Training and calibration folders of good parts, the camera video, and the truth beside it."""
    from linewatch.demo.parts import make_parts

    data = out / "data"
    write_folder(data / "train", [p.image for p in make_parts(s.train_images, "train", SIZE, 0.0, seed)])
    write_folder(
        data / "calibrate", [p.image for p in make_parts(s.calibrate_images, "calibrate", SIZE, 0.0, seed + 1)]
    )
    warmup = make_parts(s.warmup_frames, "line", SIZE, 0.0, seed + 2)
    parts = [
        LinePart(i + 1, s.warmup_frames + i + 1, p.kind, p.image, p.mask)
        for i, p in enumerate(make_parts(n_parts, "line", SIZE, DEFECT_RATE, seed + 3))
    ]
    line = out / "line"
    (line / "parts").mkdir(parents=True)
    (line / "masks").mkdir()
    truth = []
    for part in parts:
        cv2.imwrite(str(line / "parts" / f"part_{part.number:03d}.png"), part.image)
        cv2.imwrite(str(line / "masks" / f"part_{part.number:03d}.png"), part.mask.astype(np.uint8) * 255)
        truth.append(
            {
                "part": part.number,
                "frame_index": part.frame_index,
                "kind": part.kind,
                "defect_area": int(part.mask.sum()),
                "image": f"parts/part_{part.number:03d}.png",
                "mask": f"masks/part_{part.number:03d}.png",
            }
        )
    video, codec, diff = write_video(line / "camera.avi", [p.image for p in warmup] + [p.image for p in parts], s.fps)
    (line / "truth.json").write_text(
        json.dumps(
            {
                "video": video.name,
                "codec": codec,
                "max_decode_difference": diff,
                "fps": s.fps,
                "warmup_frames": s.warmup_frames,
                "parts": truth,
            },
            indent=2,
        )
        + "\n"
    )
    n_bad = sum(p.defective for p in parts)
    log.info(
        "demo line: %d training and %d calibration images of good parts; camera video %s (%s, %d warm-up "
        "frames + %d parts, %d defective; decoded frames differ by at most %d grey level(s))",
        s.train_images,
        s.calibrate_images,
        video,
        codec,
        s.warmup_frames,
        len(parts),
        n_bad,
        diff,
    )
    return parts


# --- step 2: train, export, calibrate (the real commands) ----------------------------------------------------


def linewatch_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "linewatch.cli", *args]


def run_step(what: str, args: list[str]) -> None:
    """A linewatch command in its own interpreter; its logs and progress bars go to our stderr."""
    t0 = time.perf_counter()
    result = subprocess.run(linewatch_cmd(*args), stdout=sys.stderr, stderr=sys.stderr)
    if result.returncode != 0:
        raise LinewatchError(
            f"demo step '{what}' failed: `linewatch {' '.join(args)}` exited with "
            f"{result.returncode} (its messages are above)"
        )
    log.info("%s done in %.1f s", what, time.perf_counter() - t0)


def build_model(out: Path, seed: int, s: Settings) -> dict:
    model = out / "model"
    run_step(
        "training",
        [
            "train",
            "--data",
            str(out / "data" / "train"),
            "--out",
            str(model),
            "--preset",
            "fast",
            "--epochs",
            str(s.epochs),
            "--seed",
            str(seed),
        ],
    )
    run_step("export", ["export", str(model)])
    cal_json = out / "calibration.json"
    run_step(
        "calibration",
        [
            "calibrate",
            str(model),
            "--good",
            str(out / "data" / "calibrate"),
            "--reject-rate",
            str(s.reject_rate),
            "--min-defect-area",
            str(s.min_defect_area),
            "--json",
            str(cal_json),
        ],
    )
    result = json.loads(cal_json.read_text())
    held = result["calibration"].get("holdout_part_reject_rate") or {}
    log.info(
        "calibration: pixel threshold %.5g for a part reject rate of %g; realised on %d held-out good "
        "parts: %s; a part fails on a region of >= %d px",
        result["calibration"]["pixel_threshold"],
        s.reject_rate,
        result["calibration"]["n_holdout"],
        f"{held['rate']:.4g} [{held['lower']:.3g}, {held['upper']:.3g}]" if held else "n/a",
        s.min_defect_area,
    )
    return result


# --- step 3: the daemon on the simulated camera ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_daemon_config(out: Path, n_frames: int, endpoint: str, s: Settings, previews: bool = False) -> Path:
    """One video camera, read once at the line's pace, a queue that holds every frame (none dropped); previews
    (the frames and heat maps a screen shows) only when the dashboard watches."""
    import yaml

    config = {
        "model": {"bundle": str((out / "model").resolve())},
        "engine": {"providers": ["auto"], "max_batch": 4, "max_wait_ms": 5},
        "cameras": [
            {
                "name": CAMERA,
                "kind": "video",
                "source": str((out / "line" / "camera.avi").resolve()),
                "loop": False,
                "fps": s.fps,
                "queue_size": n_frames + 1,
            }
        ],
        "publish": {"endpoint": endpoint, "status_interval_s": 0.5, "preview": {"enabled": previews}},
        "trigger": {"enabled": False},
        "metrics": {"enabled": False},
        "health": {"drain_timeout_s": 10.0},
    }
    path = out / "daemon.yaml"
    path.write_text("# written by `linewatch demo`\n" + yaml.safe_dump(config, sort_keys=False))
    return path


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def format_line(part: LinePart, header: dict, defect_area: int) -> str:
    verdict = header["verdict"]
    outcome = outcome_of(part.defective, verdict)
    return (
        f"part {part.number:3d}  truth {part.kind:7s}  {verdict:5s}  "
        f"score {_number(header['image_score'], '6.4f')}  defect area {defect_area:5d} px  {outcome}"
    )


def outcome_of(defective: bool, verdict: str) -> str:
    if verdict == Verdict.ERROR:
        return "error"
    if defective:
        return "detected" if verdict == Verdict.NOK else "MISSED"
    return "FALSE ALARM" if verdict == Verdict.NOK else "correct pass"


def defect_area(header: dict, min_defect_area: int) -> int:
    """Pixels in the regions that failed the part (the header's `defect` flags; the smaller ones are specks)."""
    flags = [
        r["area"] >= max(1, min_defect_area) if r.get("defect") is None else r["defect"] for r in header["regions"]
    ]
    return int(sum(r["area"] for r, defect in zip(header["regions"], flags) if defect))


def inspect_line(
    out: Path,
    parts: list[LinePart],
    s: Settings,
    dashboard: bool = False,
    wait_s: float = 0.0,
    timings: dict[str, float] | None = None,
) -> dict[int, dict]:
    """Start the daemon (and, with `dashboard`, the web dashboard before it, so it sees the whole line), receive
    one result per part over ZeroMQ, print it, keep both up `wait_s` more seconds (recorded in `timings` as
    "dashboard wait"), stop them with SIGTERM. Returns {part number: {"header", "mask", "area", "above_threshold"}}."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    board = start_dashboard(out, endpoint) if dashboard else None
    try:
        return _inspect(out, parts, s, endpoint, board is not None, wait_s, timings if timings is not None else {})
    finally:
        if board is not None:
            stop_dashboard(board)


def _inspect(
    out: Path, parts: list[LinePart], s: Settings, endpoint: str, previews: bool, wait_s: float, timings: dict
) -> dict[int, dict]:
    from linewatch.protocol.client import Subscriber

    n_frames = s.warmup_frames + len(parts)
    config = write_daemon_config(out, n_frames, endpoint, s, previews)
    log_path = out / "daemon.log"
    sub = Subscriber(endpoint, camera=CAMERA)  # connects before the daemon binds: no start-up results lost
    daemon = start_daemon(config, log_path)
    log.info(
        "daemon started (pid %d, results on %s, log %s); %d frames at %g fps",
        daemon.pid,
        endpoint,
        log_path,
        n_frames,
        s.fps,
    )
    deadline = time.monotonic() + 90.0 + 3 * n_frames / s.fps
    try:
        results = receive_results(sub, daemon, parts, s.min_defect_area, deadline, log_path)
        if wait_s > 0:
            timings["dashboard wait"] = round(linger(daemon, wait_s, log_path), 1)
    finally:
        sub.close()
        code = stop_daemon(daemon)
    if code != 0:
        raise LinewatchError(
            f"the daemon did not exit cleanly after SIGTERM (exit code {code}); its log "
            f"{log_path} ends:\n" + _tail(log_path)
        )
    log.info("daemon stopped with exit code 0 after SIGTERM")
    return results


def linger(daemon: subprocess.Popen, wait_s: float, log_path: Path) -> float:
    """`--dashboard-wait`: the line has run; daemon and dashboard stay up so a person can look. Ctrl-C ends it
    early (the daemon, in our process group, takes the SIGINT as a stop too)."""
    log.info("the line has run; the daemon and the dashboard stay up for %g s (Ctrl-C to stop now)", wait_s)
    start = time.monotonic()
    end = start + wait_s
    try:
        while (left := end - time.monotonic()) > 0:
            if daemon.poll() is not None:
                raise LinewatchError(
                    f"the daemon exited with {daemon.returncode} while the demo waited; its log {log_path} ends:\n"
                    + _tail(log_path)
                )
            time.sleep(min(left, 0.5))
    except KeyboardInterrupt:
        log.info("stopping early (Ctrl-C)")
    return time.monotonic() - start


# --- the dashboard beside the line ------------------------------------------------------------------------------


def dashboard_installed() -> bool:
    """Whether the `dashboard` extra's server libraries are importable (looked up, not imported)."""
    import importlib.util

    try:
        return all(importlib.util.find_spec(name) is not None for name in ("starlette", "uvicorn"))
    except (ImportError, ValueError):  # a broken or half-removed install
        return False


def start_dashboard(out: Path, endpoint: str, timeout_s: float = 30.0) -> subprocess.Popen | None:
    """`linewatch dashboard` on a free loopback port, subscribed to the demo daemon, marking feedback into
    out/feedback. Prints its URL. The demo does not need it: one that fails to start is a warning, not an error."""
    log_path = out / "dashboard.log"
    args = ["dashboard", "--connect", endpoint, "--listen", f"127.0.0.1:{free_port()}"]
    args += ["--feedback", str((out / "feedback").resolve())]
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # its URL line reaches the log file at once
    with open(log_path, "w") as board_log:
        board = subprocess.Popen(linewatch_cmd(*args), stdout=board_log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout_s
    while (found := DASHBOARD_URL.search(log_path.read_text(errors="replace"))) is None:
        if board.poll() is not None or time.monotonic() > deadline:
            stop_dashboard(board)
            log.warning(
                "the dashboard did not start (%s); the demo goes on without it. Its log %s ends:\n%s",
                f"exit code {board.returncode}" if board.returncode is not None else f"no URL within {timeout_s:g} s",
                log_path,
                _tail(log_path),
            )
            return None
        time.sleep(0.1)
    print(f"dashboard: {found[1]} \u2014 open it in a browser while the demo line runs", flush=True)
    return board


def stop_dashboard(board: subprocess.Popen) -> None:
    code = stop_daemon(board)  # the same stop: SIGTERM, killed after 30 s
    if code not in (0, None) and code != -signal.SIGTERM:
        log.warning("the dashboard exited with code %s (its log: dashboard.log)", code)


def start_daemon(config: Path, log_path: Path) -> subprocess.Popen:
    with open(log_path, "w") as daemon_log:
        return subprocess.Popen(
            linewatch_cmd("run", "--config", str(config)), stdout=daemon_log, stderr=subprocess.STDOUT
        )


def stop_daemon(daemon: subprocess.Popen) -> int | None:
    """SIGTERM if it still runs; its exit code, or None when it had to be killed after 30 s."""
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
    try:
        return daemon.wait(timeout=30)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()
        return None


def receive_results(
    sub, daemon: subprocess.Popen, parts: list[LinePart], min_defect_area: int, deadline: float, log_path: Path
) -> dict[int, dict]:
    """One result per part, printed as it arrives; warm-up frames are skipped, anything lost is an error."""
    by_frame = {p.frame_index: p for p in parts}
    results: dict[int, dict] = {}
    while len(results) < len(parts):
        check_daemon_running(daemon, parts, results, deadline, log_path)
        msg = sub.recv(timeout_s=0.5)
        if msg is None:
            continue
        if msg.kind != "result":
            check_nothing_dropped(msg.header, log_path)
            continue
        part = by_frame.get(msg.header.get("frame_index"))
        if part is None:
            continue  # a warm-up frame
        check_none_lost(parts, results, part.frame_index, log_path)
        results[part.number] = part_result(msg, min_defect_area)
        print(format_line(part, msg.header, results[part.number]["area"]), flush=True)
    return results


def check_daemon_running(
    daemon: subprocess.Popen, parts: list[LinePart], results: dict[int, dict], deadline: float, log_path: Path
) -> None:
    if daemon.poll() is not None:
        raise LinewatchError(
            f"the daemon exited with {daemon.returncode} before all parts were "
            f"inspected ({len(results)} of {len(parts)}); its log {log_path} ends:\n" + _tail(log_path)
        )
    if time.monotonic() > deadline:
        missing = [p.number for p in parts if p.number not in results]
        raise LinewatchError(f"timed out: no result for part(s) {missing} (see {log_path})")


def check_nothing_dropped(status: dict, log_path: Path) -> None:
    """The demo's queue holds every frame: a status that reports dropped frames means a broken run."""
    dropped = status.get("dropped", 0) + status.get("publish_dropped", 0)
    if dropped:
        raise LinewatchError(
            f"the daemon dropped {dropped} frame(s) of the demo video (status: {status}); see {log_path}"
        )


def check_none_lost(parts: list[LinePart], results: dict[int, dict], frame_index: int, log_path: Path) -> None:
    """A PUB socket keeps order: an earlier part whose result did not arrive never will."""
    lost = [p.number for p in parts if p.frame_index < frame_index and p.number not in results]
    if lost:
        raise LinewatchError(
            f"results for part(s) {lost} were never received (the subscriber joined "
            f"late or messages were dropped); see {log_path}"
        )


def part_result(msg, min_defect_area: int) -> dict:
    mask = msg.mask_array() if msg.mask else None
    return {
        "header": msg.header,
        "mask": mask,
        "area": defect_area(msg.header, min_defect_area),
        "above_threshold": None if mask is None else int(np.count_nonzero(mask)),
    }


# --- step 4: report ---------------------------------------------------------------------------------------------


def count_outcomes(parts: list[LinePart], results: dict[int, dict]) -> dict:
    outcomes = [outcome_of(p.defective, results[p.number]["header"]["verdict"]) for p in parts]
    n_bad = sum(p.defective for p in parts)
    n_good = len(parts) - n_bad
    counts = {
        "parts": len(parts),
        "defective": n_bad,
        "good": n_good,
        "detected": outcomes.count("detected"),
        "missed": outcomes.count("MISSED"),
        "false_alarms": outcomes.count("FALSE ALARM"),
        "correct_passes": outcomes.count("correct pass"),
        "errors": outcomes.count("error"),
    }
    counts["detection_rate"] = counts["detected"] / n_bad if n_bad else None
    counts["false_alarm_rate"] = counts["false_alarms"] / n_good if n_good else None
    return counts


def score_images(engine, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    maps, scores = [], []
    for start in range(0, len(images), 8):
        m, sc = engine.score(np.stack(images[start : start + 8]))
        maps.append(m)
        scores.append(sc)
    return np.concatenate(maps), np.concatenate(scores)


def _outline(image: np.ndarray, region: np.ndarray, colour: tuple[int, int, int]) -> None:
    contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(image, contours, -1, colour, 1)


def overlay_grid(
    parts: list[LinePart],
    results: dict[int, dict],
    maps: np.ndarray,
    threshold: float,
    calibrate_maps: np.ndarray,
    min_defect_area: int,
) -> np.ndarray:
    """Per part: the camera image, then the heat map with the published mask's defect regions (red: what failed
    the part; specks below `min_defect_area` are not outlined) and the truth (green)."""
    from linewatch.evaluation.overlay import DEFECT_COLOUR, TRUTH_COLOUR, display_range, grid, overlay
    from linewatch.line.verdict import defect_mask

    vmin, vmax = display_range(calibrate_maps, np.concatenate([maps.ravel(), [threshold * 1.5]]))
    tiles, labels = [], []
    for part, amap in zip(parts, maps):
        header = results[part.number]["header"]
        tile = overlay(part.image, amap, vmin, vmax)
        published = results[part.number]["mask"]
        if published is not None:
            if published.shape != amap.shape:
                published = cv2.resize(published, amap.shape[::-1], interpolation=cv2.INTER_NEAREST)
            _outline(tile, defect_mask(published > 127, min_defect_area), DEFECT_COLOUR)
        _outline(tile, part.mask, TRUTH_COLOUR)
        tiles += [part.image, tile]
        verdict = header["verdict"]
        labels += [f"#{part.number} {part.kind}", f"{verdict} {outcome_of(part.defective, verdict)}"]
    return grid(tiles, labels, tile=TILE, columns=8)


def _data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def write_report(
    out: Path, parts: list[LinePart], results: dict[int, dict], calibration: dict, s: Settings, timings: dict
) -> tuple[Path, dict]:
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    from linewatch.images import list_images, read_image
    from linewatch.line.engine import Engine

    # The daemon publishes masks, not maps: the maps for the overlays come from the same exported graph, and its
    # scores of the part images double-check that each result was matched to the right part.
    engine = Engine(out / "model")
    maps, scores = score_images(engine, [p.image for p in parts])
    published = np.array([np.nan if (v := results[p.number]["header"]["image_score"]) is None else v for p in parts])
    score_diff = float(np.nanmax(np.abs(published - scores) / np.maximum(np.abs(scores), 1e-12)))
    if score_diff > 1e-3:
        log.warning(
            "published image scores differ from the graph's scores of the part images by up to %.2g "
            "(relative): the video frames are not the parts bit for bit",
            score_diff,
        )
    cal_maps, _ = score_images(engine, [read_image(p) for p in list_images(out / "data" / "calibrate")[:16]])
    threshold = calibration["calibration"]["pixel_threshold"]
    sheet = overlay_grid(parts, results, maps, threshold, cal_maps, s.min_defect_area)
    ok, png = cv2.imencode(".png", sheet)
    ok_jpeg, jpeg = cv2.imencode(".jpg", sheet, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not (ok and ok_jpeg):
        raise LinewatchError("cannot encode the overlay grid")
    (report / "overlays.png").write_bytes(png.tobytes())  # lossless, beside the report

    counts = count_outcomes(parts, results)
    rows = [
        {
            "part": p.number,
            "frame_index": p.frame_index,
            "truth": p.kind,
            "true_area": int(p.mask.sum()),
            "verdict": results[p.number]["header"]["verdict"],
            "image_score": results[p.number]["header"]["image_score"],
            "defect_area": results[p.number]["area"],
            "pixels_above_threshold": results[p.number]["above_threshold"],
            "outcome": outcome_of(p.defective, results[p.number]["header"]["verdict"]),
        }
        for p in parts
    ]
    held = calibration["calibration"].get("holdout_part_reject_rate") or {}
    summary = {
        "counts": counts,
        "parts": rows,
        "score_max_relative_difference": score_diff,
        "calibration": {
            "pixel_threshold": threshold,
            "reject_rate_target": calibration["calibration"].get("reject_rate_target"),
            "holdout_part_reject_rate": held or None,
            "min_defect_area": calibration["calibration"]["min_defect_area"],
            "version": calibration["calibration"]["version"],
        },
        "settings": s.__dict__,
        "timings_s": timings,
    }
    (report / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    (report / "report.html").write_text(report_html(summary, jpeg.tobytes()))  # self-contained: a JPEG inside
    return report / "report.html", counts


def timings_rows(timings: dict[str, float]) -> list[tuple[str, str]]:
    """(step, seconds) per step and their total, seconds to 0.1 s."""
    rows = [(str(step), f"{seconds:.1f}") for step, seconds in timings.items()]
    return rows + [("total", f"{sum(timings.values()):.1f}")] if timings else rows


def timings_html(timings: dict[str, float]) -> str:
    body = "".join(f"<tr><td>{html.escape(step)}</td><td>{sec}</td></tr>" for step, sec in timings_rows(timings))
    return f"<table class='timings'><tr><th>step</th><th>seconds</th></tr>{body}</table>"


def timings_text(timings: dict[str, float]) -> str:
    """The same table for a terminal: names left, seconds right-aligned."""
    rows = [("step", "seconds"), *timings_rows(timings)]
    width, digits = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    return "\n".join(f"  {step:<{width}}  {sec:>{digits}}" for step, sec in rows)


def _number(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def report_html(summary: dict, grid_jpeg: bytes) -> str:
    c = summary["counts"]
    cal = summary["calibration"]
    held = cal["holdout_part_reject_rate"] or {}
    held_rate = (
        "not checked"
        if not held
        else f"{_number(held.get('rate'), '.3g')}, 95 % interval [{_number(held.get('lower'), '.3g')}, "
        f"{_number(held.get('upper'), '.3g')}]"
    )
    rate = lambda v: "n/a" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    rows = "\n".join(
        f"<tr class='{'bad' if r['outcome'] in ('MISSED', 'FALSE ALARM', 'error') else ''}'><td>{r['part']}</td>"
        f"<td>{html.escape(r['truth'])}</td><td>{r['true_area']}</td><td>{r['verdict']}</td>"
        f"<td>{_number(r['image_score'], '.4f')}</td><td>{r['defect_area']}</td>"
        f"<td>{r['outcome']}</td></tr>"
        for r in summary["parts"]
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>linewatch demo report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:75em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}} tr.bad{{background:#fdd}}
img{{max-width:100%}}</style></head><body>
<h1>linewatch demo: {c["parts"]} parts on the simulated line</h1>
<p>Verdicts as published by the daemon over ZeroMQ, against the known truth of each part.</p>
<table><tr><th></th><th>verdict NOK</th><th>verdict OK</th><th>ERROR</th></tr>
<tr><th>defective ({c["defective"]})</th><td>{c["detected"]} detected</td><td>{c["missed"]} missed</td>
<td rowspan=2>{c["errors"]}</td></tr>
<tr><th>good ({c["good"]})</th><td>{c["false_alarms"]} false alarms</td>
<td>{c["correct_passes"]} correct passes</td></tr>
</table>
<p><b>Detection rate {rate(c["detection_rate"])}</b>, <b>false-alarm rate {rate(c["false_alarm_rate"])}</b>.</p>
<p>Calibration v{cal["version"]}: pixel threshold {cal["pixel_threshold"]:.5g}, set so that at most
{rate(cal["reject_rate_target"])} of the good calibration parts are judged NOK (held-out good parts rejected:
{held_rate});
a part is NOK when a region of at least {cal["min_defect_area"]} px is above the threshold.</p>
<h2>Overlays</h2>
<p>Per part: the camera frame, then the anomaly map (colour from the good parts' noise level up) with
<b style="color:#e00">red outlines: the defect regions that failed the part</b> (at least {cal["min_defect_area"]} px
of the published mask) and <b style="color:#0a0">green outlines: the true defect</b>. Specks above the threshold but
smaller than that are not outlined: they never fail a part.</p>
<img src="{_data_uri(grid_jpeg)}" alt="overlays"> (lossless: <a href="overlays.png">overlays.png</a>)
<h2>Parts</h2>
<p>Defect area: pixels of the regions above the threshold that are large enough to fail the part.</p>
<table><tr><th>part</th><th>truth</th><th>true area px</th><th>verdict</th><th>image score</th>
<th>defect area px</th><th>outcome</th></tr>
{rows}
</table>
<h2>Timings</h2>
{timings_html(summary["timings_s"])}
</body></html>
"""


# --- the command -------------------------------------------------------------------------------------------------


def cli_demo(args) -> int:
    s = QUICK if getattr(args, "quick", False) else FULL
    if not 1 <= args.parts <= 5000:
        raise ConfigError(f"--parts must be between 1 and 5000, got {args.parts}")
    wait_s = float(getattr(args, "dashboard_wait", 0.0))
    if not 0 <= wait_s <= 86400:
        raise ConfigError(f"--dashboard-wait must be between 0 and 86400 seconds, got {wait_s:g}")
    out = Path(args.out)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def step(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)

    prepare_out(out)
    t0 = time.perf_counter()
    log.info("[1/5] building the demo line in %s", out)
    parts = build_line(out, args.parts, args.seed, s)
    step("line", t0)
    t0 = time.perf_counter()
    log.info("[2/5] training the fast preset (%d epochs), exporting, calibrating", s.epochs)
    calibration = build_model(out, args.seed, s)
    step("model", t0)
    t0 = time.perf_counter()
    log.info("[3/5] running the daemon on the simulated camera")
    dashboard = not getattr(args, "no_dashboard", False)
    if dashboard and not dashboard_installed():
        dashboard = False
        print(
            "dashboard: not started: the web dashboard needs its extra, pip install 'linewatch[dashboard]' "
            "(then `linewatch demo` shows the line in a browser)",
            flush=True,
        )
    waited: dict[str, float] = {}
    results = inspect_line(out, parts, s, dashboard, wait_s, waited)
    step("inspection", t0)
    if waited:  # the time a person looked is not inspection time
        timings["inspection"] = round(timings["inspection"] - waited["dashboard wait"], 1)
        timings.update(waited)
    t0 = time.perf_counter()
    log.info("[4/5] writing the report")
    report, counts = write_report(out, parts, results, calibration, s, timings)
    step("report", t0)
    total = time.perf_counter() - started
    rate = lambda v: "n/a" if v is None else f"{100 * v:.0f} %"  # noqa: E731
    log.info("[5/5] done in %.0f s", total)
    print(
        f"summary: {counts['parts']} parts ({counts['defective']} defective): {counts['detected']} detected, "
        f"{counts['missed']} missed, {counts['false_alarms']} false alarms, {counts['correct_passes']} correct "
        f"passes, {counts['errors']} errors; detection rate {rate(counts['detection_rate'])}, false-alarm rate "
        f"{rate(counts['false_alarm_rate'])}"
    )
    print("timings:\n" + timings_text(timings))
    print(f"report: {report.resolve()}")
    return 0
