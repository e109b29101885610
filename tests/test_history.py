"""Traceability (issue 18, item 5): the daemon as a subprocess records every published result in a real SQLite file
(OK included, archived frames linked), a database that cannot be written loses records (counted), never results,
retention by size and age, `linewatch history` queries and CSV export, and the same writer and queries against a
real PostgreSQL server started here (Debian's postgresql, psycopg from linewatch[postgresql])."""

from __future__ import annotations

import csv
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from linewatch.line.history import TABLE, Filter, History, Store, parse_when, query
from tests.helpers import free_port, write_video
from tests.test_daemon import (
    ROOT,
    Subscriber,
    daemon_log,
    expected_verdict,
    start_daemon,
    stop,
    video_frames,
    write_config,
)

CAMERA = {"name": "cam1", "kind": "video", "loop": True, "fps": 30, "queue_size": 16}


def rows(db: Path) -> list[dict]:
    store = Store.open("sqlite", db, create=False)
    try:
        return query(store, Filter())
    finally:
        store.close()


def run_line(calibrated, tmp_path, history: dict, seconds: float, archive: dict | None = None, popen=None):
    """The daemon on a looped video (every 4th frame NOK) for `seconds`; (results, last status, exit code)."""
    video = write_video(tmp_path / "line.avi", video_frames(8))
    sections = {"history": history} | ({"archive": archive} if archive else {})
    config, endpoint = write_config(tmp_path, calibrated, [CAMERA | {"source": str(video)}], **sections)
    sub = Subscriber(endpoint)
    proc = popen(config) if popen else start_daemon(config, tmp_path)
    try:
        sub.until(lambda: len(sub.results) >= 1, 30, "a first result")
        sub.poll(seconds)
        assert proc.poll() is None, "the daemon died"
    finally:
        code = stop(proc)
        sub.poll(0.5)
        sub.close()
    return sub.results, sub.statuses[-1], code


@pytest.mark.e2e
def test_the_daemon_records_every_published_result_ok_included_with_its_fields_and_archived_frame(calibrated, tmp_path):
    db = tmp_path / "records" / "history.sqlite"
    archive = {"enabled": True, "dir": str(tmp_path / "archive"), "verdicts": ["NOK"]}
    results, last, code = run_line(calibrated, tmp_path, {"path": str(db)}, 3.0, archive)
    assert code == 0, daemon_log(tmp_path)[-3000:]
    assert last["history"]["lost"] == 0 and last["history"]["last_error"] is None, last["history"]
    assert last["history"]["recorded"] + last["history"]["queued"] == last["results"]
    records = {(r["run_id"], r["seq"]): r for r in rows(db)}
    # every result the daemon published is there (the subscriber may have joined after the first ones)
    assert len(records) == last["results"], (len(records), last["results"])
    assert sorted(seq for _, seq in records) == list(range(1, last["results"] + 1))
    verdicts = {r["verdict"] for r in records.values()}
    assert verdicts == {"OK", "NOK"}, verdicts
    assert len(results) >= 40
    for sent in results:
        rec = records[(sent["run_id"], sent["seq"])]
        assert rec["verdict"] == sent["verdict"] == expected_verdict(sent["frame_index"])
        assert rec["time"] == pytest.approx(sent["publish_time"], abs=1e-6)
        assert rec["frame_time"] == pytest.approx(sent["frame_time"], abs=1e-6)
        assert rec["image_score"] == pytest.approx(sent["image_score"], rel=1e-9)
        assert rec["camera"] == "cam1" and rec["part_id"] is None and rec["error"] is None
        assert rec["model_id"] == sent["model_id"] and rec["calibration_version"] == sent["calibration_version"] == 1
        assert rec["recipe"] == sent.get("recipe")
        assert rec["pixel_threshold"] == pytest.approx(0.5)
        assert rec["regions"] == sent["regions"] and rec["defect_regions"] == sent["defect_regions"]
        assert rec["frame_index"] == sent["frame_index"]
        if sent["verdict"] == "NOK":  # archived: the record names the frame, which is on disk with its header
            frame = tmp_path / "archive" / rec["archive_frame"]
            assert frame.is_file(), rec["archive_frame"]
            sidecar = json.loads(frame.with_suffix(".json").read_text())
            assert (sidecar["seq"], sidecar["run_id"]) == (sent["seq"], sent["run_id"])
            assert sidecar["archive"]["frame"] == rec["archive_frame"]
        else:
            assert rec["archive_frame"] is None
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _fsize_limited(tmp_path: Path, limit: int):
    """Start the daemon with RLIMIT_FSIZE: every file write past `limit` bytes fails (EFBIG), as on a full disk.
    Python ignores SIGXFSZ, so the writes fail instead of killing the process; the log goes through a pipe."""
    log = tmp_path / "daemon.log"

    def popen(config: Path) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "linewatch.cli", "run", "--config", str(config)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
        )

        def pump() -> None:
            with open(log, "wb") as f:
                for line in proc.stdout:  # type: ignore[union-attr]
                    f.write(line)
                    f.flush()

        threading.Thread(target=pump, daemon=True).start()
        return proc

    return popen


@pytest.mark.e2e
def test_a_full_disk_loses_records_counted_and_logged_never_a_result(calibrated, tmp_path):
    db = tmp_path / "history.sqlite"
    results, last, code = run_line(calibrated, tmp_path, {"path": str(db)}, 4.0, popen=_fsize_limited(tmp_path, 48_000))
    assert code == 0
    h = last["history"]
    assert h["lost"] > 0 and h["last_error"], h  # the disk filled up while recording
    assert h["recorded"] + h["lost"] + h["queued"] == last["results"], (h, last["results"])
    assert sum(last["verdicts"].values()) == last["results"] and last["verdicts"]["ERROR"] == 0
    assert len(results) >= 60 and all(r["verdict"] == expected_verdict(r["frame_index"]) for r in results)
    seqs = [r["seq"] for r in results]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "results went on without a gap"
    assert "results not recorded so far" in (tmp_path / "daemon.log").read_text()
    kept = rows(db)  # what was committed before the disk filled is intact and readable
    assert h["recorded"] <= len(kept) <= last["results"]


@pytest.mark.e2e
def test_an_unwritable_history_path_loses_records_never_results(calibrated, tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the history's folder should be")
    results, last, code = run_line(calibrated, tmp_path, {"path": str(blocker / "history.sqlite")}, 2.0)
    assert code == 0
    h = last["history"]
    assert h["recorded"] == 0 and h["lost"] + h["queued"] == last["results"] and h["lost"] > 0, h
    assert "not_a_folder" in h["last_error"] and h["writing"] is False
    assert len(results) >= 30 and {r["verdict"] for r in results} == {"OK", "NOK"}
    assert "results not recorded so far" in daemon_log(tmp_path)


def header(camera: str, seq: int, t: float, verdict: str = "OK", part: str | None = None) -> dict:
    return {
        "camera": camera,
        "seq": seq,
        "run_id": "run000000001",
        "publish_time": t,
        "frame_time": t - 0.02,
        "part_id": part,
        "verdict": verdict,
        "image_score": None if verdict == "ERROR" else 0.1 * (seq % 10),
        "thresholds": {"pixel": 0.5, "image": None},
        "calibration_version": 2,
        "model_id": "a1b2c3d4e5f6",
        "recipe": "bottle-small",
        "regions": [{"bbox": [1, 2, 3, 4], "area": 12, "peak": 0.8, "defect": True}] if verdict == "NOK" else [],
        "regions_total": 1 if verdict == "NOK" else 0,
        "defect_regions": 1 if verdict == "NOK" else 0,
        "error": "camera read failed" if verdict == "ERROR" else None,
        "frame_index": seq,
    }


def record_all(history: History, headers: list[dict], timeout: float = 20.0) -> None:
    history.start()
    for h in headers:
        while not history.submit(h):  # the test's own producer waits instead of losing rows
            time.sleep(0.01)
    history.close(timeout)


@pytest.mark.integration
def test_size_retention_keeps_the_newest_under_the_cap(tmp_path):
    db = tmp_path / "h.sqlite"
    cap_mb = 0.1
    history = History(["cam1"], "sqlite", db, max_mb=cap_mb, queue_size=100_000)
    now = time.time()
    n = 4000
    record_all(history, [header("cam1", i, now - n + i, part=f"P{i:05d}") for i in range(1, n + 1)])
    assert history.counts["cam1"].recorded == n and history.counts["cam1"].lost == 0
    assert history.deleted > 0
    kept = rows(db)
    seqs = sorted(r["seq"] for r in kept)
    assert seqs[-1] == n and seqs == list(range(seqs[0], n + 1)), "the oldest went, the newest stayed, no holes"
    assert len(kept) + history.deleted == n
    store = Store.open("sqlite", db, create=False)
    used = store.used_bytes()
    store.close()
    assert used is not None and used <= cap_mb * 1024 * 1024, used
    assert db.stat().st_size <= cap_mb * 1024 * 1024 * 1.2, "freed pages go back to the file system"


@pytest.mark.integration
def test_age_retention_deletes_records_older_than_max_days(tmp_path):
    db = tmp_path / "h.sqlite"
    now = time.time()
    old = [header("cam1", i, now - 10 * 86400 + i) for i in range(1, 301)]
    new = [header("cam1", i, now - 3600 + i) for i in range(301, 401)]
    record_all(History(["cam1"], "sqlite", db), old + new)
    assert len(rows(db)) == 400
    history = History(["cam1"], "sqlite", db, max_days=7)
    record_all(history, [header("cam1", 401, now)])  # retention runs as the writer opens the database
    assert sorted(r["seq"] for r in rows(db)) == list(range(301, 402))
    assert history.deleted == 300


@pytest.fixture
def filled_db(tmp_path):
    """Records yesterday and today, two cameras, all verdicts."""
    db = tmp_path / "h.sqlite"
    midnight = datetime.now().astimezone().replace(hour=0, minute=0, second=0, microsecond=0)
    yesterday_noon = (midnight - timedelta(hours=12)).timestamp()
    today = min(time.time() - 60, midnight.timestamp() + 60)
    headers = []
    for i in range(1, 41):
        cam = "cam1" if i % 2 else "cam2"
        verdict = "NOK" if i % 5 == 0 or i % 5 == 1 else "ERROR" if i % 7 == 0 else "OK"
        when = yesterday_noon + i if i <= 20 else today + i
        headers.append(header(cam, i, when, verdict, part=f"A-{i:04d}"))
    store = Store.open("sqlite", db)
    from linewatch.line.history import row_from_header

    store.insert([row_from_header(h, f"f{h['seq']}.png" if h["verdict"] == "NOK" else None, "pc1") for h in headers])
    store.close()
    return db, headers


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "linewatch.cli", "history", *args], cwd=ROOT, capture_output=True, text=True
    )


@pytest.mark.e2e
def test_history_command_finds_yesterdays_nok_parts_of_one_camera_and_exports_csv(filled_db, tmp_path):
    db, headers = filled_db
    want = sorted(
        (h for h in headers if h["camera"] == "cam1" and h["verdict"] == "NOK" and h["seq"] <= 20),
        key=lambda h: -h["publish_time"],
    )
    assert want
    out = tmp_path / "nok.csv"
    args = ["--db", str(db), "--camera", "cam1", "--verdict", "nok", "--since", "yesterday", "--until", "today"]
    done = cli(*args, "--csv", str(out))
    assert done.returncode == 0, done.stderr
    with open(out, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["part_id"] for r in table] == [h["part_id"] for h in want]
    first, h = table[0], want[0]
    assert first["verdict"] == "NOK" and first["camera"] == "cam1" and first["recipe"] == "bottle-small"
    assert float(first["image_score"]) == pytest.approx(h["image_score"])
    assert json.loads(first["regions"]) == h["regions"] and first["archive_frame"] == f"f{h['seq']}.png"
    assert first["model_id"] == "a1b2c3d4e5f6" and first["calibration_version"] == "2" and first["station"] == "pc1"
    assert datetime.fromisoformat(first["time_utc"].replace("Z", "+00:00")).timestamp() == pytest.approx(
        h["publish_time"], abs=1e-3
    )
    # the terminal listing and --count agree; --part finds one part; --limit cuts the newest
    listed = cli(*args)
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == len(want) + 1
    assert cli(*args, "--count").stdout.strip() == str(len(want))
    one = cli("--db", str(db), "--part", "A-0025", "--json")
    assert [json.loads(line)["seq"] for line in one.stdout.splitlines()] == [25]
    newest = cli("--db", str(db), "--limit", "3", "--json")
    assert [json.loads(line)["seq"] for line in newest.stdout.splitlines()] == [40, 39, 38]
    errors = cli("--db", str(db), "--verdict", "ERROR", "--csv", "-")
    error_seqs = [h["seq"] for h in reversed(headers) if h["verdict"] == "ERROR"]
    table = list(csv.DictReader(errors.stdout.splitlines()))
    assert [int(r["seq"]) for r in table] == error_seqs and len(error_seqs) == 3
    assert {r["error"] for r in table} == {"camera read failed"} and {r["image_score"] for r in table} == {""}


@pytest.mark.e2e
def test_history_command_refuses_bad_times_and_missing_databases(tmp_path):
    bad = cli("--db", str(tmp_path / "x.sqlite"), "--since", "last tuesday")
    assert bad.returncode == 2 and "not a time: 'last tuesday'" in bad.stderr
    missing = cli("--db", str(tmp_path / "x.sqlite"))
    assert missing.returncode == 4 and "no history database" in missing.stderr
    assert not (tmp_path / "x.sqlite").exists(), "a query never creates a database"
    nowhere = cli("--camera", "cam1")
    assert nowhere.returncode == 2 and "--config FILE, --db FILE or --dsn DSN" in nowhere.stderr


@pytest.mark.unit
def test_parse_when_reads_iso_words_and_ages():
    now = datetime(2026, 5, 20, 14, 30, tzinfo=datetime.now().astimezone().tzinfo)
    midnight = now.replace(hour=0, minute=0)
    assert parse_when("today", now) == midnight.timestamp()
    assert parse_when("Yesterday", now) == (midnight - timedelta(days=1)).timestamp()
    assert parse_when("now", now) == now.timestamp()
    assert parse_when("2h", now) == now.timestamp() - 7200
    assert parse_when("7d ago", now) == now.timestamp() - 7 * 86400
    assert parse_when("2026-05-20T12:00:00Z") == datetime(2026, 5, 20, 12, tzinfo=None).timestamp() - (
        datetime(2026, 5, 20, 12).astimezone().utcoffset().total_seconds()  # type: ignore[union-attr]
    )
    assert parse_when("2026-05-20T12:00:00+02:00") == parse_when("2026-05-20T10:00:00Z")
    for bad in ("", "soon", "-2h", "2x", "2026-13-01"):
        with pytest.raises(ValueError, match="not a time"):
            parse_when(bad, now)


@pytest.mark.integration
def test_query_of_a_hundred_thousand_records_is_an_index_scan_well_under_a_second(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from history_query import build
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    db = tmp_path / "bench.sqlite"
    build(db, 100_000, cameras=4, days=30)
    store = Store.open("sqlite", db, create=False)
    try:
        flt = Filter(parse_when("yesterday"), parse_when("today"), "cam1", None, "NOK")
        from linewatch.line.history import select

        sql, params = select(flt)
        plan = " ".join(str(r) for r in store.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall())
        assert "camera_verdict_time" in plan, plan
        t0 = time.perf_counter()
        found = query(store, flt)
        took = time.perf_counter() - t0
    finally:
        store.close()
    assert 10 < len(found) < 200 and all(r["camera"] == "cam1" and r["verdict"] == "NOK" for r in found)
    assert took < 0.5, took


# --- PostgreSQL: a real server, started here ---------------------------------------------------------------------


def _pg_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    assert found, "Debian's postgresql package is needed (apt-get install postgresql)"
    return str(found[-1])


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster on a free loopback port (trust auth, fsync off); its DSN. Its folder is
    straight under the temp dir: the server's user could not reach one inside pytest's private tmp_path."""
    folder = Path(tempfile.mkdtemp(prefix="linewatch-pg-"))
    data, port = folder / "data", free_port()
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(folder, "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_postgres, _pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
        check=True,
        capture_output=True,
    )
    opts = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    pg_ctl = [*as_postgres, _pg_bin("pg_ctl"), "-D", str(data)]
    # -l: the server's output goes to a file, not to our pipes (run() would wait for the server to close them)
    log = folder / "server.log"
    subprocess.run([*pg_ctl, "-o", opts, "-l", str(log), "-w", "-t", "30", "start"], check=True, timeout=60)
    try:
        yield f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.integration
def test_postgresql_records_queries_and_retention_on_a_real_server(postgres, tmp_path):
    now = time.time()
    headers = [header("cam1", i, now - 9 * 86400 + i, "NOK" if i % 3 == 0 else "OK", f"B-{i}") for i in range(1, 31)]
    headers += [header("cam2", i, now - 600 + i, "NOK" if i % 2 else "OK", f"C-{i}") for i in range(31, 61)]
    history = History(["cam1", "cam2"], "postgresql", dsn=postgres, station="pc7")
    record_all(history, headers)
    assert history.totals() == {"cam1": (30, 0), "cam2": (30, 0)} and history.last_error is None
    store = Store.open("postgresql", dsn=postgres, create=False)
    try:
        got = query(store, Filter(since=now - 3600, camera="cam2", verdict="NOK"))
        assert [r["seq"] for r in got] == sorted(
            (h["seq"] for h in headers[30:] if h["verdict"] == "NOK"), reverse=True
        )
        assert got[0]["regions"] == headers[-2]["regions"] and got[0]["station"] == "pc7"
        assert got[0]["time"] == headers[-2]["publish_time"], "DOUBLE PRECISION keeps the time to the microsecond"
    finally:
        store.close()
    done = cli("--dsn", postgres, "--part", "B-9", "--csv", "-")
    assert done.returncode == 0, done.stderr
    assert [r["seq"] for r in csv.DictReader(done.stdout.splitlines())] == ["9"]
    # max_days on the server: cam1's records are nine days old
    aged = History(["cam1"], "postgresql", dsn=postgres, max_days=7)
    record_all(aged, [header("cam1", 99, now)])
    assert aged.deleted == 30
    store = Store.open("postgresql", dsn=postgres, create=False)
    try:
        assert store.count() == 31
        store.execute(f"DROP TABLE {TABLE}")
        store.conn.commit()
    finally:
        store.close()
