"""Daemon config: the commented example is complete and valid; every kind of mistake is refused with file + key."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from linewatch.errors import ConfigError
from linewatch.line.config import Config, describe, load_config
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
        ({"cameras": [{"name": "cam1\n", "kind": "device", "source": 0}]}, "cameras[0].name", "ASCII letters"),
        (
            {"cameras": [{"name": "a", "kind": "device", "source": 0, "settle_ms": -1}]},
            "cameras[0].settle_ms",
            "expected a value >= 0",
        ),
        (
            {
                "cameras": [{"name": "a", "kind": "device", "source": 0}, {"name": "b", "kind": "device", "source": 1}],
                "trigger": {"enabled": True, "timeout_s": 0.5},
            }
            | {"cameras": [{"name": "a", "kind": "device", "source": 0, "settle_ms": 500}]},
            "cameras[0].settle_ms",
            "expected less than trigger.timeout_s (0.5 s), got float 500.0",
        ),
        (
            {"cameras": [{"name": "a", "kind": "video", "source": "rtsp://admin:S3cret@10.0.0.1/s"}]},
            "cameras[0].source",
            "a stream URL needs kind 'url'",
        ),
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
    from tests.helpers import calibrated_bundle, free_port

    calibrated_bundle(workdir / "bundle")  # check-config passes only a bundle `run` can judge with
    good = write(workdir, minimal(publish={"endpoint": f"tcp://127.0.0.1:{free_port()}"}))
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
def test_settle_ms_defaults_to_0_and_is_read_per_camera(workdir):
    cams = [
        {"name": "a", "kind": "device", "source": 0, "mode": "triggered", "settle_ms": 150},
        {"name": "b", "kind": "device", "source": 1},
    ]
    cfg = load_config(write(workdir, minimal(cameras=cams, trigger={"enabled": True})))
    assert [c.settle_ms for c in cfg.cameras] == [150.0, 0.0]


# --- camera credentials: never shown ---------------------------------------------------------------------------

SECRETS = ("S3cret", "hunter2", "T0k3n", "gstpw")
URL = "rtsp://admin:S3cret@10.0.0.21:554/stream1?password=hunter2&token=T0k3n"
LONG_URL = "rtps://admin:S3cretS3cretS3cretS3cretS3cretS3cretS3cretS3cret@10.0.0.21/s"  # typo in the scheme


@pytest.mark.unit
@pytest.mark.parametrize(
    "camera",
    [
        {"kind": "url", "source": LONG_URL},  # the password runs past show_value's cut
        {"kind": "url", "source": "admin:S3cret@10.0.0.21/s?password=hunter2"},  # no scheme
        {"kind": "video", "source": URL},  # a URL made into a path
        {"kind": "folder", "source": URL},
        {"kind": "device", "source": URL},
        {"kind": "gstreamer", "source": "rtspsrc location=rtsp://u:S3cret@h/s user-id=u user-pw=gstpw ! fakesink"},
        {"kind": "url", "source": URL, "roi": URL},  # a URL where a box belongs
    ],
)
def test_config_errors_never_show_camera_credentials(workdir, camera):
    path = write(workdir, minimal(cameras=[{"name": "cam1", **camera}]))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "cameras[0]" in message
    assert not any(secret in message for secret in SECRETS), message


@pytest.mark.unit
def test_describe_repr_and_str_of_a_config_hide_camera_credentials(workdir):
    gst = "rtspsrc location=rtsp://u:S3cret@h/s user-id=u user-pw=gstpw ! videoconvert ! appsink"
    cams = [{"name": "a", "kind": "url", "source": URL}, {"name": "b", "kind": "gstreamer", "source": gst}]
    cfg = load_config(write(workdir, minimal(cameras=cams)))
    assert cfg.cameras[0].source == URL  # the camera itself still gets the real URL
    for text in (describe(cfg), repr(cfg), str(cfg), repr(cfg.cameras[0])):
        assert not any(secret in text for secret in SECRETS), text
    assert "a (url: rtsp://***@10.0.0.21:554/stream1?password=***&token=***)" in describe(cfg)
    assert (
        cfg.cameras[1].shown_source
        == "rtspsrc location=rtsp://***@h/s user-id=*** user-pw=*** ! videoconvert ! appsink"
    )


@pytest.mark.e2e
def test_check_config_output_hides_camera_credentials(workdir):
    from tests.helpers import calibrated_bundle, free_port

    calibrated_bundle(workdir / "bundle")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    path = write(
        workdir, minimal(cameras=[{"name": "cam1", "kind": "url", "source": URL}], publish={"endpoint": endpoint})
    )
    done = subprocess.run(
        [sys.executable, "-m", "linewatch.cli", "check-config", str(path)], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0 and "rtsp://***@10.0.0.21:554/stream1" in done.stdout
    assert not any(secret in done.stdout + done.stderr for secret in SECRETS)


@pytest.mark.e2e
def test_the_daemon_shows_no_camera_credentials_in_status_or_log(deviation_bundle, tmp_path):
    """A URL camera that cannot be opened: its status message says why (`last_error`), the daemon logs it, and
    neither holds the password, token or user of the URL."""
    import zmq

    from tests.helpers import free_port

    closed = free_port()  # nothing listens: the open fails at once
    url = f"http://admin:S3cret@127.0.0.1:{closed}/s.mjpg?password=hunter2&token=T0k3n"
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = tmp_path / "linewatch.yaml"
    data = {
        "model": {"bundle": str(deviation_bundle)},
        "cameras": [{"name": "cam1", "kind": "url", "source": url, "reconnect": {"initial_s": 0.05, "max_s": 0.1}}],
        "engine": {"providers": ["cpu"], "threads": 1, "warmup": False},
        "publish": {"endpoint": endpoint, "status_interval_s": 0.2},
        "logging": {"level": "DEBUG"},
    }
    config.write_text(yaml.safe_dump(data))
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt_string(zmq.SUBSCRIBE, "linewatch/cam1/status")
    sub.connect(endpoint)
    log = tmp_path / "daemon.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "linewatch.cli", "run", "--config", str(config)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        status: dict = {}
        end = time.monotonic() + 60
        while not (status.get("last_error") and status.get("reconnects", 0) >= 2):
            assert time.monotonic() < end and proc.poll() is None, "no status with the camera's error"
            if sub.poll(200):
                status = json.loads(sub.recv_multipart()[1])
                status = status.get("status", status)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        sub.close()
    assert f"127.0.0.1:{closed}" in status["last_error"] and "***" in status["last_error"]
    text = json.dumps(status) + log.read_text(errors="replace")
    assert "cannot open url" in text and not any(secret in text for secret in SECRETS)


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


@pytest.mark.unit
def test_check_config_refuses_metrics_beyond_loopback_without_the_explicit_flag(tmp_path):
    """The metrics endpoint has no authentication: the same loopback rule as the sockets, caught before start."""
    (tmp_path / "bundle").mkdir()
    base = "model: {bundle: bundle}\ncameras: [{name: c, kind: device, source: 0}]\n"
    path = tmp_path / "lw.yaml"
    path.write_text(base + "metrics: {enabled: true, host: 0.0.0.0}\n")
    with pytest.raises(ConfigError, match=r"metrics\.host: expected a loopback address"):
        load_config(path)
    path.write_text(base + "metrics: {enabled: true, host: 0.0.0.0}\nsecurity: {allow_insecure_bind: true}\n")
    assert load_config(path).metrics.host == "0.0.0.0"
    path.write_text(base + "metrics: {enabled: true, host: 127.0.0.1}\n")
    assert load_config(path).metrics.enabled
