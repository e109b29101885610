"""Feedback from the line (issue 16 item 4): the folder the dashboard saves corrections into, and what train, eval
and calibrate do with it. Real images encoded by OpenCV, the real CLI (in-process `main` where a subprocess adds
only start-up time, a subprocess where the exit status is the point), a random-init backbone at 32 px for training."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from linewatch import bundle
from linewatch.cli import build_parser, main
from linewatch.feedback import (
    MARKER,
    USED,
    FeedbackError,
    entries,
    feedback_root,
    is_feedback_folder,
    pending_counts,
    save_feedback,
)
from tests.helpers import calibrated_bundle, grey, result_header, with_white_square, write_bad_images

ROOT = Path(__file__).resolve().parents[1]
NOW = 1767323045.25  # 2026-01-02T03:04:05.250Z


def encoded(img: np.ndarray, fmt: str = "png") -> bytes:
    ok, data = cv2.imencode(".png" if fmt == "png" else ".jpg", img)
    assert ok
    return data.tobytes()


def header(camera: str = "cam1", seq: int = 7, verdict: str = "NOK", **fields) -> dict:
    return result_header(camera, seq, verdict, 0.9, run_id="run-a", **fields).model_dump(mode="json")


def save(folder: Path, kind: str, img: np.ndarray, seq: int, camera: str = "cam1", **kw) -> Path:
    args = dict(
        kind=kind,
        camera=camera,
        image=encoded(img, kw.pop("image_format", "png")),
        image_format="png",
        header=kw.pop("header", None) or header(camera, seq, "NOK" if kind == "false_reject" else "OK"),
        who="ana",
        why="checked by hand",
        source="archive",
        now=NOW + seq,
    )
    return save_feedback(folder, **(args | kw))


def square(level: int, side: int = 8, size: int = 64) -> np.ndarray:
    img = grey(128, size)
    img[20 : 20 + side, 20 : 20 + side] = level
    return img


def deviation_score(img: np.ndarray) -> float:
    """The deviation bundle's score, computed from the pixels (independent of the graph)."""
    return float(np.abs(img.astype(np.float64).mean(axis=2) - 128).max() / 127)


# --- storage --------------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_save_writes_the_image_then_its_sidecar_in_the_contract_layout(tmp_path):
    folder = tmp_path / "feedback"
    frame = with_white_square()
    png = save_feedback(
        folder,
        kind="false_reject",
        camera="cam1",
        image=encoded(frame),
        image_format="png",
        header=header(part_id="P-17"),
        who="ana",
        why="burr is allowed",
        source="archive",
        now=NOW,
    )
    assert png == folder / "false_reject" / "cam1" / "20260102T030405Z_7_P-17.png"
    assert np.array_equal(cv2.imread(str(png)), frame)  # the frame as given, not re-encoded
    side = json.loads(png.with_suffix(".json").read_text())
    assert side["kind"] == "false_reject" and side["camera"] == "cam1" and side["source"] == "archive"
    assert (side["who"], side["why"], side["when"]) == ("ana", "burr is allowed", "2026-01-02T03:04:05.250Z")
    assert side["image"]["file"] == png.name and (side["image"]["width"], side["image"]["height"]) == (64, 64)
    assert side["image"]["sha256"] == bundle.sha256_file(png) and side["image"]["bytes"] == png.stat().st_size
    assert side["header"]["seq"] == 7 and side["header"]["part_id"] == "P-17" and side["header"]["verdict"] == "NOK"
    assert json.loads((folder / MARKER).read_text())["format"] == "linewatch-feedback"

    jpg = save_feedback(
        folder,
        kind="missed_defect",
        camera="cam2",
        image=encoded(grey(), "jpeg"),
        image_format="jpeg",
        header=header("cam2", 3, "OK"),
        who="ben",
        why="crack at the edge",
        source="preview",
        now=NOW,
    )
    assert jpg == folder / "missed_defect" / "cam2" / "20260102T030405Z_3_none.jpg"
    assert json.loads(jpg.with_suffix(".json").read_text())["source"] == "preview"
    assert not list(folder.rglob("*.tmp"))


@pytest.mark.unit
def test_untrusted_part_ids_make_safe_names_inside_the_folder(tmp_path):
    folder = tmp_path / "feedback"
    for seq, part_id in enumerate(["../../etc/passwd", "a/b\\c d", "", ".hidden", "x" * 500, "Ünïcode/№1"], 1):
        path = save_feedback(
            folder,
            kind="false_reject",
            camera="cam1",
            image=encoded(grey()),
            image_format="png",
            header=header(seq=seq, part_id=part_id),
            who="ana",
            why="",
            source="archive",
            now=NOW,
        )
        assert path.parent == folder / "false_reject" / "cam1" and path.resolve().parent == path.parent.resolve()
        assert not path.name.startswith(".") and len(path.name) < 100 and "/" not in path.name
        assert json.loads(path.with_suffix(".json").read_text())["header"]["part_id"] == part_id  # all of it kept
    names = sorted(p.name for p in (folder / "false_reject" / "cam1").glob("*.png"))
    assert "20260102T030405Z_1_etc_passwd.png" in names and "20260102T030405Z_3_none.png" in names
    with pytest.raises(FeedbackError, match="camera"):
        save(folder, "false_reject", grey(), 9, camera="../cam1", header={"camera": "../cam1", "seq": 9})
    assert not (tmp_path / "cam1").exists()


@pytest.mark.unit
def test_bad_input_is_refused_with_a_reason_and_nothing_is_written(tmp_path):
    folder = tmp_path / "feedback"
    png = encoded(with_white_square())
    bomb = write_bad_images(tmp_path / "bad")[2].read_bytes()  # a PNG header claiming 100 000² pixels
    cases = [
        (dict(kind="good_part"), "kind"),
        (dict(image=b"definitely not an image"), "not a PNG"),
        (dict(image=png[: len(png) // 2]), "does not decode"),
        (dict(image=png, image_format="jpeg"), "not a JPEG"),
        (dict(image=encoded(grey(), "jpeg")[:-300], image_format="jpeg"), "truncated"),
        (dict(image=bomb), "pixels"),
        (dict(image=png, image_format="gif"), "image format"),
        (dict(image=b""), "no image"),
        (dict(header={"camera": "cam1", "part_id": "x"}), "seq"),
        (dict(header=header(camera="cam9")), "camera 'cam9'"),
        (dict(header=header() | {"image_score": float("nan")}), "not plain JSON"),
        (dict(source="camera"), "source"),
        (dict(who=None), "who"),
        (dict(why="x" * 5000), "why"),
    ]
    for change, reason in cases:
        args = dict(
            kind="false_reject",
            camera="cam1",
            image=png,
            image_format="png",
            header=header(),
            who="ana",
            why="",
            source="archive",
            now=NOW,
        )
        with pytest.raises(FeedbackError, match=reason):
            save_feedback(folder, **(args | change))
    assert not folder.exists() or not [p for p in folder.rglob("*") if p.is_file()]
    assert pending_counts(folder) == {"false_reject": 0, "missed_defect": 0}


@pytest.mark.unit
def test_a_part_is_saved_once_and_cannot_be_both_kinds(tmp_path):
    folder = tmp_path / "feedback"
    part = header(seq=5)
    first = save(folder, "false_reject", grey(), 5, header=part)
    again = save(folder, "false_reject", grey(), 5, header=part, who="someone else")  # a double click
    assert again == first and len(list(folder.rglob("*.png"))) == 1
    with pytest.raises(FeedbackError, match="already marked false_reject"):
        save(folder, "missed_defect", grey(), 5, header=part)
    other_run = save_feedback(
        folder,
        kind="false_reject",
        camera="cam1",
        image=encoded(grey()),
        image_format="png",
        header=part | {"run_id": "run-b"},
        who="ana",
        why="",
        source="archive",
        now=NOW + 5,  # the same second and seq after a daemon restart: another part, another file
    )
    assert other_run != first and other_run.name == first.stem + "-2.png"


@pytest.mark.unit
def test_pending_counts_skip_interrupted_saves_and_drop_once_used(tmp_path):
    folder = tmp_path / "feedback"
    assert pending_counts(folder) == {"false_reject": 0, "missed_defect": 0}  # nothing yet: no error
    save(folder, "false_reject", grey(), 1)
    save(folder, "false_reject", grey(130), 2)
    save(folder, "missed_defect", with_white_square(), 3)
    orphan = folder / "false_reject" / "cam1" / "20260101T000000Z_99_x.png"  # image written, sidecar not
    orphan.write_bytes(encoded(grey()))
    assert pending_counts(folder) == {"false_reject": 2, "missed_defect": 1}
    from linewatch.feedback import mark_used

    mark_used(folder, entries(folder, "false_reject")[:1], by="train", target="/models/a")
    assert pending_counts(folder) == {"false_reject": 1, "missed_defect": 1}
    used = json.loads((folder / USED).read_text())["files"]
    (name,) = used
    assert name.startswith("false_reject/cam1/") and used[name]["uses"][0]["by"] == "train"
    (folder / USED).write_text("{broken")  # the dashboard's count survives a damaged record
    assert pending_counts(folder) == {"false_reject": 2, "missed_defect": 1}


@pytest.mark.unit
def test_feedback_folders_are_recognised_at_the_root_inside_and_as_copies(tmp_path):
    folder = tmp_path / "feedback"
    save(folder, "false_reject", grey(), 1)
    camera_dir = folder / "false_reject" / "cam1"
    assert is_feedback_folder(folder) and is_feedback_folder(folder / "false_reject") and is_feedback_folder(camera_dir)
    copy = tmp_path / "fresh_good"
    shutil.copytree(camera_dir, copy)  # copied out of the folder, sidecars and all: still corrections
    assert is_feedback_folder(copy)
    link = tmp_path / "link"
    link.symlink_to(camera_dir)
    assert is_feedback_folder(link)
    plain = tmp_path / "plain"
    plain.mkdir()
    for p in camera_dir.glob("*.png"):
        shutil.copy(p, plain)
    (plain / "notes.json").write_text('{"format": "something else"}')
    assert not is_feedback_folder(plain)
    assert feedback_root(folder) == folder
    with pytest.raises(FeedbackError, match=f"inside the feedback folder {folder}"):
        feedback_root(camera_dir)
    with pytest.raises(FeedbackError, match="not a feedback folder"):
        feedback_root(plain)


# --- calibrate refuses it -------------------------------------------------------------------------------------


@pytest.mark.integration
def test_calibrate_refuses_a_feedback_folder(tmp_path, deviation_bundle):
    folder = tmp_path / "feedback"
    for seq in range(1, 4):
        save(folder, "false_reject", square(255, 3), seq)
    model = tmp_path / "model"
    shutil.copytree(deviation_bundle, model)
    for good in (folder, folder / "false_reject" / "cam1"):
        proc = subprocess.run(
            [sys.executable, "-m", "linewatch.cli", "calibrate", str(model), "--good", str(good)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr
        assert "feedback folder" in proc.stderr and "raise the thresholds" in proc.stderr
    assert not (model / bundle.CALIBRATION).exists()


# --- eval: missed defects become a labelled test set -----------------------------------------------------------


def image_level_set(root: Path, masks: bool = False) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    sets = {
        "good": [np.clip(grey(128).astype(int) + rng.integers(-20, 21), 0, 255).astype(np.uint8) for _ in range(4)],
        "dent": [square(255), square(0), square(200)],
    }
    for kind, images in sets.items():
        (root / "test" / kind).mkdir(parents=True)
        for i, img in enumerate(images):
            assert cv2.imwrite(str(root / "test" / kind / f"{i:03d}.png"), img)
            if masks and kind != "good":
                (root / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
                mask = np.zeros((64, 64), np.uint8)
                mask[20:28, 20:28] = 255
                assert cv2.imwrite(str(root / "ground_truth" / kind / f"{i:03d}_mask.png"), mask)
    return sets


def line_feedback(folder: Path) -> dict[str, list[np.ndarray]]:
    """Two missed defects (a white square the calibrated model catches, a faint dent it still passes) and a false
    reject (a good part with a speck)."""
    marked = {"missed_defect": [with_white_square(), square(170)], "false_reject": [square(255, 3)]}
    seq = 1
    for kind, images in marked.items():
        for img in images:
            save(folder, kind, img, seq)
            seq += 1
    return marked


def eval_json(capsys, *args: str) -> tuple[dict, str]:
    rc = main(["eval", *args, "--json", "-"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out), err


@pytest.mark.integration
def test_eval_adds_the_missed_defects_as_a_defect_type_and_marks_them_used(tmp_path, capsys):
    model = calibrated_bundle(tmp_path / "model")  # pixel threshold 0.5, every pixel above fails a part
    sets = image_level_set(tmp_path / "cat")
    folder = tmp_path / "feedback"
    marked = line_feedback(folder)
    assert pending_counts(folder) == {"false_reject": 1, "missed_defect": 2}

    result, err = eval_json(capsys, str(model), "--data", str(tmp_path / "cat"), "--feedback", str(folder))
    good = [deviation_score(i) for i in sets["good"]]
    missed = [deviation_score(i) for i in marked["missed_defect"]]
    expected = roc_auc_score([0] * len(good) + [1] * len(missed), good + missed)
    assert result["per_type"]["missed_defect"]["image_roc_auc"] == pytest.approx(expected, abs=1e-6)
    assert result["overall"]["n_defect"] == 5 and result["overall"]["n_good"] == 4  # false rejects stay out
    assert result["verdicts"]["per_type"]["missed_defect"] == {"images": 2, "nok": 1, "escapes": 1}
    assert result["feedback"]["missed_defect"] == 2 and result["feedback"]["false_reject"] == 0
    assert "missed_defect" in err and "2 missed defect(s)" in err
    # evaluated: the dashboard no longer counts them; the false reject still waits for a training run
    assert pending_counts(folder) == {"false_reject": 1, "missed_defect": 0}
    uses = [u for f in json.loads((folder / USED).read_text())["files"].values() for u in f["uses"]]
    assert {u["by"] for u in uses} == {"eval"} and {u["target"] for u in uses} == {str(model.resolve())}

    # the feedback folder on its own: false rejects as good, missed defects as defects
    alone, err = eval_json(capsys, str(model), "--data", str(folder))
    assert (alone["overall"]["n_good"], alone["overall"]["n_defect"]) == (1, 2) and alone["level"] == "image"
    v = alone["verdicts"]
    assert (v["false_rejects"], v["escapes"]) == (1, 1)  # the speck is still rejected, the faint dent still passes
    assert alone["feedback"]["false_reject_trained_on"] == 0 and "0 of them in the model's training" in err


@pytest.mark.integration
def test_pixel_metrics_leave_out_the_missed_defects_that_have_no_masks(tmp_path, capsys):
    model = calibrated_bundle(tmp_path / "model")
    image_level_set(tmp_path / "cat", masks=True)
    folder = tmp_path / "feedback"
    line_feedback(folder)
    plain, _ = eval_json(capsys, str(model), "--data", str(tmp_path / "cat"))
    with_feedback, _ = eval_json(capsys, str(model), "--data", str(tmp_path / "cat"), "--feedback", str(folder))
    assert with_feedback["level"] == "pixel" and with_feedback["per_type"]["dent"] == plain["per_type"]["dent"]
    for key in ("pixel_roc_auc", "pro_auc"):  # unmasked defect pixels never count as normal ones
        assert with_feedback["overall"][key] == plain["overall"][key] is not None
        assert with_feedback["per_type"]["missed_defect"][key] is None
    assert with_feedback["per_type"]["missed_defect"]["image_roc_auc"] is not None


def refused(caplog, *args: str) -> tuple[int, str]:
    """Exit code and the error `main` logged (pytest's log capture holds it)."""
    caplog.clear()
    return main(list(args)), caplog.text


@pytest.mark.integration
def test_eval_feedback_errors_name_the_problem(tmp_path, caplog):
    model = calibrated_bundle(tmp_path / "model")
    image_level_set(tmp_path / "cat")
    folder = tmp_path / "feedback"
    save(folder, "false_reject", grey(), 1)
    rc, text = refused(caplog, "eval", str(model), "--data", str(folder))  # no missed defects: no defect class
    assert rc == 4 and "needs both" in text
    rc, text = refused(
        caplog, "eval", str(model), "--data", str(tmp_path / "cat"), "--feedback", str(folder / "false_reject")
    )
    assert rc == 4 and "inside the feedback folder" in text
    save(folder, "missed_defect", with_white_square(), 2)
    changed = entries(folder, "missed_defect")[0].image
    changed.write_bytes(encoded(grey(10)))  # edited after it was saved: not the part the operator marked
    rc, text = refused(caplog, "eval", str(model), "--data", str(tmp_path / "cat"), "--feedback", str(folder))
    assert rc == 4 and "changed since they were saved" in text


# --- train: false rejects become training images ---------------------------------------------------------------


def good_parts(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        assert cv2.imwrite(str(folder / f"{i:03d}.png"), rng.integers(90, 160, (40, 40, 3), dtype=np.uint8))


@pytest.mark.integration
def test_train_with_feedback_and_a_retrain_from_the_bundle(tmp_path, capsys, caplog):
    data, folder = tmp_path / "parts", tmp_path / "feedback"
    good_parts(data, 6)
    rng = np.random.default_rng(2)
    for seq in (1, 2):
        save(folder, "false_reject", rng.integers(80, 170, (48, 48, 3), dtype=np.uint8), seq)
    save(folder, "missed_defect", with_white_square(48), 3)
    first = tmp_path / "model_a"
    tiny = ["--random-init", "--size", "32", "--layers", "1:2", "--epochs", "1", "--seed", "3"]
    assert main(["train", "--data", str(data), "--out", str(first), "--feedback", str(folder), *tiny]) == 0
    assert "2 false reject(s)" in capsys.readouterr().out
    t = bundle.read_metadata(first)["training"]
    trained = entries(folder, "false_reject")
    assert t["feedback"] == {
        "folder": str(folder.resolve()),
        "files": [{"file": e.relative, "sha256": bundle.sha256_file(e.image)} for e in trained],
    }
    assert not any("missed_defect" in f["file"] for f in t["feedback"]["files"])
    assert (t["n_train"], t["n_val"]) == (5 + 2, 1)  # every false reject trains; validation stays on the data
    assert t["settings"]["layers"] == "1:2" and t["settings"]["size"] == 32
    assert pending_counts(folder) == {"false_reject": 0, "missed_defect": 1}
    uses = json.loads((folder / USED).read_text())["files"]
    assert {u["target"] for f in uses.values() for u in f["uses"]} == {str(first.resolve())}

    # the line sends one more; a retrain from the bundle reuses its data, settings, weights and feedback folder
    save(folder, "false_reject", rng.integers(80, 170, (48, 48, 3), dtype=np.uint8), 4)
    assert pending_counts(folder)["false_reject"] == 1
    second = tmp_path / "model_b"
    assert main(["train", "--from", str(first), "--out", str(second)]) == 0
    meta_b = bundle.read_metadata(second)
    t2 = meta_b["training"]
    assert t2["data"] == t["data"] and t2["settings"] == t["settings"] and meta_b["weights"]["source"] == "random"
    assert meta_b["input"]["height"] == 32 and meta_b["dfr"]["layer_spec"] == "1:2"
    assert len(t2["feedback"]["files"]) == 3 and (t2["n_train"], t2["n_val"]) == (5 + 3, 1)
    assert pending_counts(folder) == {"false_reject": 0, "missed_defect": 1}

    # an evaluation on the feedback folder says how many of its false rejects the model trained on
    capsys.readouterr()
    result, err = eval_json(capsys, str(second), "--data", str(folder), "--backend", "torch")
    assert result["feedback"]["false_reject_trained_on"] == 3 and "3 of them in the model's training" in err
    rc, text = refused(caplog, "train", "--from", str(first), "--out", str(tmp_path / "c"), "--preset", "paper")
    assert rc == 2 and "--from takes MODEL's training settings" in text
    rc, text = refused(caplog, "train", "--out", str(tmp_path / "d"), *tiny)
    assert rc == 2 and "--data is required" in text


@pytest.mark.integration
def test_train_refuses_a_folder_that_is_not_a_feedback_folder(tmp_path, caplog):
    data = tmp_path / "parts"
    good_parts(data, 4)
    args = ["train", "--data", str(data), "--out", str(tmp_path / "m"), "--feedback", str(data), "--random-init"]
    rc, text = refused(caplog, *args)
    assert rc == 4 and "not a feedback folder" in text
    assert not (tmp_path / "m").exists()


@pytest.mark.unit
def test_train_and_eval_help_explain_the_feedback_options():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    train_help = " ".join(sub["train"].format_help().split())
    eval_help = " ".join(sub["eval"].format_help().split())
    assert "--feedback FOLDER" in train_help and "false rejects" in train_help and "never its missed" in train_help
    assert "--from MODEL" in train_help and "retrain an existing bundle" in train_help
    assert "--feedback FOLDER" in eval_help and "missed_defect" in eval_help and "feedback folder" in eval_help
