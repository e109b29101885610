"""`linewatch history`: query the record of every result and export it as CSV (torch-free).

Reads the database the daemon writes (linewatch/line/history.py): the one its config names (`--config`), a SQLite
file (`--db`) or a PostgreSQL server (`--dsn`). Filters map onto the table's indexes, so "all NOK parts of camera X
yesterday" is an index range scan, not a pass over the table (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import sqlite3
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from linewatch.errors import ConfigError, DataError
from linewatch.line.history import COLUMN_NAMES, Filter, Store, parse_when, query

CSV_COLUMNS = ("time_utc", "id", *COLUMN_NAMES)
TABLE_LIMIT = 100  # rows printed to the terminal unless --limit says otherwise; CSV exports have no default limit


def add_arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--config", help="the daemon's config: its history section says where the records are")
    where.add_argument("--db", help="a SQLite history file (history.path)")
    where.add_argument("--dsn", help="a PostgreSQL connection string (history.dsn)")
    p.add_argument(
        "--since",
        help="from this time on (inclusive): ISO-8601 (2026-05-20, 2026-05-20T14:00, ...Z; no zone = local), now, "
        "today, yesterday (local midnight), or an age such as 30m, 2h, 7d",
    )
    p.add_argument("--until", help="before this time (exclusive), same forms as --since")
    p.add_argument("--camera", help="only this camera")
    p.add_argument("--part", help="only this part id")
    p.add_argument("--verdict", type=str.upper, choices=("OK", "NOK", "ERROR"), help="only this verdict")
    p.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help=f"at most N records, newest first (default: {TABLE_LIMIT} printed, all with --csv)",
    )
    p.add_argument("--csv", metavar="FILE", help="write the records as CSV to FILE ('-': stdout)")
    p.add_argument("--json", action="store_true", help="print one JSON object per record")
    p.add_argument("--count", action="store_true", help="print only how many records match")


def open_store(args: argparse.Namespace) -> Store:
    """The store the arguments name; ConfigError/DataError with what to fix otherwise."""
    try:
        if args.dsn:
            return Store.open("postgresql", dsn=args.dsn, create=False)
        if args.db:
            return Store.open("sqlite", Path(args.db), create=False)
        if args.config:
            from linewatch.line.config import load_config
            from linewatch.line.history import default_path

            cfg = load_config(args.config)
            if cfg.history.backend == "postgresql":
                return Store.open("postgresql", dsn=cfg.history.dsn, create=False)
            return Store.open("sqlite", default_path(cfg), create=False)
    except FileNotFoundError as exc:
        raise DataError(f"{exc} (has the daemon recorded anything yet? is history.enabled true?)") from None
    except (sqlite3.Error, OSError) as exc:
        raise DataError(f"cannot open the history database: {exc}") from None
    except ModuleNotFoundError:
        raise
    except Exception as exc:  # psycopg's errors: server away, authentication failed, ...
        if type(exc).__module__.startswith("psycopg"):
            raise DataError(f"cannot connect to the PostgreSQL history: {exc}") from None
        raise
    raise ConfigError("say where the history is: --config FILE, --db FILE or --dsn DSN")


def cli_history(args: argparse.Namespace) -> int:
    try:
        since = None if args.since is None else parse_when(args.since)
        until = None if args.until is None else parse_when(args.until)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit: expected a number >= 1, got {args.limit}")
    limit = args.limit if args.limit is not None or args.csv or args.count else TABLE_LIMIT
    flt = Filter(since, until, args.camera, args.part, args.verdict, None if args.count else limit)
    store = open_store(args)
    try:
        if args.count:
            print(_count(store, flt))
            return 0
        try:
            records = query(store, flt)
        except sqlite3.Error as exc:
            raise DataError(f"cannot read the history database: {exc}") from None
    finally:
        store.close()
    if args.csv:
        if args.csv == "-":
            write_csv(records, sys.stdout)
        else:
            with open(args.csv, "w", newline="", encoding="utf-8") as f:
                write_csv(records, f)
            print(f"{len(records)} records written to {args.csv}", file=sys.stderr)
        return 0
    if args.json:
        for record in records:
            print(json.dumps({"time_utc": iso(record["time"]), **record}))
        return 0
    print_table(records, sys.stdout)
    if limit is not None and len(records) == limit:
        print(f"(the newest {limit}; --limit N for more, --csv FILE for all)", file=sys.stderr)
    return 0


def _count(store: Store, flt: Filter) -> int:
    from linewatch.line.history import select

    sql, params = select(flt)
    inner = sql.split(" FROM ", 1)[1].split(" ORDER BY ")[0]
    return int(store.execute(f"SELECT COUNT(*) FROM {inner}", params).fetchone()[0])


def iso(t: float | None) -> str:
    """UTC, millisecond precision: what the archive's file names and the protocol's floats say too."""
    if t is None:
        return ""
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def write_csv(records: list[dict[str, Any]], out: TextIO) -> None:
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for r in records:
        row = {**r, "time_utc": iso(r["time"]), "regions": json.dumps(r["regions"], separators=(",", ":"))}
        writer.writerow(["" if row[c] is None else row[c] for c in CSV_COLUMNS])


def print_table(records: list[dict[str, Any]], out: TextIO) -> None:
    header = ("time (UTC)", "camera", "recipe", "part", "verdict", "score", "defects", "model", "cal", "frame/error")
    rows = [header]
    for r in records:
        score = "" if r["image_score"] is None else f"{r['image_score']:.4g}"
        rows.append(
            (
                iso(r["time"]),
                r["camera"],
                r["recipe"] or "",
                r["part_id"] or "",
                r["verdict"],
                score,
                "" if r["defect_regions"] is None else str(r["defect_regions"]),
                r["model_id"] or "",
                "" if r["calibration_version"] is None else str(r["calibration_version"]),
                r["error"] or r["archive_frame"] or "",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    for row in rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] + "\n")
    print(f"{len(records)} record(s)", file=sys.stderr)
