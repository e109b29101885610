"""The archive of failed parts: it only ever deletes files it wrote, and its health says when its writer died."""

from __future__ import annotations

import json
import os
import time

import cv2
import numpy as np
import pytest

from linewatch.line import archive as archive_module
from linewatch.line.archive import Archive

pytestmark = pytest.mark.integration

FRAME = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)  # ~3 kB as PNG


def png_bytes(seed: int) -> bytes:
    return cv2.imencode(".png", np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))[1].tobytes()


def test_foreign_files_survive_the_cap_and_the_oldest_own_files_go_first(tmp_path):
    folder = tmp_path / "archive"
    folder.mkdir()
    foreign = {  # an operator's reference photo, a look-alike with a different shape, a text file
        "reference.png": png_bytes(1),
        "20240101T000000_cam1_000000001_NOK.png.bak": b"x" * 4000,
        "notes.txt": b"y" * 4000,
    }
    for name, data in foreign.items():
        (folder / name).write_bytes(data)
        os.utime(folder / name, (1, 1))  # older than anything the archive writes
    archive = Archive(folder, max_bytes=8000)
    assert archive.used_bytes == 0  # nothing foreign is counted against the cap
    for seq in range(1, 9):
        archive.write("cam1", seq, "NOK", FRAME, None, wall_time=1000.0 + seq)
    for name, data in foreign.items():
        assert (folder / name).read_bytes() == data, name
    own = sorted(p.name for p in folder.iterdir() if p.name not in foreign)
    assert all(n.startswith("linewatch-") and "_cam1_" in n for n in own)
    assert archive.deleted >= 1 and archive.used_bytes <= 8000
    assert sum((folder / n).stat().st_size for n in own) == archive.used_bytes
    kept_seqs = sorted({int(n.split("_")[2]) for n in own})
    assert kept_seqs == list(range(9 - len(kept_seqs), 9))  # exactly the newest, the oldest went first
    assert len(own) == 2 * len(kept_seqs)  # whole entries: each kept frame with its header, never one alone


def test_a_restarted_archive_manages_its_earlier_files_but_no_others(tmp_path):
    folder = tmp_path / "archive"
    first = Archive(folder, max_bytes=1_000_000)
    for seq in range(1, 4):
        first.write("cam1", seq, "ERROR", FRAME, png_bytes(seq), wall_time=2000.0 + seq)
    legacy = folder / "19700101T000100.000_cam2_000000007_NOK.png"  # named as before the linewatch- prefix
    legacy.write_bytes(png_bytes(7))
    os.utime(legacy, (1, 1))
    foreign = folder / "calibration_target.png"
    foreign.write_bytes(png_bytes(8))
    os.utime(foreign, (0, 0))
    ours = sorted(p for p in folder.iterdir() if p != foreign)
    second = Archive(folder, max_bytes=sum(p.stat().st_size for p in ours))
    assert second.used_bytes == sum(p.stat().st_size for p in ours)
    second.write("cam1", 4, "NOK", FRAME, None, wall_time=3000.0)
    assert not legacy.exists()  # the oldest own file made room first
    assert foreign.read_bytes() == png_bytes(8)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the crash is the point
def test_health_reports_a_dead_writer_thread_and_not_a_closed_one(tmp_path):
    archive = Archive(tmp_path / "archive", max_bytes=1_000_000)
    assert archive.health() is None  # not started yet: nothing has died
    archive.start()
    assert archive.submit("cam1", 1, "NOK", FRAME, None)
    deadline = time.monotonic() + 5
    while archive.saved < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert archive.saved == 1 and archive.health() is None

    def crash(*args: object) -> None:
        raise SystemExit("simulated crash of the writer")  # not an Exception: the thread's guard lets it through

    archive.write = crash  # type: ignore[method-assign]
    assert archive.submit("cam1", 2, "NOK", FRAME, None)
    archive._thread.join(5)
    assert archive.health() == "archive writer thread has died"

    healthy = Archive(tmp_path / "other", max_bytes=1_000_000)
    healthy.start()
    healthy.close()
    assert healthy.health() is None  # stopped on purpose is not a failure


@pytest.mark.parametrize(
    "name, own",
    [
        ("linewatch-20240101T120000.123_cam1_000000001_NOK.png", True),
        ("linewatch-20240101T120000.123_cam-2_000000001_ERROR_mask.png", True),
        ("20240101T120000.123_cam1_000000001_OK.png", True),
        ("linewatch-20240101T120000.123_cam1_000000001_NOK.json", True),
        ("linewatch-20240101T120000.123_cam1_000000001_NOK_mask.json", False),
        ("linewatch-20240101T120000.123_cam1_000000001_NOK.jpg", False),
        ("linewatch-20240101T120000_cam1_000000001_NOK.png", False),
        ("linewatch-20240101T120000.123_cam1_1_NOK.png", False),
        ("linewatch-20240101T120000.123_cam/1_000000001_NOK.png", False),
        ("part_0001.png", False),
    ],
)
def test_own_file_names(name, own):
    assert bool(archive_module.OWN_FILE.match(name)) is own


# --- each entry: frame, mask, and the result header as a JSON sidecar; whole or not at all ----------------------

WALL = 1_700_000_000.25
STEM = "linewatch-20231114T221320.250_cam1_000000042_NOK"
HEADER = {
    "camera": "cam1",
    "seq": 42,
    "part_id": "P-0042",
    "verdict": "NOK",
    "image_score": 0.93,
    "thresholds": {"pixel": 0.5, "image": None},
    "calibration_version": 3,
    "model_id": "abcdefabcdef",
    "error": None,
    "regions": [{"bbox": [1, 2, 3, 4], "area": 12, "peak": 0.9}],
    "run_id": "r1",
}


def test_an_entry_is_frame_mask_and_its_header_as_json(tmp_path):
    archive = Archive(tmp_path, max_bytes=1_000_000)
    mask = png_bytes(5)
    assert archive.write("cam1", 42, "NOK", FRAME, mask, WALL, header=HEADER)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{STEM}.json", f"{STEM}.png", f"{STEM}_mask.png"]
    assert (cv2.imread(str(tmp_path / f"{STEM}.png")) == FRAME).all()
    assert (tmp_path / f"{STEM}_mask.png").read_bytes() == mask
    sidecar = json.loads((tmp_path / f"{STEM}.json").read_text())
    assert sidecar == HEADER | {"archive": {"frame": f"{STEM}.png", "mask": f"{STEM}_mask.png"}}
    assert archive.saved == 1 and archive.errors == 0
    assert archive.used_bytes == sum(p.stat().st_size for p in tmp_path.iterdir())
    no_image = Archive(tmp_path / "error_only", max_bytes=1_000_000)  # an ERROR without a frame: its header alone
    assert no_image.write("cam1", 7, "ERROR", None, mask, WALL, header=HEADER | {"verdict": "ERROR"})
    assert [p.suffix for p in (tmp_path / "error_only").iterdir()] == [".json"]


@pytest.mark.parametrize("blocked", ["_mask.png", ".json"])
def test_a_write_failing_midway_leaves_no_mask_or_header_without_its_frame(tmp_path, blocked):
    """The mask (or the header, written last) cannot be written: a folder occupies its name, as real a failure
    as a full disk for the rename. What the entry had written is removed; the failure is counted."""
    (tmp_path / f"{STEM}{blocked}").mkdir()
    archive = Archive(tmp_path, max_bytes=1_000_000)
    assert not archive.write("cam1", 42, "NOK", FRAME, png_bytes(5), WALL, header=HEADER)
    assert archive.errors == 1 and archive.saved == 0 and archive.used_bytes == 0
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [f"{STEM}{blocked}"]  # the blocking folder, nothing the archive wrote, no temp file either
    assert archive.write("cam1", 43, "NOK", FRAME, png_bytes(5), WALL, header=HEADER)  # the next entry is whole
    assert archive.saved == 1


def test_the_cap_deletes_whole_entries_and_a_restart_finds_them_and_clears_crash_leftovers(tmp_path):
    archive = Archive(tmp_path, max_bytes=1_000_000)
    for seq in range(1, 4):
        archive.write("cam1", seq, "NOK", FRAME, png_bytes(seq), 1000.0 + seq, header=HEADER | {"seq": seq})
    entry = archive.used_bytes // 3
    leftover = tmp_path / f".{STEM}.png.0123456789ab.tmp"  # what a crash mid-write leaves
    leftover.write_bytes(b"half a png")
    restarted = Archive(tmp_path, max_bytes=3 * entry + 10)
    assert restarted.used_bytes == archive.used_bytes and not leftover.exists()
    restarted.write("cam1", 4, "NOK", FRAME, png_bytes(4), 2000.0, header=HEADER | {"seq": 4})
    by_seq: dict[int, list[str]] = {}
    for p in tmp_path.iterdir():
        by_seq.setdefault(int(p.name.split("_")[2]), []).append(p.name[len(p.name.split("_")[0]) + 1 :])
    assert sorted(by_seq) == [2, 3, 4]  # the oldest entry went, all three of its files
    assert all(len(files) == 3 for files in by_seq.values())
    assert restarted.deleted == 3
