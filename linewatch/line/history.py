"""Traceability: a retained, queryable record of every published result, OK included (torch-free).

One row per result as published (docs/HISTORY.md): time, camera, recipe, part id, verdict, score, regions, model id,
calibration version, the archived frame's file name when the archive kept one, and what ties a row to the wire
(run_id, seq). SQLite by default (WAL, one file under the state directory), PostgreSQL for a plant-wide database
(`psycopg`, the extra `linewatch[postgresql]`); the SQL is the same for both apart from the id column and the
placeholders.

Recording never blocks inspection: the publishing thread only puts a row on a bounded queue; a writer thread of its
own commits rows in batches (one transaction per batch) and applies the retention policy (age: both backends; size:
SQLite). A full queue, a full disk or an unwritable path costs rows, never results: every row not written is counted
per camera (status `history`, Prometheus `linewatch_history_lost_total`) and logged at most once a minute, and the
writer keeps retrying to open the database.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import queue
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    from linewatch.line.config import Config

log = logging.getLogger("linewatch.line.history")

TABLE = "linewatch_results"
LOG_EVERY_S = 60.0
RETRY_OPEN_S = 5.0  # a database that could not be opened (or broke) is tried again this often
AGE_CHECK_S = 60.0  # the age retention runs this often (the size check runs after every batch: it is O(1))
DELETE_CHUNK = 20_000  # rows deleted per retention step, so a large purge never holds the writer for long
SIZE_TARGET = 0.9  # over the size cap, the oldest rows go until the used size is this fraction of it
BATCH = 500  # rows per transaction at most

# (column, SQL type); `id` comes first and differs per dialect. DOUBLE PRECISION and BIGINT mean the same in
# SQLite (REAL / INTEGER affinity) and PostgreSQL (8-byte float / integer).
COLUMNS: tuple[tuple[str, str], ...] = (
    ("time", "DOUBLE PRECISION NOT NULL"),  # publish_time, Unix seconds
    ("frame_time", "DOUBLE PRECISION"),
    ("station", "TEXT"),
    ("camera", "TEXT NOT NULL"),
    ("recipe", "TEXT"),
    ("part_id", "TEXT"),
    ("verdict", "TEXT NOT NULL"),
    ("image_score", "DOUBLE PRECISION"),
    ("pixel_threshold", "DOUBLE PRECISION"),
    ("image_threshold", "DOUBLE PRECISION"),
    ("defect_regions", "BIGINT"),
    ("regions_total", "BIGINT"),
    ("regions", "TEXT"),  # JSON: [{"bbox": [x, y, w, h], "area", "peak", "defect"}, ...] as published
    ("model_id", "TEXT"),
    ("calibration_version", "BIGINT"),
    ("error", "TEXT"),
    ("run_id", "TEXT"),
    ("seq", "BIGINT"),
    ("frame_index", "BIGINT"),
    ("archive_frame", "TEXT"),  # file name of the archived frame (in archive.dir), when the archive kept it
)
COLUMN_NAMES = tuple(name for name, _ in COLUMNS)
INDEXES = (
    f"CREATE INDEX IF NOT EXISTS {TABLE}_camera_verdict_time ON {TABLE} (camera, verdict, time)",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_time ON {TABLE} (time)",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_part ON {TABLE} (part_id)",
)
ID_COLUMN = {"sqlite": "id INTEGER PRIMARY KEY", "postgresql": "id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"}
VERDICTS = ("OK", "NOK", "ERROR")


def create_statements(dialect: str) -> list[str]:
    cols = ", ".join(f"{name} {kind}" for name, kind in COLUMNS)
    return [f"CREATE TABLE IF NOT EXISTS {TABLE} ({ID_COLUMN[dialect]}, {cols})", *INDEXES]


INSERT = f"INSERT INTO {TABLE} ({', '.join(COLUMN_NAMES)}) VALUES ({', '.join('?' for _ in COLUMN_NAMES)})"


def row_from_header(header: Mapping[str, Any], archive_frame: str | None, station: str | None) -> tuple[Any, ...]:
    """The row of one result header as published (SentResultHeader: publish_time and run_id stamped)."""
    thresholds = header.get("thresholds") or {}
    published = header.get("publish_time")
    values = {
        "time": published if published is not None else time.time(),
        "frame_time": header.get("frame_time"),
        "station": station,
        "camera": header["camera"],
        "recipe": header.get("recipe"),
        "part_id": header.get("part_id"),
        "verdict": str(header["verdict"]),
        "image_score": header.get("image_score"),
        "pixel_threshold": thresholds.get("pixel"),
        "image_threshold": thresholds.get("image"),
        "defect_regions": header.get("defect_regions"),
        "regions_total": header.get("regions_total"),
        "regions": json.dumps(header.get("regions") or [], separators=(",", ":"), default=_plain),
        "model_id": header.get("model_id"),
        "calibration_version": header.get("calibration_version"),
        "error": header.get("error"),
        "run_id": header.get("run_id"),
        "seq": header.get("seq"),
        "frame_index": header.get("frame_index"),
        "archive_frame": archive_frame,
    }
    return tuple(values[name] for name in COLUMN_NAMES)


def _plain(value: Any) -> Any:
    """json.dumps fallback for the tuples and enums a header may still hold."""
    return list(value) if isinstance(value, tuple) else str(value)


# --- the database: one connection, either dialect ------------------------------------------------------------


class Store:
    """One connection to the history table; `?` placeholders are rewritten for PostgreSQL (psycopg's `%s`)."""

    def __init__(self, conn: Any, dialect: str, path: Path | None = None):
        self.conn = conn
        self.dialect = dialect
        self.path = path

    @classmethod
    def open(
        cls, backend: str, path: str | Path | None = None, dsn: str | None = None, *, create: bool = True
    ) -> Store:
        """Open (and, with `create`, make) the table. sqlite: WAL, synchronous NORMAL, incremental auto-vacuum (so
        the size retention gives pages back to the file system). Raises OSError/sqlite3 or psycopg errors."""
        if backend == "postgresql":
            try:  # optional (linewatch[postgresql]); imported by name so type checks pass without it
                psycopg = importlib.import_module("psycopg")
            except ModuleNotFoundError as exc:
                raise ModuleNotFoundError(
                    "history.backend postgresql needs psycopg: pip install 'linewatch[postgresql]'", name=exc.name
                ) from None
            conn = psycopg.connect(dsn or "", connect_timeout=10)
            store = cls(conn, "postgresql")
        else:
            if path is None:
                raise ValueError("a SQLite history needs a path")
            path = Path(path)
            if not create and not path.is_file():
                raise FileNotFoundError(f"no history database at {path}")
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(path), timeout=5.0, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=5000")
            if create:
                conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect only on a new, empty file
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise sqlite3.OperationalError(f"{path}: cannot switch to WAL (journal mode {mode})")
            conn.execute("PRAGMA synchronous=NORMAL")
            store = cls(conn, "sqlite", path)
        if create:
            store.create()
        return store

    def sql(self, statement: str) -> str:
        return statement.replace("?", "%s") if self.dialect == "postgresql" else statement

    def execute(self, statement: str, params: Sequence[Any] = ()) -> Any:
        return self.conn.execute(self.sql(statement), params)

    def create(self) -> None:
        with self.transaction():
            for statement in create_statements(self.dialect):
                self.execute(statement)

    def transaction(self) -> Any:
        if self.dialect == "postgresql":
            return self.conn.transaction()
        return _SqliteTransaction(self.conn)

    def insert(self, rows: Sequence[tuple[Any, ...]]) -> None:
        with self.transaction():
            if self.dialect == "postgresql":
                with self.conn.cursor() as cur:
                    cur.executemany(self.sql(INSERT), rows)
            else:
                self.conn.executemany(INSERT, rows)

    def delete_older_than(self, cutoff: float, limit: int = DELETE_CHUNK) -> int:
        with self.transaction():
            cur = self.execute(
                f"DELETE FROM {TABLE} WHERE id IN (SELECT id FROM {TABLE} WHERE time < ? ORDER BY time LIMIT ?)",
                (cutoff, limit),
            )
            return max(0, int(cur.rowcount))

    def delete_oldest(self, n: int) -> int:
        with self.transaction():
            cur = self.execute(
                f"DELETE FROM {TABLE} WHERE id IN (SELECT id FROM {TABLE} ORDER BY id LIMIT ?)", (max(0, int(n)),)
            )
            return max(0, int(cur.rowcount))

    def used_bytes(self) -> int | None:
        """Bytes the table's pages take (SQLite: pages in use, WAL not counted); None for PostgreSQL."""
        if self.dialect != "sqlite":
            return None
        pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
        free = self.conn.execute("PRAGMA freelist_count").fetchone()[0]
        size = self.conn.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)

    def release_space(self) -> None:
        """SQLite: give freed pages back to the file system (incremental vacuum, then a WAL checkpoint)."""
        if self.dialect == "sqlite":
            # executescript steps it to the end; execute() would free one page (one step) per call
            self.conn.executescript("PRAGMA incremental_vacuum;")
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def count(self) -> int:
        return int(self.execute(f"SELECT COUNT(*) FROM {TABLE}").fetchone()[0])

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:  # closing a broken connection must not raise
            pass


class _SqliteTransaction:
    """BEGIN IMMEDIATE ... COMMIT on an autocommit sqlite3 connection (rollback on error)."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: Any, *_: Any) -> None:
        if kind is None:
            self.conn.execute("COMMIT")
        else:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass


# --- queries (linewatch history) -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Filter:
    since: float | None = None  # Unix seconds, inclusive
    until: float | None = None  # Unix seconds, exclusive
    camera: str | None = None
    part: str | None = None
    verdict: str | None = None
    limit: int | None = None


def select(flt: Filter) -> tuple[str, list[Any]]:
    """The SELECT for a filter, newest first; `?` placeholders (Store.sql rewrites them for PostgreSQL)."""
    where, params = [], []
    for clause, value in (
        ("camera = ?", flt.camera),
        ("verdict = ?", flt.verdict),
        ("part_id = ?", flt.part),
        ("time >= ?", flt.since),
        ("time < ?", flt.until),
    ):
        if value is not None:
            where.append(clause)
            params.append(value)
    sql = f"SELECT id, {', '.join(COLUMN_NAMES)} FROM {TABLE}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY time DESC, id DESC"
    if flt.limit is not None:
        sql += " LIMIT ?"
        params.append(int(flt.limit))
    return sql, params


def query(store: Store, flt: Filter) -> list[dict[str, Any]]:
    """Rows matching `flt`, newest first, as dicts (regions decoded from JSON)."""
    sql, params = select(flt)
    rows = store.execute(sql, params).fetchall()
    out = []
    for row in rows:
        record = dict(zip(("id", *COLUMN_NAMES), row))
        try:
            record["regions"] = json.loads(record["regions"] or "[]")
        except ValueError:
            pass  # shown as stored
        out.append(record)
    return out


def parse_when(text: str, now: datetime | None = None) -> float:
    """A point in time for --since/--until, as Unix seconds. ISO-8601 (`2026-05-20`, `2026-05-20T14:00`,
    `...Z`, `...+02:00`; without a zone: local time), the words `now`, `today`, `yesterday` (local midnight),
    or an age: `90s`, `30m`, `2h`, `7d`, `2w` (ago). ValueError otherwise."""
    s = text.strip().lower()
    now = now or datetime.now().astimezone()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    words = {"now": now, "today": midnight, "yesterday": _days_back(midnight, 1)}
    if s in words:
        return words[s].timestamp()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    body = s.removesuffix("ago").strip()
    if body[-1:] in units:
        try:
            amount = float(body[:-1])
        except ValueError:
            amount = math.nan
        if math.isfinite(amount) and amount >= 0:
            return now.timestamp() - amount * units[body[-1]]
    try:
        when = datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        raise ValueError(
            f"not a time: {text!r} (ISO-8601 such as 2026-05-20 or 2026-05-20T14:00:00+02:00, now, today, "
            "yesterday, or an age such as 30m, 2h, 7d)"
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()  # local time
    return when.timestamp()


def _days_back(midnight: datetime, days: int) -> datetime:
    """Local midnight `days` before, right across a daylight-saving change."""
    earlier = (midnight.replace(tzinfo=None) - timedelta(days=days)).astimezone()
    return earlier.replace(hour=0, minute=0, second=0, microsecond=0)


# --- the writer the daemon runs --------------------------------------------------------------------------------


@dataclass
class _Counts:
    recorded: int = 0
    lost: int = 0


class History:
    """The daemon's recorder: `submit` from the publishing thread (never blocks), a writer thread of its own."""

    def __init__(
        self,
        cameras: Iterable[str],
        backend: str = "sqlite",
        path: str | Path | None = None,
        dsn: str | None = None,
        *,
        max_mb: float = 0.0,
        max_days: float = 0.0,
        queue_size: int = 10_000,
        station: str | None = None,
    ):
        self.backend = backend
        self.path = None if path is None else Path(path)
        self.dsn = dsn
        self.max_bytes = int(max_mb * 1024 * 1024)
        self.max_days = float(max_days)
        self.station = station
        self.counts = {name: _Counts() for name in cameras}
        self.deleted = 0  # rows removed by the retention policy
        self.errors = 0  # failed opens and transactions
        self.last_error: str | None = None
        self.used_bytes: int | None = None
        self._store: Store | None = None
        self._next_open = 0.0
        self._next_age_check = 0.0
        self._last_log = -math.inf
        self._lock = threading.Lock()
        self._closing = False
        self._queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue(maxsize=queue_size)  # None: stop
        self._thread = threading.Thread(target=self._run, name="history", daemon=True)

    @classmethod
    def from_config(cls, cfg: Config) -> History:
        h = cfg.history
        return cls(
            [c.name for c in cfg.cameras],
            h.backend,
            default_path(cfg) if h.backend == "sqlite" else None,
            h.dsn,
            max_mb=h.max_mb,
            max_days=h.max_days,
            queue_size=h.queue_size,
            station=h.station or socket.gethostname(),
        )

    @property
    def where(self) -> str:
        return str(self.path) if self.backend == "sqlite" else "PostgreSQL " + _redact_dsn(self.dsn or "")

    def start(self) -> None:
        self._thread.start()
        log.info("history: recording every result in %s", self.where)

    def health(self) -> str | None:
        """None while the writer runs (a database that cannot be written is a loss counted, not a restart: a
        restart would not free the disk); else why not."""
        if self._thread.ident is not None and not self._thread.is_alive() and not self._closing:
            return "history writer thread has died"
        return None

    def submit(self, header: Mapping[str, Any], archive_frame: str | None = None) -> bool:
        """Queue the row of one published result; False (counted as lost) when the writer is behind."""
        camera = str(header.get("camera"))
        try:
            row = row_from_header(header, archive_frame, self.station)
            self._queue.put_nowait(row)
            return True
        except queue.Full:
            self._lose(camera, 1, "history writer behind (queue full): result not recorded")
        except Exception as exc:  # a header that cannot become a row is a bug; the result itself went out
            self._lose(camera, 1, f"result not recorded: {type(exc).__name__}: {exc}")
        return False

    def status(self, camera: str) -> dict[str, Any]:
        """The camera's `history` object in the status topic: recorded + lost + queued = results published."""
        with self._lock:
            counts = self.counts.setdefault(camera, _Counts())
            recorded, lost = counts.recorded, counts.lost
        return {
            "recorded": recorded,
            "lost": lost,
            "queued": self._queued(camera),
            "writing": self._store is not None and self.last_error is None,
            "last_error": self.last_error,
        }

    def totals(self) -> dict[str, tuple[int, int]]:
        """{camera: (recorded, lost)} for the metrics."""
        with self._lock:
            return {name: (c.recorded, c.lost) for name, c in self.counts.items()}

    def _queued(self, camera: str) -> int:
        with self._queue.mutex:  # a snapshot of what waits; the writer takes from the other end
            return sum(1 for row in self._queue.queue if row is not None and row[_CAMERA] == camera)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (within `timeout`), then stop; rows left then are counted as lost."""
        self._closing = True
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        if self._thread.is_alive():
            left = self._drain_queue()
            for row in left:
                self._lose(row[_CAMERA], 1, "history writer did not finish in time: result not recorded", force=True)

    # --- writer thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=1.0)
            except queue.Empty:
                self._maintain()
                continue
            batch: list[tuple[Any, ...]] = []
            stop = first is None
            if first is not None:
                batch.append(first)
            while not stop and len(batch) < BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                else:
                    batch.append(item)
            if batch:
                self._write(batch)
            if stop:
                while rest := [r for r in self._drain_queue(BATCH) if r is not None]:
                    self._write(rest)
                if self._store is not None:
                    self._store.close()
                return

    def _drain_queue(self, limit: int | None = None) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        while limit is None or len(out) < limit:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                out.append(item)
        return out

    def _write(self, batch: list[tuple[Any, ...]]) -> None:
        store = self._open()
        if store is None:
            self._lose_rows(batch, f"history database {self.where} unavailable: {self.last_error}")
            return
        try:
            store.insert(batch)
        except Exception as exc:  # full disk, file gone, server away: these rows are lost, counted
            self._broken(exc)
            self._lose_rows(batch, f"cannot write to history {self.where}: {exc}")
            return
        with self._lock:
            for row in batch:
                self.counts.setdefault(row[_CAMERA], _Counts()).recorded += 1
        self.last_error = None
        self._maintain()

    def _open(self) -> Store | None:
        if self._store is not None:
            return self._store
        now = time.monotonic()
        if now < self._next_open:
            return None
        self._next_open = now + RETRY_OPEN_S
        try:
            self._store = Store.open(self.backend, self.path, self.dsn)
        except Exception as exc:
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            return None
        self._next_age_check = 0.0
        return self._store

    def _broken(self, exc: Exception) -> None:
        """A failed transaction: count it, drop the connection (reopened after RETRY_OPEN_S)."""
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self._store is not None:
            self._store.close()
            self._store = None
        self._next_open = time.monotonic() + RETRY_OPEN_S

    def _maintain(self) -> None:
        """Retention: rows older than max_days (every AGE_CHECK_S), then the oldest rows while over max_mb."""
        store = self._store
        if store is None:
            return
        try:
            now = time.monotonic()
            if self.max_days > 0 and now >= self._next_age_check:
                removed = store.delete_older_than(time.time() - self.max_days * 86400)
                self.deleted += removed
                # a full chunk means more may be left: come back after the next batch, not in a minute
                self._next_age_check = now if removed >= DELETE_CHUNK else now + AGE_CHECK_S
                if removed:
                    store.release_space()
            self.used_bytes = store.used_bytes()
            for _ in range(10):  # pages do not free in proportion to rows (half-full index pages): measure again
                used = self.used_bytes
                if self.max_bytes <= 0 or used is None or used <= self.max_bytes:
                    break
                share = 1.0 - SIZE_TARGET * self.max_bytes / used
                removed = store.delete_oldest(min(DELETE_CHUNK, max(1, math.ceil(store.count() * share))))
                self.deleted += removed
                store.release_space()
                self.used_bytes = store.used_bytes()
                if not removed:
                    break
        except Exception as exc:
            self._broken(exc)
            self._log(f"history retention failed on {self.where}: {exc}")

    def _lose_rows(self, rows: list[tuple[Any, ...]], why: str) -> None:
        with self._lock:
            for row in rows:
                self.counts.setdefault(row[_CAMERA], _Counts()).lost += 1
        self._log(why)

    def _lose(self, camera: str, n: int, why: str, force: bool = False) -> None:
        with self._lock:
            self.counts.setdefault(camera, _Counts()).lost += n
        self._log(why, force)

    def _log(self, message: str, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            lost = sum(c.lost for c in self.counts.values())
            log.warning("%s (results not recorded so far: %d)", message, lost)


_CAMERA = COLUMN_NAMES.index("camera")


def default_path(cfg: Config) -> Path:
    """history.path, else history-<config name>.sqlite in the state directory: systemd's $STATE_DIRECTORY
    (/var/lib/linewatch), else the config file's folder (the working directory for a config not read from a
    file)."""
    if cfg.history.path is not None:
        return cfg.history.path
    stem = cfg.path.stem if cfg.path is not None else "linewatch"
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0]) / f"history-{stem}.sqlite"
    base = cfg.path.parent if cfg.path is not None else Path.cwd()
    return base / f"history-{stem}.sqlite"


def _redact_dsn(dsn: str) -> str:
    """A DSN as logs may show it: no password."""
    import re

    dsn = re.sub(r"(password\s*=\s*)\S+", r"\1***", dsn, flags=re.IGNORECASE)
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", dsn)
