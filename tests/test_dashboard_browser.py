"""The operator's screen in a real browser (issue 16, "Done when"): headless Debian Chromium driven by selenium
against the real `linewatch dashboard` subprocess, connected to a real daemon subprocess whose camera is an HTTP
MJPEG stream (tests/helpers.py) that the test stops and restarts (an outage), with previews and the archive on.

One daemon, one dashboard and one browser for the module; the tests are states of one line, in order: live
frames, the trend chart, the NOK gallery, a part's detail and a feedback click, the camera going offline and
coming back. With `LINEWATCH_SCREENSHOTS=DIR` each state is saved as a PNG in DIR (docs/screenshots/ holds the
ones from such a run)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import pytest
from selenium import webdriver
from selenium.common.exceptions import JavascriptException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from linewatch.feedback import pending_counts
from tests.helpers import MjpegServer, free_port
from tests.test_daemon import Subscriber, daemon_log, start_daemon, status_fields, stop, write_calibration, write_config

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
CAMERA = "cam1"
SIZE = 256  # camera frames; the deviation bundle's model input is 64×64
PERIOD = 4  # frame i shows a defect when i % PERIOD == 1
URL_LINE = re.compile(r"^dashboard: (http://\S+)", re.M)
CHROME_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
)


def camera_frame(i: int) -> np.ndarray:
    """A grey background with a darker disc (the part: within the model's good range, a faint heat) and, on every
    PERIOD-th frame, a white square at a position that moves (a defect: the deviation map is |grey-128|/127)."""
    img = np.full((SIZE, SIZE, 3), 128, np.uint8)
    cv2.circle(img, (SIZE // 2, SIZE // 2), SIZE // 3, (96, 100, 104), -1)
    if i % PERIOD == 1:
        x = 40 + (i * 37) % (SIZE - 100)
        img[90:130, x : x + 40] = 255
    return img


# --- the line: daemon, dashboard, browser ------------------------------------------------------------------------


class Line:
    def __init__(self, tmp: Path, bundle_dir: Path):
        self.tmp = tmp
        self.archive = tmp / "archive"
        self.feedback = tmp / "feedback"
        # not created here: the dashboard starts before the daemon, which makes the archive folder
        self.camera = MjpegServer(free_port(), camera_frame, fps=8).start()
        self.config, self.endpoint = write_config(
            tmp,
            bundle_dir,
            [
                {
                    "name": CAMERA,
                    "kind": "url",
                    "source": self.camera.url,
                    "open_timeout_ms": 1000,
                    "read_timeout_ms": 1000,
                    "stall_s": 1.0,
                    "reconnect": {"initial_s": 0.1, "max_s": 0.5},
                }
            ],
            publish={
                "preview": {"enabled": True, "max_fps": 2.0, "width": 192, "heatmap_size": 48},
                "status_interval_s": 0.5,  # the life bit is missing after 3 intervals: margin for a busy 2-core box
            },
            archive={"enabled": True, "dir": str(self.archive), "max_mb": 50},
        )
        self.sub = Subscriber(self.endpoint)  # the test's own view of what the daemon published
        self.dashboard: subprocess.Popen | None = None
        self.daemon: subprocess.Popen | None = None
        self.driver: webdriver.Chrome | None = None

    def start(self) -> None:
        self.dashboard = self._start_dashboard()  # before the daemon: it sees every result
        self.daemon = start_daemon(self.config, self.tmp)
        self.driver = _browser(self.tmp / "chromium-profile")

    def _start_dashboard(self) -> subprocess.Popen:
        self.port = free_port()
        args = ["dashboard", "--connect", self.endpoint, "--listen", f"127.0.0.1:{self.port}"]
        args += ["--archive", str(self.archive), "--feedback", str(self.feedback)]
        with open(self.tmp / "dashboard.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "linewatch.cli", *args],
                cwd=ROOT,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        end = time.monotonic() + 30
        while (found := URL_LINE.search(self.dashboard_log())) is None:
            assert proc.poll() is None, f"dashboard exited with {proc.returncode}:\n{self.dashboard_log()[-3000:]}"
            assert time.monotonic() < end, f"no `dashboard: URL` line within 30 s:\n{self.dashboard_log()[-3000:]}"
            time.sleep(0.1)
        self.url = found[1]
        assert self.url == f"http://127.0.0.1:{self.port}/", self.url
        return proc

    def dashboard_log(self) -> str:
        return (self.tmp / "dashboard.log").read_text(errors="replace")

    def logs(self) -> str:
        return (
            f"--- daemon log ---\n{daemon_log(self.tmp)[-2500:]}\n--- dashboard log ---\n{self.dashboard_log()[-2500:]}"
        )

    def close(self) -> dict[str, int]:
        """Stops everything that was started; the exit codes of the dashboard and the daemon."""
        codes = {}
        try:
            if self.driver is not None:
                self.driver.quit()
        finally:
            for name, proc in (("dashboard", self.dashboard), ("daemon", self.daemon)):
                if proc is not None:
                    codes[name] = stop(proc)
            self.camera.stop()
            self.sub.close()
        return codes


def _browser(profile: Path) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in CHROME_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_window_size(1280, 800)
    return driver


@pytest.fixture(scope="module")
def line(deviation_bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dashboard_browser")
    bundle_dir = tmp / "bundle"
    shutil.copytree(deviation_bundle, bundle_dir)
    write_calibration(bundle_dir, 0.5)
    the_line = Line(tmp, bundle_dir)
    try:
        the_line.start()
        the_line.driver.get(the_line.url)
        yield the_line
    finally:
        codes = the_line.close()
    assert codes == {"dashboard": 0, "daemon": 0}, f"a clean stop on SIGTERM\n{the_line.logs()}"


# --- helpers -------------------------------------------------------------------------------------------------


def js(line: Line, script: str, *args: Any) -> Any:
    return line.driver.execute_script(script, *args)


def wait_for(line: Line, cond: Callable[[], Any], timeout: float, what: str) -> Any:
    """Polls `cond` (browser state) while draining the test's own subscriber; its first truthy value."""
    end = time.monotonic() + timeout
    while True:
        try:
            value = cond()
        except (StaleElementReferenceException, JavascriptException):
            value = None  # the page re-rendered the element under us: ask again
        if value:
            return value
        assert line.daemon.poll() is None, f"daemon exited while waiting for {what}\n{line.logs()}"
        assert line.dashboard.poll() is None, f"dashboard exited while waiting for {what}\n{line.logs()}"
        assert time.monotonic() < end, f"timed out after {timeout} s waiting for {what}\n{line.logs()}"
        line.sub.poll(0.1)


def card(name: str = CAMERA) -> str:
    return f'#cameras section.camera[data-camera="{name}"]'


def text(line: Line, selector: str) -> str:
    return js(line, "const e = document.querySelector(arguments[0]); return e ? e.textContent.trim() : null;", selector)


def number(line: Line, selector: str) -> int | None:
    found = re.search(r"\d+", text(line, selector) or "")
    return int(found[0]) if found else None


def camera_state(line: Line) -> str:
    """The state word the camera card shows (it may add e.g. "(no life bit)" after it)."""
    return (text(line, f"{card()} .camera-state") or "").split(" ")[0]


def trend_points(line: Line) -> int:
    value = js(
        line, "const e = document.querySelector(arguments[0]); return e && e.dataset.points;", f"{card()} .trend"
    )
    return int(value) if value not in (None, "") else -1


def frame_shown(line: Line) -> str | None:
    """The source of the camera's frame once the browser has decoded it (an img), or "canvas" once a canvas has
    drawn something other than one flat colour; None before."""
    return js(
        line,
        """
        const e = document.querySelector(arguments[0]);
        if (!e) return null;
        if (e.tagName === 'IMG') return (e.complete && e.naturalWidth > 0 && e.getAttribute('src')) || null;
        if (e.tagName !== 'CANVAS' || !e.width || !e.height) return null;
        const d = e.getContext('2d').getImageData(0, 0, e.width, e.height).data;
        for (let i = 4; i < d.length; i += 4)
          if (d[i] !== d[0] || d[i + 1] !== d[1] || d[i + 2] !== d[2]) return 'canvas';
        return null;
        """,
        f"{card()} .frame",
    )


def image_loaded(line: Line, selector: str) -> bool:
    return bool(
        js(
            line,
            "const e = document.querySelector(arguments[0]); return !!(e && e.complete && e.naturalWidth > 0);",
            selector,
        )
    )


def click(line: Line, selector: str, timeout: float = 10) -> None:
    """A real click; the live page may re-render the element between finding and clicking it: find it again."""
    end = time.monotonic() + timeout
    while True:
        try:
            line.driver.find_element(By.CSS_SELECTOR, selector).click()
            return
        except StaleElementReferenceException:
            assert time.monotonic() < end, f"{selector} kept being replaced"


def visible(line: Line, selector: str) -> bool:
    els = line.driver.find_elements(By.CSS_SELECTOR, selector)
    return bool(els) and els[0].is_displayed()


def gallery(line: Line) -> list[dict[str, str]]:
    return js(
        line,
        "return [...document.querySelectorAll('#gallery .gallery-item')].map(e => ({camera: e.dataset.camera, "
        "seq: e.dataset.seq, verdict: e.dataset.verdict}));",
    )


def banners(line: Line, kind: str) -> list[str]:
    return js(
        line,
        "return [...document.querySelectorAll('#banners .banner')].filter(e => e.dataset.kind === arguments[0])"
        ".map(e => e.dataset.camera);",
        kind,
    )


def results_by_seq(line: Line) -> dict[int, dict]:
    return {h["seq"]: h for h in line.sub.results if h["camera"] == CAMERA}


def screenshot(line: Line, name: str) -> None:
    """Saved only when LINEWATCH_SCREENSHOTS names a folder; checked to be a real, non-blank PNG."""
    folder = os.environ.get("LINEWATCH_SCREENSHOTS")
    if not folder:
        return
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    assert line.driver.save_screenshot(str(path)), path
    img = cv2.imread(str(path))
    assert img is not None and img.shape[1] >= 1000 and img.std() > 5, path


# --- the states, in order ------------------------------------------------------------------------------------


def test_the_page_shows_live_frames_served_by_the_dashboard_alone(line):
    driver = line.driver
    wait_for(line, lambda: js(line, "return document.body.dataset.connected === 'true'"), 20, "SSE connected")
    first = wait_for(line, lambda: frame_shown(line), 30, "a decoded camera frame")
    wait_for(line, lambda: (shown := frame_shown(line)) and shown != first, 20, "the frame to change (live)")
    width = js(line, "return document.querySelector(arguments[0]).naturalWidth", f"{card()} img.frame")
    assert width == 192, f"the daemon's preview JPEG (publish.preview.width 192) is shown, got {width} px"
    shown, attr = js(  # read together: the next result may replace both at any moment
        line,
        "const e = document.querySelector(arguments[0]); return [e.textContent.trim(), e.dataset.verdict];",
        f"{card()} .verdict",
    )
    assert shown in ("OK", "NOK") and attr == shown, (shown, attr)
    assert wait_for(line, lambda: camera_state(line) == "online", 10, "camera state online")
    model_id = results_by_seq(line)[max(results_by_seq(line))]["model_id"]
    assert model_id and model_id in text(line, f"{card()} .model-id")
    assert "1" in text(line, f"{card()} .calibration-version")  # the first calibration of this bundle
    score = text(line, f"{card()} .score")
    assert re.search(r"\d", score), score
    # works on a line PC without internet: everything the page loaded came from the dashboard itself
    loaded = js(line, "return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded, "the page loaded no script or style"
    foreign = [u for u in loaded if not u.startswith(line.url) and not u.startswith("data:")]
    assert not foreign, foreign
    scripts = [e.get_attribute("src") for e in driver.find_elements(By.CSS_SELECTOR, "script[src]")]
    assert scripts and all(s.startswith(line.url) for s in scripts), scripts
    wait_for(line, lambda: not banners(line, "lifebit") and not banners(line, "offline"), 10, "no banner")
    screenshot(line, "dashboard-live.png")


def test_the_trend_chart_and_the_counters_update_without_reloading(line):
    marker = js(line, "window.__notReloaded = 1; return 1;")
    before = wait_for(line, lambda: (n := trend_points(line)) > 0 and n, 20, "parts plotted in the trend")
    ok_before = number(line, f"{card()} .count-ok")
    wait_for(line, lambda: trend_points(line) >= before + 5, 20, "5 more parts in the trend")
    wait_for(line, lambda: (number(line, f"{card()} .count-ok") or 0) > (ok_before or 0), 10, "the OK count rising")
    wait_for(line, lambda: (number(line, f"{card()} .count-nok") or 0) > 0, 10, "a NOK counted")
    assert js(line, "return window.__notReloaded") == marker
    fps = re.search(r"\d+(\.\d+)?", text(line, f"{card()} .fps") or "")
    assert fps and 0 < float(fps[0]) < 50, text(line, f"{card()} .fps")
    assert re.search(r"\d", text(line, f"{card()} .latency") or ""), text(line, f"{card()} .latency")
    screenshot(line, "dashboard-trend.png")


def test_the_gallery_fills_with_nok_parts_newest_first(line):
    items = wait_for(line, lambda: len(g := gallery(line)) >= 3 and g, 30, "three parts in the NOK gallery")
    published = results_by_seq(line)
    for item in items:
        assert item["camera"] == CAMERA and item["verdict"] in ("NOK", "ERROR"), item
        seq = int(item["seq"])
        if seq in published:  # the daemon's own verdict for that part, from the test's subscriber
            assert published[seq]["verdict"] == item["verdict"], (item, published[seq])
    seqs = [int(i["seq"]) for i in items]
    assert seqs == sorted(seqs, reverse=True), seqs
    assert any(int(i["seq"]) in published for i in items)
    screenshot(line, "dashboard-gallery.png")


def test_a_part_opens_full_size_and_marking_it_a_false_reject_writes_frame_and_sidecar(line):
    driver = line.driver
    seq = int(next(i["seq"] for i in gallery(line) if i["verdict"] == "NOK"))
    click(line, f"#gallery .gallery-item[data-seq='{seq}']")
    wait_for(line, lambda: visible(line, "#detail"), 10, "the detail view")
    wait_for(line, lambda: image_loaded(line, "#detail img.full"), 15, "the full-size frame")
    wait_for(line, lambda: image_loaded(line, "#detail img.heatmap"), 15, "the heat map")
    full_width = js(line, "return document.querySelector('#detail img.full').naturalWidth")
    assert full_width == SIZE, f"the archived frame is the camera's full frame ({SIZE} px), got {full_width}"
    defects = "#detail .regions tbody tr[data-defect='true']"
    wait_for(line, lambda: line.driver.find_elements(By.CSS_SELECTOR, defects), 10, "the defect region listed")
    assert text(line, "#detail .reason"), "the detail view says why the part failed"
    button = driver.find_element(By.CSS_SELECTOR, "#detail button[data-feedback='false_reject']")
    assert button.is_displayed()
    who, why = fill_who_and_why(line, "Dana (shift B)", "scratch is on the fixture, not the part")
    button.click()
    outcome = wait_for(line, lambda: outcome_shown(line), 15, "the feedback outcome")
    wait_for(line, lambda: list(line.feedback.glob(f"false_reject/{CAMERA}/*.json")), 10, "the sidecar file")
    sidecars = list(line.feedback.glob(f"false_reject/{CAMERA}/*.json"))
    assert len(sidecars) == 1, sidecars
    sidecar = json.loads(sidecars[0].read_text())
    images = [p for p in sidecars[0].parent.iterdir() if p.stem == sidecars[0].stem and p.suffix != ".json"]
    assert len(images) == 1, images
    assert re.search(r"saved|marked", outcome, re.I) and not re.search(r"error|fail|refused", outcome, re.I), outcome
    assert sidecar["kind"] == "false_reject" and sidecar["camera"] == CAMERA
    assert sidecar["image"]["file"] == images[0].name
    assert sidecar["image"]["sha256"] == hashlib.sha256(images[0].read_bytes()).hexdigest()
    assert (sidecar["image"]["width"], sidecar["image"]["height"]) == (SIZE, SIZE)
    assert (line.feedback / ".linewatch-feedback").is_file()
    assert pending_counts(line.feedback) == {"false_reject": 1, "missed_defect": 0}
    assert sidecar["source"] == "archive"
    assert sidecar["header"]["seq"] == seq and sidecar["header"]["verdict"] == "NOK"
    assert sidecar["who"] == who and sidecar["why"] == why
    when = datetime.fromisoformat(sidecar["when"].replace("Z", "+00:00"))
    assert when.utcoffset() is not None and when.utcoffset().total_seconds() == 0
    assert abs(when.timestamp() - time.time()) < 120
    saved = cv2.imread(str(images[0]), cv2.IMREAD_COLOR)
    assert saved is not None and saved.shape == (SIZE, SIZE, 3)
    archived = list(line.archive.glob(f"*_{CAMERA}_{seq:09d}_NOK.png"))
    assert len(archived) == 1, archived
    assert np.array_equal(saved, cv2.imread(str(archived[0]), cv2.IMREAD_COLOR)), "not the frame as inspected"
    assert (saved[90:130].min(axis=2) > 200).sum() >= 40 * 40 * 0.8, "the defect's white square is in the frame"
    wait_for(line, lambda: number(line, "#feedback-pending") == 1, 10, "one correction pending")
    screenshot(line, "dashboard-detail-feedback.png")
    driver.find_element(By.CSS_SELECTOR, "#detail .close").click()
    wait_for(line, lambda: not visible(line, "#detail"), 10, "the detail view closed")


def test_an_ok_part_from_the_recent_list_can_be_marked_a_missed_defect_from_its_preview(line):
    driver = line.driver
    published = results_by_seq(line)

    def an_ok_recent_part() -> int | None:
        published.update(results_by_seq(line))
        for el in driver.find_elements(By.CSS_SELECTOR, f"#recent .recent-item[data-camera='{CAMERA}']"):
            seq = int(el.get_attribute("data-seq"))
            if published.get(seq, {}).get("verdict") == "OK" and el.is_displayed():
                return seq
        return None

    seq = wait_for(line, an_ok_recent_part, 20, "an OK part in the recent list")
    click(line, f"#recent .recent-item[data-camera='{CAMERA}'][data-seq='{seq}']")
    wait_for(line, lambda: visible(line, "#detail"), 10, "the detail view")
    wait_for(line, lambda: image_loaded(line, "#detail img.full"), 15, "the part's frame")
    driver.find_element(By.CSS_SELECTOR, "#detail button[data-feedback='missed_defect']").click()
    wait_for(line, lambda: list(line.feedback.glob(f"missed_defect/{CAMERA}/*.json")), 10, "the sidecar file")
    outcome = wait_for(line, lambda: outcome_shown(line), 15, "the feedback outcome")
    assert re.search(r"saved|marked", outcome, re.I) and not re.search(r"error|fail|refused", outcome, re.I), outcome
    (sidecar_path,) = line.feedback.glob(f"missed_defect/{CAMERA}/*.json")
    sidecar = json.loads(sidecar_path.read_text())
    assert sidecar["kind"] == "missed_defect" and sidecar["header"]["seq"] == seq
    assert sidecar["header"]["verdict"] == "OK"
    # OK parts are not archived (archive.verdicts: NOK, ERROR): what is saved is the preview the daemon sent
    assert sidecar["source"] == "preview" and sidecar["image"]["format"] == "jpeg"
    image = cv2.imread(str(sidecar_path.with_name(sidecar["image"]["file"])))
    assert image is not None and image.shape == (192, 192, 3)
    assert (sidecar["image"]["width"], sidecar["image"]["height"]) == (192, 192)
    assert pending_counts(line.feedback) == {"false_reject": 1, "missed_defect": 1}
    wait_for(line, lambda: number(line, "#feedback-pending") == 2, 10, "two corrections pending")
    driver.find_element(By.CSS_SELECTOR, "#detail .close").click()
    wait_for(line, lambda: not visible(line, "#detail"), 10, "the detail view closed")


def outcome_shown(line: Line) -> str | None:
    """The feedback outcome once the request has been answered (the page says "saving…" until then)."""
    shown = text(line, "#detail .feedback-result") or ""
    return shown if shown and not shown.lower().startswith("saving") else None


def fill_who_and_why(line: Line, who: str, why: str) -> tuple[str, str]:
    """Types who and why into the detail view's fields, as an operator does."""
    for name, value in (("who", who), ("why", why)):
        field = line.driver.find_element(By.CSS_SELECTOR, f"#detail input.{name}")
        field.clear()
        field.send_keys(value)
    return who, why


def test_the_offline_banner_appears_when_the_camera_stops_and_goes_when_it_returns(line):
    assert not banners(line, "offline")
    line.camera.stop()
    wait_for(line, lambda: CAMERA in banners(line, "offline"), 15, "the offline banner")
    state = camera_state(line)
    assert state in ("offline", "reconnecting"), state
    assert visible(line, f"#banners .banner[data-kind='offline'][data-camera='{CAMERA}']")
    screenshot(line, "dashboard-offline.png")
    # nothing is inspected while the camera is down: the page's counters are the daemon's own, to the part
    line.sub.poll(1.0)
    verdicts = status_fields(line.sub.status(CAMERA))["verdicts"]
    page = {v: number(line, f"{card()} .count-{v.lower()}") for v in ("OK", "NOK", "ERROR")}
    assert page == verdicts, (page, verdicts)
    line.camera.start()
    wait_for(line, lambda: CAMERA not in banners(line, "offline"), 20, "the offline banner to go")
    wait_for(line, lambda: camera_state(line) == "online", 10, "camera state online")
    wait_for(line, lambda: (number(line, f"{card()} .count-ok") or 0) > page["OK"], 15, "parts inspected again")
    errors = [e for e in line.driver.get_log("browser") if e["level"] == "SEVERE" and "Uncaught" in e["message"]]
    assert not errors, errors
