"""Daemon config: the commented example is complete and valid; every kind of mistake is refused with file + key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from linewatch.errors import ConfigError
from linewatch.line.config import load_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "linewatch.yaml"


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "bundle").mkdir()
    (tmp_path / "line.avi").write_bytes(b"")
    return tmp_path


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "lw.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def minimal(**extra) -> dict:
    data = {"model": {"bundle": "bundle"}, "cameras": [{"name": "cam1", "kind": "video", "source": "line.avi"}]}
    data.update(extra)
    return data


def test_example_config_uses_only_known_keys_and_valid_values(workdir):
    data = yaml.safe_load(EXAMPLE.read_text())
    data["model"]["bundle"] = str(workdir / "bundle")  # the example points at a production path
    cfg = load_config(write(workdir, data))
    assert [c.name for c in cfg.cameras] == ["cam1", "cam2"]
    assert cfg.cameras[0].roi == (0, 0, 1280, 720) and cfg.cameras[1].mode == "triggered"
    assert cfg.trigger.enabled and cfg.metrics.port == 9108 and cfg.engine.max_batch == 8


def test_minimal_config_gets_defaults_and_resolves_relative_paths(workdir):
    cfg = load_config(write(workdir, minimal()))
    assert cfg.model.bundle == workdir / "bundle"
    assert cfg.cameras[0].source == str(workdir / "line.avi")
    assert cfg.publish.endpoint == "tcp://127.0.0.1:5555" and cfg.cameras[0].queue_size == 4


@pytest.mark.parametrize(
    "change, key, expected",
    [
        ({"engine": {"max_bacth": 4}}, "engine.max_bacth", "unknown key"),
        ({"metrics": {"port": "9100"}}, "metrics.port", "expected an integer, got str"),
        ({"engine": {"max_batch": 0}}, "engine.max_batch", "expected a value >= 1"),
        ({"publish": {"mask": {"enabled": "yes"}}}, "publish.mask.enabled", "true/false"),
        ({"cameras": [{"name": "cam1", "kind": "video", "source": "gone.avi"}]}, "cameras[0].source", "gone.avi"),
        ({"cameras": [{"name": "cam1", "kind": "webcam", "source": 0}]}, "cameras[0].kind", "one of"),
        ({"cameras": [{"name": "cam1", "kind": "url", "source": "192.168.0.2"}]}, "cameras[0].source", "URL"),
        ({"cameras": [{"name": "cam/1", "kind": "device", "source": 0}]}, "cameras[0].name", "letters"),
        ({"cameras": [{"name": "a", "kind": "device", "source": 0, "roi": [0, 0, 10]}]}, "cameras[0].roi", "[x, y"),
        (
            {"cameras": [{"name": "a", "kind": "device", "source": 0}, {"name": "a", "kind": "device", "source": 1}]},
            "cameras[1].name",
            "unique",
        ),
        ({"cameras": [{"name": "a", "kind": "device", "source": 0, "mode": "triggered"}]}, "trigger.enabled", "true"),
        ({"cameras": []}, "cameras", "non-empty"),
        ({"model": {"bundle": "missing_bundle"}}, "model.bundle", "does not exist"),
        ({"model": {}}, "model.bundle", "required key missing"),
        ({"model": {"bundle": "bundle", "precision": "int4"}}, "model.precision", "one of fp32, fp16, int8"),
        ({"model": {"bundle": "bundle", "fp16": True}}, "model.fp16", "unknown key"),
        ({"security": {"curve": True}}, "security.server_secret_key_file", "required key missing"),
        ({"archive": {"enabled": True}}, "archive.dir", "required key missing"),
    ],
)
def test_bad_values_are_refused_naming_file_key_and_expectation(workdir, change, key, expected):
    path = write(workdir, minimal(**change))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and f": {key}:" in message and expected in message


def test_not_yaml_and_missing_file(workdir):
    bad = workdir / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(workdir / "nope.yaml")


def test_check_config_command_exit_codes(workdir):
    good = write(workdir, minimal())
    run = [sys.executable, "-m", "linewatch.cli", "check-config"]
    ok = subprocess.run(run + [str(good)], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0 and "OK" in ok.stdout and "cam1" in ok.stdout
    bad = write(workdir, minimal(logging={"level": "LOUD"}))
    fail = subprocess.run(run + [str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert fail.returncode == 2 and "logging.level" in fail.stderr and "LOUD" in fail.stderr
