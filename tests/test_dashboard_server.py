"""`linewatch dashboard` as a real subprocess on a free port, against a real daemon subprocess on a looped video
(grey frames OK, frames with a white square NOK) with previews and the archive on; fetched with urllib."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path

import cv2
import numpy as np
import pytest

from linewatch.dashboard.server import archived_frame, host_name, is_loopback_host, load_token, parse_listen
from linewatch.errors import ConfigError
from linewatch.feedback import pending_counts
from linewatch.line.archive import Archive
from tests.helpers import calibrated_bundle, free_port, write_video
from tests.test_daemon import daemon_log, start_daemon, stop, write_config

ROOT = Path(__file__).resolve().parents[1]
CAMERA = "cam1"
SIZE = 96  # camera frames; the model sees 64 x 64, previews are 48 px wide
TOKEN = "s3cret-token-for-the-line-0123456789"
URL_LINE = re.compile(r"^dashboard: (http://\S+)$", re.M)


def frames(n: int = 8) -> list[np.ndarray]:
    out = []
    for i in range(n):
        img = np.full((SIZE, SIZE, 3), 128, np.uint8)
        if i % 4 == 1:
            img[30:60, 30:60] = 255
        out.append(img)
    return out


def start_dashboard(tmp: Path, name: str, *args: str) -> tuple[subprocess.Popen, str]:
    log = tmp / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "linewatch.cli", "dashboard", *args],
        cwd=ROOT,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )
    end = time.monotonic() + 30
    while (found := URL_LINE.search(log.read_text(errors="replace"))) is None:
        assert proc.poll() is None, f"dashboard exited with {proc.returncode}: {log.read_text()[-3000:]}"
        assert time.monotonic() < end, log.read_text()[-3000:]
        time.sleep(0.05)
    return proc, found[1]


class Line:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.archive = tmp / "archive"
        self.feedback = tmp / "feedback"
        bundle = calibrated_bundle(tmp / "bundle", 64)
        video = write_video(tmp / "line.avi", frames())
        cameras = [{"name": CAMERA, "kind": "video", "source": str(video), "loop": True, "fps": 20, "queue_size": 16}]
        preview = {"enabled": True, "max_fps": 4.0, "width": 48, "heatmap_size": 32}
        self.config, self.endpoint = write_config(
            tmp, bundle, cameras, publish={"preview": preview}, archive={"enabled": True, "dir": str(self.archive)}
        )
        self.archive.mkdir()
        token_file = tmp / "token"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
        self.dashboard, self.url = start_dashboard(
            tmp,
            "dashboard",
            *("--connect", self.endpoint, "--listen", f"127.0.0.1:{free_port()}", "--archive", str(self.archive)),
            *("--feedback", str(self.feedback), "--token-file", str(token_file), "--history", "50"),
        )
        self.daemon = start_daemon(self.config, tmp)

    def logs(self) -> str:
        return (
            f"--- daemon ---\n{daemon_log(self.tmp)[-2000:]}\n"
            f"--- dashboard ---\n{(self.tmp / 'dashboard.log').read_text(errors='replace')[-2000:]}"
        )

    def close(self) -> None:
        for proc in (self.dashboard, self.daemon):
            if proc.poll() is None:
                stop(proc)


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    line = Line(tmp_path_factory.mktemp("dashboard_server"))
    try:
        yield line
    finally:
        line.close()


def get(url: str, headers: dict | None = None) -> tuple[int, Message, bytes]:
    """(status, headers (case-insensitive), body), for error statuses too."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def post(url: str, body: object, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def state(line: Line) -> dict:
    status, _, body = get(line.url + "api/state")
    assert status == 200
    return json.loads(body)


def wait_state(line: Line, cond, what: str, timeout: float = 30.0) -> dict:
    end = time.monotonic() + timeout
    while True:
        snap = state(line)
        if cond(snap):
            return snap
        assert line.daemon.poll() is None and line.dashboard.poll() is None, line.logs()
        assert time.monotonic() < end, f"timed out waiting for {what}: {json.dumps(snap)[:2000]}\n{line.logs()}"
        time.sleep(0.2)


def archived_nok(line: Line) -> dict:
    """A NOK part of the gallery whose full frame the daemon has archived (the archive writes on its own thread)."""

    def found(snap):
        return [
            g
            for g in snap["gallery"]
            if g["verdict"] == "NOK"
            and g["has_preview"]
            and list(line.archive.glob(f"*_{CAMERA}_{g['seq']:09d}_NOK.json"))
        ]

    return found(wait_state(line, lambda s: found(s), "an archived NOK part in the gallery"))[0]


def sse_events(url: str, wanted: int, timeout: float = 15.0) -> list[tuple[str, dict]]:
    events: list[tuple[str, dict]] = []
    name = None
    end = time.monotonic() + timeout
    with urllib.request.urlopen(url + "api/events", timeout=timeout) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        while len(events) < wanted and time.monotonic() < end:
            raw = r.readline().decode().rstrip("\n")
            if raw.startswith("event: "):
                name = raw[7:]
            elif raw.startswith("data: ") and name:
                events.append((name, json.loads(raw[6:])))
                name = None
    return events


# --- the live view -------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_state_fills_and_the_event_stream_delivers_results(line):
    snap = wait_state(
        line,
        lambda s: CAMERA in s["cameras"] and len(s["cameras"][CAMERA]["trend"]["seq"]) >= 20 and s["gallery"],
        "20 results and a NOK part",
    )
    cam = snap["cameras"][CAMERA]
    assert cam["state"] == "online" and cam["alive"] is True and cam["calibration_version"] == 1
    assert re.fullmatch(r"[0-9a-f]{12}", cam["model_id"])
    assert 0 < cam["fps"] <= 25 and cam["latency"]["p50"] is not None
    counts = cam["counts"]
    assert counts["NOK"] >= 4 and counts["OK"] >= 3 * counts["NOK"] - 4 and counts["ERROR"] == 0
    trend = cam["trend"]
    assert len(trend["seq"]) <= 50  # --history
    for score, verdict in zip(trend["score"], trend["verdict"]):
        assert (score > 0.5) == (verdict == "NOK"), (score, verdict)  # the threshold drawn is the one judged by
    assert set(trend["pixel"]) == {0.5}
    assert all(g["verdict"] == "NOK" for g in snap["gallery"])
    seqs = [g["seq"] for g in snap["gallery"]]
    assert seqs == sorted(seqs, reverse=True)
    assert snap["feedback"] == {
        "enabled": True,
        "pending": {"false_reject": 0, "missed_defect": 0},
        "token_required": True,
        "kinds": {"false_reject": "NOK", "missed_defect": "OK"},
    }
    assert snap["banners"] == [] and snap["daemon"]["heard"] is True

    events = sse_events(line.url, 40)
    results = [d for name, d in events if name == "result"]
    assert len(results) >= 10 and {"status", "preview"} <= {name for name, _ in events}, [n for n, _ in events]
    seqs = [d["point"]["seq"] for d in results]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert seqs[0] > cam["seq"] - 5  # live: the parts after the snapshot, not a replay
    for d in results:
        assert d["camera"] == CAMERA and d["verdict"] == d["point"]["verdict"]
        assert (d["gallery_item"] is not None) == (d["verdict"] == "NOK")
    previews = [d for name, d in events if name == "preview"]
    assert all(p["latest_preview"]["frame"] == f"/api/frame/{CAMERA}/{p['seq']}.jpg" for p in previews)


@pytest.mark.e2e
def test_frames_heat_maps_masks_and_part_details_are_served(line):
    part = archived_nok(line)
    seq = part["seq"]
    base = f"{line.url}api"
    # the full frame from the archive: exactly the archived PNG (the frame as inspected, 96 px)
    status, headers, body = get(f"{base}/frame/{CAMERA}/{seq}.jpg")
    assert status == 200 and headers["Content-Type"] == "image/png" and headers["X-Frame-Source"] == "archive"
    (archived,) = line.archive.glob(f"*_{CAMERA}_{seq:09d}_NOK.png")
    assert body == archived.read_bytes()
    assert cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR).shape == (SIZE, SIZE, 3)
    # the preview the daemon sent (48 px JPEG), for the live view
    status, headers, body = get(f"{base}/frame/{CAMERA}/{seq}.jpg?preview=1")
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and headers["X-Frame-Source"] == "preview"
    img = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (48, 48, 3) and img[20:28, 20:28].min() > 200  # the white square, scaled
    # heat map: colour-mapped, transparent where the map is low, opaque-ish on the defect
    status, headers, body = get(f"{base}/heatmap/{CAMERA}/{seq}.png")
    heat = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)
    assert status == 200 and heat.shape == (32, 32, 4)
    assert heat[0, 0, 3] == 0 and heat[12, 12, 3] > 100 and heat[12, 12, 2] > heat[12, 12, 0]  # red, not blue
    status, _, body = get(f"{base}/heatmap/{CAMERA}/{seq}.png?raw=1")
    assert status == 200 and cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED).ndim == 2
    # the published mask, and its outline for the overlay
    status, _, body = get(f"{base}/mask/{CAMERA}/{seq}.png")
    mask = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)
    assert status == 200 and mask.shape == (64, 64) and mask[30, 30] == 255 and mask[2, 2] == 0
    status, _, body = get(f"{base}/mask/{CAMERA}/{seq}.png?outline=1")
    outline = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)
    assert outline.shape == (64, 64, 4) and outline[30, 30, 3] == 0 and outline[:, :, 3].any()
    # the detail: header, regions, reason, links
    status, _, body = get(f"{base}/part/{CAMERA}/{seq}")
    detail = json.loads(body)
    assert status == 200 and detail["verdict"] == "NOK" and detail["header"]["seq"] == seq
    assert detail["regions"] and detail["regions"][0]["defect"] is True and detail["defect_regions"] >= 1
    assert detail["reason"].startswith(f"{detail['defect_regions']} defect region(s)")
    assert detail["frame_source"] == "archive" and detail["feedback"] == {"enabled": True, "allowed": ["false_reject"]}
    assert detail["links"]["frame"] == f"/api/frame/{CAMERA}/{seq}.jpg"
    # what is not held is a 404 that says so
    for path in (f"frame/{CAMERA}/999999.jpg", f"part/{CAMERA}/999999", f"heatmap/nocam/{seq}.png"):
        status, _, body = get(f"{base}/{path}")
        assert status == 404 and re.search(r"part \w+/\d+", json.loads(body)["error"]), path


# --- feedback ------------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_feedback_needs_the_token_and_writes_the_frame_and_its_sidecar(line):
    part = archived_nok(line)
    url = line.url + "api/feedback"
    body = {"camera": CAMERA, "seq": part["seq"], "kind": "false_reject", "who": "Dana", "why": "fixture scratch"}
    assert post(url, body)[0] == 401
    assert post(url, body, {"Authorization": "Bearer wrong-token-0123456789"})[0] == 401
    assert not line.feedback.joinpath("false_reject").exists()  # nothing written without the token
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, reply = post(url, body | {"kind": "looks_fine"}, auth)
    assert status == 400 and "kind" in reply["error"]
    status, reply = post(url, body | {"kind": "missed_defect"}, auth)  # a NOK part is no missed defect
    assert status == 400 and "OK part" in reply["error"]
    assert post(url, body | {"seq": 99_999_999}, auth)[0] == 404
    assert post(url, body | {"who": ""}, auth)[0] == 400
    assert post(url, body, auth | {"Origin": "http://evil.example"})[0] == 403
    status, reply = post(url, body, auth | {"Content-Type": "text/plain"})
    assert status == 415
    assert pending_counts(line.feedback) == {"false_reject": 0, "missed_defect": 0}

    status, reply = post(url, body, auth)
    assert status == 201, reply
    image = Path(reply["path"])
    assert reply["source"] == "archive" and reply["pending"] == {"false_reject": 1, "missed_defect": 0}
    assert image.parent == line.feedback / "false_reject" / CAMERA and image.suffix == ".png"
    (archived,) = line.archive.glob(f"*_{CAMERA}_{part['seq']:09d}_NOK.png")
    assert image.read_bytes() == archived.read_bytes()  # the full frame as inspected
    sidecar = json.loads(image.with_suffix(".json").read_text())
    assert sidecar["who"] == "Dana" and sidecar["why"] == "fixture scratch" and sidecar["kind"] == "false_reject"
    assert sidecar["header"]["seq"] == part["seq"] and sidecar["header"]["run_id"] == part["run_id"]
    assert sidecar["source"] == "archive" and (sidecar["image"]["width"], sidecar["image"]["height"]) == (SIZE, SIZE)
    assert wait_state(line, lambda s: s["feedback"]["pending"]["false_reject"] == 1, "pending count")

    # an OK part is marked from its preview (OK parts are not archived)
    def ok_previewed(snap):
        return [r for r in snap["recent"] if r["verdict"] == "OK"]

    ok = ok_previewed(wait_state(line, ok_previewed, "an OK part with a preview"))[0]
    status, reply = post(url, body | {"seq": ok["seq"], "kind": "missed_defect", "why": ""}, auth)
    assert status == 201, reply
    assert reply["source"] == "preview" and Path(reply["path"]).suffix == ".jpg"
    saved = cv2.imread(reply["path"], cv2.IMREAD_COLOR)
    assert saved is not None and saved.shape == (48, 48, 3)
    assert pending_counts(line.feedback) == {"false_reject": 1, "missed_defect": 1}


@pytest.mark.e2e
def test_without_a_feedback_folder_marking_is_off_and_a_foreign_host_name_is_refused(line):
    proc, url = start_dashboard(line.tmp, "viewer", "--connect", line.endpoint, "--listen", f"127.0.0.1:{free_port()}")
    try:
        snap = state(type("L", (), {"url": url})())
        assert snap["feedback"]["enabled"] is False and snap["archive"] is False
        status, reply = post(url + "api/feedback", {"camera": CAMERA, "seq": 1, "kind": "false_reject", "who": "x"})
        assert status == 403 and "--feedback" in reply["error"]
        # DNS rebinding: a page from another site that resolves its name to 127.0.0.1 is not answered
        host = url.split("//")[1].rstrip("/")
        for foreign in ("evil.example", "127.evil.example"):
            status, _, body = get(url + "api/state", {"Host": f"{foreign}:{host.split(':')[1]}"})
            assert status == 421 and b"loopback" in body, foreign
        status, headers, _ = get(url + "api/state", {"Host": host.replace("127.0.0.1", "localhost")})
        assert status == 200 and "default-src 'self'" in headers["content-security-policy"]
        # a SIGTERM ends it cleanly even with an event stream open
        stream = urllib.request.urlopen(url + "api/events", timeout=10)
        stream.readline()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        stream.close()
    finally:
        if proc.poll() is None:
            proc.kill()


# --- the page ------------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_the_page_and_its_scripts_come_from_the_dashboard_alone(line):
    status, headers, page = get(line.url)
    html = page.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    for dom in ('id="cameras"', 'id="banners"', 'id="gallery"', 'id="recent"', 'id="detail"', "feedback-pending"):
        assert dom in html, dom
    links = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html, re.I)
    assert "/static/vendor/uPlot.iife.min.js" in links and "/static/app.js" in links
    assert not [u for u in links if re.match(r"(?i)^(https?:)?//", u)], links  # no other host, no CDN
    for link in links:
        if link.startswith("/"):
            status, _, body = get(line.url + link.lstrip("/"))
            assert status == 200 and body, link
    for name in ("app.js", "style.css"):
        _, _, body = get(line.url + "static/" + name)
        assert not re.findall(rb"(?i)(?:src|href|url)\s*[=(]\s*[\"']?(?:https?:)?//", body), name
    _, _, script = get(line.url + "static/vendor/uPlot.iife.min.js")
    assert b"uPlot" in script and b"(v1.6.32)" in script
    assert not re.findall(rb"(?i)(?:src|href)\s*=\s*[\"'](?:https?:)?//", script)
    import linewatch.dashboard

    vendor = Path(linewatch.dashboard.__file__).parent / "static" / "vendor"  # as installed (the wheel too)
    assert "MIT License" in (vendor / "LICENSE").read_text() and "1.6.32" in (vendor / "README.md").read_text()


# --- starting it ---------------------------------------------------------------------------------------------------


def run_dashboard(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "linewatch.cli", "dashboard", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.e2e
def test_beyond_loopback_marking_needs_a_token_or_the_dashboard_refuses_to_start(tmp_path):
    port = str(free_port())
    out = run_dashboard("--listen", f"0.0.0.0:{port}", "--feedback", str(tmp_path / "fb"))
    assert out.returncode == 2 and "needs a token" in out.stderr, out.stderr
    loose = tmp_path / "token"
    loose.write_text(TOKEN)
    loose.chmod(0o644)
    out = run_dashboard("--listen", f"0.0.0.0:{port}", "--feedback", str(tmp_path / "fb"), "--token-file", str(loose))
    assert out.returncode == 2 and "chmod 600" in out.stderr, out.stderr
    out = run_dashboard(
        "--listen", f"0.0.0.0:{port}", "--feedback", str(tmp_path / "fb"), env={"LINEWATCH_DASHBOARD_TOKEN": "short"}
    )
    assert out.returncode == 2 and "at least 16" in out.stderr, out.stderr
    not_a_folder = tmp_path / "archive.txt"  # a folder that does not exist yet is fine (the daemon makes it)
    not_a_folder.write_text("")
    out = run_dashboard("--archive", str(not_a_folder))
    assert out.returncode == 2 and "--archive" in out.stderr, out.stderr


@pytest.mark.unit
def test_listen_addresses_and_tokens(tmp_path, monkeypatch):
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("8080", "host:", "host:99999", "a b:80"):
        with pytest.raises(ConfigError):
            parse_listen(bad)
    assert is_loopback_host("127.0.0.5") and is_loopback_host("::1") and is_loopback_host("localhost")
    assert not is_loopback_host("0.0.0.0") and not is_loopback_host("10.0.0.5") and not is_loopback_host("line-pc")
    assert not is_loopback_host("127.evil.example")  # a name that only looks like loopback
    hosts = {
        "127.0.0.1:8080": "127.0.0.1",
        "localhost": "localhost",
        "[::1]:8080": "::1",
        "evil.example:80": "evil.example",
    }
    assert {h: host_name(h) for h in hosts} == hosts
    monkeypatch.delenv("LINEWATCH_DASHBOARD_TOKEN", raising=False)
    assert load_token(None) is None
    monkeypatch.setenv("LINEWATCH_DASHBOARD_TOKEN", TOKEN)
    assert load_token(None) == TOKEN
    file = tmp_path / "token"
    file.write_text("two words in here, long enough\n")
    file.chmod(0o600)
    with pytest.raises(ConfigError, match="one word"):
        load_token(str(file))
    with pytest.raises(ConfigError, match="not found"):
        load_token(str(tmp_path / "nope"))


@pytest.mark.integration
def test_the_archived_frame_is_found_by_camera_seq_and_run(tmp_path):
    archive = Archive(tmp_path, max_bytes=10**7)
    frame = np.full((20, 30, 3), 7, np.uint8)
    for i, (camera, run_id) in enumerate((("cam1", "runA"), ("cam1", "runB"), ("x_cam1", "runA"))):
        header = {"camera": camera, "seq": 5, "run_id": run_id, "verdict": "NOK"}
        image = frame + len(camera) + 4 * (run_id == "runB")
        assert archive.write(camera, 5, "NOK", image, None, 1e9 + i, header)
    found = archived_frame(tmp_path, "cam1", 5, "runB")
    assert found is not None and cv2.imread(str(found))[0, 0, 0] == 7 + 4 + 4
    found = archived_frame(tmp_path, "cam1", 5, "runA")
    assert found is not None and cv2.imread(str(found))[0, 0, 0] == 7 + 4  # not x_cam1's, whose name ends alike
    assert archived_frame(tmp_path, "cam1", 6, "runA") is None and archived_frame(tmp_path, "cam1", 5, "runC") is None
