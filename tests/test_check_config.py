"""`linewatch check-config` says OK only for a config `linewatch run` can start and judge parts with.

Each case is a real `linewatch check-config` subprocess on a real bundle (a genuine ONNX graph, tests/bundles.py)
with one thing broken: the exit code must be the documented one (2 config, 3 bundle) and the message must name
the file or key to fix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
import zmq
import zmq.auth

from linewatch import bundle
from tests.bundles import make_deviation_bundle
from tests.helpers import calibrated_bundle, free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]


def check_config(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "linewatch.cli", "check-config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def write_config(folder: Path, **sections: Any) -> Path:
    data: dict[str, Any] = {
        "model": {"bundle": "bundle"},
        "cameras": [{"name": "cam1", "kind": "device", "source": 0}],
        "engine": {"providers": ["cpu"], "threads": 1},
        "publish": {"endpoint": f"tcp://127.0.0.1:{free_port()}"},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    path = folder / "line.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_config_run_can_start_with_prints_ok(tmp_path):
    calibrated_bundle(tmp_path / "bundle")
    done = check_config(write_config(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout and "cam1" in done.stdout and done.stderr.strip() == ""


# --- one thing broken at a time: (how to break it, exit code, words the message must hold) ----------------------


def empty_bundle_folder(tmp: Path) -> dict[str, Any]:
    (tmp / "bundle").mkdir()
    return {}


def trained_but_not_exported(tmp: Path) -> dict[str, Any]:
    folder = calibrated_bundle(tmp / "bundle")
    meta = bundle.read_metadata(folder)
    del meta["graph"]
    bundle.write_metadata(folder, meta)
    return {}


def int8_without_an_int8_graph(tmp: Path) -> dict[str, Any]:
    calibrated_bundle(tmp / "bundle")
    return {"model": {"precision": "int8"}}


def corrupt_calibration(tmp: Path) -> dict[str, Any]:
    folder = calibrated_bundle(tmp / "bundle")
    text = (folder / bundle.CALIBRATION).read_text()
    (folder / bundle.CALIBRATION).write_text(text[: len(text) // 2])  # cut off mid-write
    return {}


def calibration_with_a_wrong_threshold_type(tmp: Path) -> dict[str, Any]:
    folder = calibrated_bundle(tmp / "bundle")
    data = json.loads((folder / bundle.CALIBRATION).read_text())
    data["pixel_threshold"] = "high"
    (folder / bundle.CALIBRATION).write_text(json.dumps(data))
    return {}


def no_calibration(tmp: Path) -> dict[str, Any]:
    make_deviation_bundle(tmp / "bundle")
    return {}


def calibration_for_another_graph(tmp: Path) -> dict[str, Any]:
    folder = calibrated_bundle(tmp / "bundle", size=64)
    make_deviation_bundle(folder, 32, 32)  # re-exported: a new graph, the old thresholds left behind
    return {}


def graph_replaced_after_export(tmp: Path) -> dict[str, Any]:
    folder = calibrated_bundle(tmp / "bundle")
    (folder / bundle.GRAPH).write_bytes((folder / bundle.GRAPH).read_bytes() + b"\0")
    return {}


def graph_that_does_not_load(tmp: Path) -> dict[str, Any]:
    """Metadata and hash agree, but the file is not an ONNX graph: only a real session finds it."""
    folder = calibrated_bundle(tmp / "bundle")
    (folder / bundle.GRAPH).write_bytes(b"not an onnx graph" * 64)
    meta = bundle.read_metadata(folder)
    meta["graph"]["sha256"] = bundle.sha256_file(folder / bundle.GRAPH)
    bundle.write_metadata(folder, meta)
    return {}


def archive_folder_under_a_file(tmp: Path) -> dict[str, Any]:
    calibrated_bundle(tmp / "bundle")
    (tmp / "archive").write_text("a file where the archive folder should go")
    return {"archive": {"enabled": True, "dir": "archive/line1"}}


def curve_key_readable_by_others(tmp: Path) -> dict[str, Any]:
    calibrated_bundle(tmp / "bundle")
    (tmp / "keys").mkdir()
    (tmp / "clients").mkdir()
    _, secret = zmq.auth.create_certificates(tmp / "keys", "server")
    zmq.auth.create_certificates(tmp / "clients", "plc")
    os.chmod(secret, 0o644)
    return {
        "security": {
            "curve": True,
            "server_secret_key_file": "keys/server.key_secret",
            "authorized_keys_dir": "clients",
        }
    }


CASES: list[tuple[Callable[[Path], dict[str, Any]], int, tuple[str, ...]]] = [
    (empty_bundle_folder, 3, ("metadata.json", "not found", "uncalibrated")),
    (trained_but_not_exported, 3, ("metadata.json", "no 'graph' section", "linewatch export")),
    (int8_without_an_int8_graph, 3, ("int8", "linewatch export --int8")),
    (corrupt_calibration, 3, ("calibration.json", "not valid JSON", "every result as ERROR")),
    (calibration_with_a_wrong_threshold_type, 3, ("calibration.json", "pixel_threshold", "every result as ERROR")),
    (no_calibration, 3, ("uncalibrated", "calibration.json", "linewatch calibrate", "every result as ERROR")),
    (calibration_for_another_graph, 3, ("calibration.json", "recalibrate")),
    (graph_replaced_after_export, 3, ("model.onnx", "sha256")),
    (graph_that_does_not_load, 3, ("model.onnx", "ONNX Runtime cannot load the graph")),
    (archive_folder_under_a_file, 2, ("archive.dir", "is not a directory")),
    (curve_key_readable_by_others, 2, ("server.key_secret", "chmod 600")),
]


@pytest.mark.parametrize(("breakage", "code", "words"), CASES, ids=[case[0].__name__ for case in CASES])
def test_a_config_run_cannot_start_or_judge_with_is_refused(tmp_path, breakage, code, words):
    done = check_config(write_config(tmp_path, **breakage(tmp_path)))
    assert done.returncode == code, done.stdout + done.stderr
    assert "OK" not in done.stdout, done.stdout
    for word in words:
        assert word in done.stderr, f"{word!r} not in: {done.stderr}"
    problems = 2 if breakage is empty_bundle_folder else 1  # an empty folder has no calibration either
    assert f"{problems} problem(s)" in done.stderr, done.stderr


def test_an_endpoint_in_use_is_refused_naming_the_key(tmp_path):
    calibrated_bundle(tmp_path / "bundle")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    context = zmq.Context()
    holder = context.socket(zmq.PUB)  # another daemon, or anything else, already bound there
    holder.bind(endpoint)
    try:
        done = check_config(write_config(tmp_path, publish={"endpoint": endpoint}))
    finally:
        holder.close(0)
        context.term()
    assert done.returncode == 2, done.stdout + done.stderr
    assert "publish.endpoint" in done.stderr and "Address already in use" in done.stderr
    assert check_config(tmp_path / "line.yaml").returncode == 0  # released: the same config passes


def test_every_problem_is_reported_in_one_run(tmp_path):
    """A person fixes them all at once: the bundle's and the config's, each naming its file or key; the exit code is
    the config's (2), since the config file needs editing either way."""
    (tmp_path / "bundle").mkdir()
    (tmp_path / "archive").write_text("")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    context = zmq.Context()
    holder = context.socket(zmq.PUB)
    holder.bind(endpoint)
    try:
        config = write_config(
            tmp_path, publish={"endpoint": endpoint}, archive={"enabled": True, "dir": "archive/line1"}
        )
        done = check_config(config)
    finally:
        holder.close(0)
        context.term()
    assert done.returncode == 2, done.stdout + done.stderr
    assert "4 problem(s)" in done.stderr, done.stderr
    for word in ("metadata.json", "uncalibrated", "archive.dir", "publish.endpoint"):
        assert word in done.stderr, f"{word!r} not in: {done.stderr}"
