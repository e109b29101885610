"""Daemon config: the commented example is complete and valid; every kind of mistake is refused with file + key."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from linewatch.errors import ConfigError
from linewatch.line.config import Config, load_config
from linewatch.line.config_reference import REGENERATE, choices, field_at, reference, schema_keys
from linewatch.training.presets import TrainSettings

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "linewatch.yaml"
TRAIN_EXAMPLE = ROOT / "config" / "train.yaml"


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


@pytest.mark.unit
def test_example_config_uses_only_known_keys_and_valid_values(workdir):
    data = yaml.safe_load(EXAMPLE.read_text())
    data["model"]["bundle"] = str(workdir / "bundle")  # the example points at a production path
    cfg = load_config(write(workdir, data))
    assert [c.name for c in cfg.cameras] == ["cam1", "cam2"]
    assert cfg.cameras[0].roi == (0, 0, 1280, 720) and cfg.cameras[1].mode == "triggered"
    assert cfg.trigger.enabled and cfg.metrics.port == 9108 and cfg.engine.max_batch == 8


@pytest.mark.unit
def test_minimal_config_gets_defaults_and_resolves_relative_paths(workdir):
    cfg = load_config(write(workdir, minimal()))
    assert cfg.model.bundle == workdir / "bundle"
    assert cfg.cameras[0].source == str(workdir / "line.avi")
    assert cfg.publish.endpoint == "tcp://127.0.0.1:5555" and cfg.cameras[0].queue_size == 4


@pytest.mark.unit
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
        ({"model": {"bundle": "bundle", "precision": "int4"}}, "model.precision", "one of 'fp32', 'fp16', 'int8'"),
        ({"model": {"bundle": "bundle", "fp16": True}}, "model.fp16", "unknown key"),
        ({"security": {"curve": True}}, "security.server_secret_key_file", "required key missing"),
        ({"archive": {"enabled": True}}, "archive.dir", "required key missing"),
        ({"cameras": [{"name": "kamera_ü", "kind": "device", "source": 0}]}, "cameras[0].name", "ASCII letters"),
        ({"cameras": [{"name": "cam²", "kind": "device", "source": 0}]}, "cameras[0].name", "got str 'cam²'"),
        ({"cameras": [{"name": "a", "kind": "device", "source": 0.5}]}, "cameras[0].source", "integer or a string"),
        (
            {"cameras": [{"name": "a", "kind": "device", "source": 0, "roi": [0, "0", 4, 4]}]},
            "cameras[0].roi[1]",
            "int",
        ),
        (
            {"cameras": [{"name": "a", "kind": "device", "source": 0, "reconnect": {"initial_s": 2, "max_s": 1}}]},
            "cameras[0].reconnect.max_s",
            "expected a value >= initial_s (2.0), got float 1.0",
        ),
        ({"engine": {"warmup": 1}}, "engine.warmup", "expected true/false, got int 1"),
        ({"engine": {"max_batch": True}}, "engine.max_batch", "expected an integer, got bool True"),
        ({"engine": {"providers": []}}, "engine.providers", "non-empty"),
        ({"publish": {"endpoint": "127.0.0.1:5555"}}, "publish.endpoint", "expected a ZeroMQ endpoint"),
        ({"publish": {"endpoint": "tcp://0.0.0.0:5555"}}, "publish.endpoint", "beyond loopback needs CURVE"),
        ({"trigger": {"enabled": True, "endpoint": "tcp://127.0.0.1:5555"}}, "trigger.endpoint", "different"),
        ({"archive": {"verdicts": ["NOK", "BAD"]}}, "archive.verdicts[1]", "one of 'OK', 'NOK', 'ERROR'"),
        ({"security": {"curve": True, "server_secret_key_file": ""}}, "security.server_secret_key_file", "a path"),
        ({"path": "elsewhere.yaml"}, "path", "unknown key"),  # Config.path is where the file was read, not a key
    ],
)
def test_bad_values_are_refused_naming_file_key_and_expectation(workdir, change, key, expected):
    path = write(workdir, minimal(**change))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and f": {key}:" in message and expected in message


@pytest.mark.unit
def test_not_yaml_and_missing_file(workdir):
    bad = workdir / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(workdir / "nope.yaml")


@pytest.mark.e2e
def test_check_config_command_exit_codes(workdir):
    good = write(workdir, minimal())
    run = [sys.executable, "-m", "linewatch.cli", "check-config"]
    ok = subprocess.run(run + [str(good)], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0 and "OK" in ok.stdout and "cam1" in ok.stdout
    bad = write(workdir, minimal(logging={"level": "LOUD"}))
    fail = subprocess.run(run + [str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert fail.returncode == 2 and "logging.level" in fail.stderr and "LOUD" in fail.stderr


@pytest.mark.unit
def test_relative_paths_resolve_against_the_config_folder_and_copies_keep_the_path(workdir):
    cfg = load_config(write(workdir, minimal(archive={"enabled": True, "dir": "archive"})))
    assert cfg.archive.dir == workdir / "archive" and cfg.path == workdir / "lw.yaml"
    copy = cfg.model_copy(update={"model": cfg.model})
    assert copy.path == cfg.path and copy == cfg and isinstance(cfg.cameras, tuple)


@pytest.mark.e2e
def test_check_config_refuses_a_camera_name_the_wire_protocol_would_refuse(workdir):
    bad = write(workdir, minimal(cameras=[{"name": "kamera_ü", "kind": "video", "source": "line.avi"}]))
    run = [sys.executable, "-m", "linewatch.cli", "check-config", str(bad)]
    fail = subprocess.run(run, cwd=ROOT, capture_output=True, text=True)
    assert fail.returncode == 2 and "cameras[0].name" in fail.stderr and "kamera_ü" in fail.stderr


@pytest.mark.unit
def test_config_reference_is_generated_from_the_schema():
    committed = (ROOT / "docs" / "CONFIG.md").read_text()
    assert committed == reference(), f"docs/CONFIG.md is out of date with the schema: run `{REGENERATE}`"
    for path, _ in schema_keys(Config):
        assert f"`{path}`" in committed


# --- the commented examples must not contradict the schema ----------------------------------------------------

KEY_LINE = re.compile(r"^(?P<indent> *)(?P<item>- )?(?P<key>[a-z_]+):(?:\s|$)")
COMMENTED_KEY = re.compile(r"^(?P<indent> *)# (?P<rest>- \{.*|[a-z_]+: \S.*)$")


def example_keys(text: str) -> list[tuple[str, str]]:
    """(dotted key, comment) for each key line of a block-style YAML file, list entries as `name[]`.

    Commented-out example keys (`# key: value`, `# - {flow mapping}`) count too: they are documentation."""
    found: list[tuple[str, str]] = []
    parents: list[tuple[int, str]] = []  # (indent, dotted path) of the enclosing keys
    for raw in text.splitlines():
        commented = COMMENTED_KEY.match(raw)
        line = commented["indent"] + commented["rest"] if commented else raw
        code, _, comment = line.partition(" #")
        match = KEY_LINE.match(code) or re.match(r"^(?P<indent> *)(?P<item>- )(?P<flow>\{.*\})", code)
        if not match:
            continue
        indent = len(match["indent"])
        while parents and parents[-1][0] >= indent:
            parents.pop()
        prefix = parents[-1][1] if parents else ""
        if match["item"]:  # a list entry: its keys sit under `parent[]`, two columns in
            parents.append((indent, f"{prefix}[]"))
            prefix, indent = f"{prefix}[]", indent + 2
        keys = list(yaml.safe_load(match["flow"])) if "flow" in match.groupdict() else [match["key"]]
        for key in keys:
            path = f"{prefix}.{key}" if prefix else key
            found.append((path, comment.strip()))
        parents.append((indent, f"{prefix}.{keys[0]}" if prefix else keys[0]))
    return found


def enumeration(comment: str) -> set[str] | None:
    """`fp32 | fp16 (GPU) | int8 (CPU); ...` -> {fp32, fp16, int8}; None when the comment lists no choices."""
    if "|" not in comment:
        return None
    return {re.match(r"\s*([\w-]+)", part)[1] for part in comment.split("|")}


@pytest.mark.unit
@pytest.mark.parametrize("example, model", [(EXAMPLE, Config), (TRAIN_EXAMPLE, TrainSettings)])
def test_example_comments_agree_with_the_schema(example, model):
    keys = example_keys(example.read_text())
    assert len(keys) > 20
    for path, comment in keys:
        field = field_at(model, path)
        assert field is not None, f"{example.name}: {path} is not a key of the schema"
        listed = enumeration(comment)
        if listed is not None:
            allowed = choices(field)
            assert allowed is not None, f"{example.name}: {path}: the comment lists choices the key does not have"
            assert listed == {str(c) for c in allowed}, f"{example.name}: {path}: comment {listed} != schema {allowed}"


@pytest.mark.unit
def test_example_key_reader_sees_list_entries_and_commented_keys():
    text = "a:\n  - n: 1\n    m: x   # p | q\n  # - {n: 2, k: 3}   # two\nb:\n  # c: 1\n  d: 2\n"
    assert example_keys(text) == [
        ("a", ""),
        ("a[].n", ""),
        ("a[].m", "p | q"),
        ("a[].n", "two"),
        ("a[].k", "two"),
        ("b", ""),
        ("b.c", ""),
        ("b.d", ""),
    ]
