"""`linewatch history` on a large record: "all NOK parts of camera X yesterday" (issue 18, item 5).

Builds a SQLite history with the daemon's own schema and writer path (`Store.open` + `Store.insert`, the batches the
writer thread commits) holding N records spread evenly over the last `--days` days across `--cameras` cameras
(about 3 % NOK, 0.5 % ERROR, like a line), then times `linewatch history --camera cam1 --verdict NOK --since
yesterday --until today --csv FILE` as a subprocess (what a person waits for, interpreter start included) and the
query alone in-process, each `--repeat` times (median and worst reported; the page cache is as the build left it,
warm, as on a line PC that records all day).

    python benchmarks/history_query.py --rows 1000000 --db /tmp/history_bench.sqlite --json out.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from linewatch.line.history import Filter, Store, parse_when, query, row_from_header

BATCH = 5000


def build(path: Path, rows: int, cameras: int = 4, days: float = 30.0, seed: int = 0) -> float:
    """Write `rows` records, oldest first (as a daemon would); seconds taken."""
    rnd = random.Random(seed)
    path.unlink(missing_ok=True)
    for extra in ("-wal", "-shm"):
        Path(str(path) + extra).unlink(missing_ok=True)
    store = Store.open("sqlite", path)
    t0 = time.perf_counter()
    now = time.time()
    start = now - days * 86400
    step = (now - start) / rows
    batch = []
    for i in range(rows):
        r = rnd.random()
        verdict = "NOK" if r < 0.03 else "ERROR" if r < 0.035 else "OK"
        camera = f"cam{i % cameras + 1}"
        header = {
            "camera": camera,
            "seq": i // cameras + 1,
            "run_id": "bench0000000",
            "publish_time": start + i * step,
            "frame_time": start + i * step - 0.03,
            "part_id": f"P{i:09d}",
            "verdict": verdict,
            "image_score": None if verdict == "ERROR" else rnd.random(),
            "thresholds": {"pixel": 0.5, "image": None},
            "calibration_version": 3,
            "model_id": "a1b2c3d4e5f6",
            "recipe": "default",
            "regions": [{"bbox": [10, 12, 8, 6], "area": 40, "peak": 0.9, "defect": True}] if verdict == "NOK" else [],
            "regions_total": 1 if verdict == "NOK" else 0,
            "defect_regions": 1 if verdict == "NOK" else 0,
            "error": "camera read failed" if verdict == "ERROR" else None,
            "frame_index": i // cameras + 1,
        }
        archived = f"linewatch-x_{camera}_{i:09d}_{verdict}.png" if verdict != "OK" else None
        batch.append(row_from_header(header, archived, "bench-pc"))
        if len(batch) == BATCH:
            store.insert(batch)
            batch = []
    if batch:
        store.insert(batch)
    store.release_space()
    store.close()
    return time.perf_counter() - t0


def time_query(path: Path, repeat: int = 5, camera: str = "cam1") -> dict:
    """Median seconds of the CLI (subprocess) and of the query alone; rows found."""
    out = path.with_suffix(".csv")
    cli, inproc = [], []
    found = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "linewatch.cli", "history", "--db", str(path), "--camera", camera]
            + ["--verdict", "NOK", "--since", "yesterday", "--until", "today", "--csv", str(out)],
            check=True,
            capture_output=True,
        )
        cli.append(time.perf_counter() - t0)
        store = Store.open("sqlite", path, create=False)
        t0 = time.perf_counter()
        records = query(store, Filter(parse_when("yesterday"), parse_when("today"), camera, None, "NOK"))
        inproc.append(time.perf_counter() - t0)
        store.close()
        found = len(records)
    csv_rows = len(out.read_text().splitlines()) - 1
    return {
        "cli_s": statistics.median(cli),
        "cli_max_s": max(cli),
        "query_s": statistics.median(inproc),
        "found": found,
        "csv_rows": csv_rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--cameras", type=int, default=4)
    ap.add_argument("--days", type=float, default=30.0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--db", default="history_bench.sqlite")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args()
    path = Path(args.db)
    built = build(path, args.rows, args.cameras, args.days)
    size = path.stat().st_size
    result = {"rows": args.rows, "build_s": built, "db_mb": size / 1e6, **time_query(path, args.repeat)}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
