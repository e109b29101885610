"""Fuzzing the daemon config reader: whatever a file holds, `load_config` gives a Config or a ConfigError naming the
file, never another exception, a hang or a memory blow-up (a bad config must stop the start with a message, and a
bad file given to SIGHUP must be refused, not crash the running daemon).

Bounded for CI: each property runs a few hundred examples with a deadline per example; the YAML bombs, which
could hang a process that does not refuse them, run in `linewatch check-config` subprocesses under a timeout.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from linewatch.errors import ConfigError
from linewatch.line.config import Config, load_config
from linewatch.line.config_reference import schema_keys

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "linewatch.yaml"
SCHEMA_PATHS = [path for path, _ in schema_keys(Config)]
FIELD_NAMES = sorted({path.rsplit(".", 1)[-1].removesuffix("[]") for path in SCHEMA_PATHS})

FUZZ = settings(
    max_examples=300,
    deadline=timedelta(seconds=2),  # one load is ~1 ms: a deadline this loose only catches hangs, never flakes
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# strings that mean something to the schema or to the file system
SPECIAL = st.sampled_from(
    [
        "",
        "bundle",
        "line.avi",
        "frames",
        "~",
        "~nosuchuser_lw/x",
        "a" * 300,
        "a/" * 3000,
        "/dev/video0",
        "nul\x00byte",
        "rtsp://admin:S3cret@10.0.0.1/s",
        "rtsp://",
        "v4l2src ! appsink",
        "tcp://0.0.0.0:5555",
        "tcp://127.0.0.1:5556",
        "tcp://[::1]:5557",
        "ipc:///tmp/x",
        "auto",
        "cpu",
        "int8",
        "url",
        "video",
        "folder",
        "device",
        "gstreamer",
        "triggered",
        "OK",
        "ERROR",
        "cam1",
        "cam1\n",
    ]
)
TEXTS = SPECIAL | st.text(max_size=40)
SCALARS = (
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(2**200), max_value=2**200) | st.floats() | TEXTS
)
KEYS = st.sampled_from(FIELD_NAMES) | st.text(max_size=12)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(KEYS, children, max_size=5),
    max_leaves=25,
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder with what a valid config points at: a bundle folder, a video file, an image folder."""
    path = tmp_path_factory.mktemp("fuzz_config").resolve()
    (path / "bundle").mkdir()
    (path / "frames").mkdir()
    (path / "line.avi").write_bytes(b"")
    return path


def valid() -> dict[str, Any]:
    return {
        "model": {"bundle": "bundle"},
        "cameras": [
            {"name": "cam1", "kind": "video", "source": "line.avi"},
            {"name": "cam2", "kind": "url", "source": "rtsp://admin:S3cret@10.0.0.1/s", "mode": "triggered"},
        ],
        "trigger": {"enabled": True},
    }


def load_checked(path: Path) -> Config | None:
    """The property: a Config, or a ConfigError whose message names the file; anything else fails the test."""
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        assert str(path) in str(exc), f"the error does not name the file: {exc}"
        assert "S3cret" not in str(exc), f"the error shows a camera password: {exc}"
        return None
    assert isinstance(cfg, Config)
    return cfg


def set_at(data: dict[str, Any], path: str, value: Any, delete: bool, index: int) -> None:
    """Set (or delete) the key at a schema path such as `cameras[].reconnect.max_s`, creating sections on the way."""
    parts = path.split(".")
    node: Any = data
    for part in parts[:-1]:
        name = part.removesuffix("[]")
        if not isinstance(node, dict):
            return
        child = node.setdefault(name, [{}] if part.endswith("[]") else {})
        if part.endswith("[]"):
            if not isinstance(child, list) or not child:
                return
            child = child[index % len(child)]
        node = child
    if not isinstance(node, dict):
        return
    last = parts[-1].removesuffix("[]")
    if delete:
        node.pop(last, None)
    else:
        node[last] = value


@pytest.mark.unit
@FUZZ
@given(document=st.dictionaries(KEYS, VALUES, max_size=6) | VALUES)
def test_any_yaml_document_gives_a_config_or_a_config_error(workdir, document):
    path = workdir / "any.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True))
    load_checked(path)


@pytest.mark.unit
@FUZZ
@given(
    changes=st.lists(
        st.tuples(st.sampled_from(SCHEMA_PATHS), SPECIAL | VALUES, st.booleans(), st.integers(0, 3)),
        min_size=1,
        max_size=3,
    )
)
def test_a_valid_config_with_keys_changed_to_anything_gives_a_config_or_a_config_error(workdir, changes):
    """Mutations of a valid file reach every validator of the schema, which random documents rarely do."""
    data = copy.deepcopy(valid())
    for path, value, delete, index in changes:
        set_at(data, path, value, delete, index)
    path = workdir / "mutated.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    load_checked(path)


YAML_SOUP = st.lists(
    st.sampled_from(
        list("[]{}:,-&*!|>'\"#%@`?=~ \n\tab01.\\")
        + ["<<", "\u00e9", "&a", "*a", "!!binary", "- ", ": ", "9" * 4400, "2001-02-30", "~x/"]
    ),
    max_size=80,
).map("".join)
EXAMPLE_LINES = EXAMPLE.read_text().splitlines()


@pytest.mark.unit
@FUZZ
@given(
    raw=st.binary(max_size=400)
    | YAML_SOUP.map(str.encode)
    | st.lists(st.sampled_from(EXAMPLE_LINES) | YAML_SOUP, max_size=30).map(lambda ls: "\n".join(ls).encode())
)
def test_any_bytes_give_a_config_or_a_config_error(workdir, raw):
    path = workdir / "raw.yaml"
    path.write_bytes(raw)
    load_checked(path)


@pytest.mark.unit
def test_the_fuzzed_valid_config_is_valid(workdir):
    """The mutation test starts from a config that loads: otherwise it would only ever test one refusal."""
    path = workdir / "valid.yaml"
    path.write_text(yaml.safe_dump(valid()))
    cfg = load_checked(path)
    assert cfg is not None and [c.name for c in cfg.cameras] == ["cam1", "cam2"]


MINIMAL = "model: {bundle: bundle}\ncameras: [{name: c, kind: video, source: line.avi}]\n"


@pytest.mark.unit
@pytest.mark.parametrize(
    "text, says",
    [
        (MINIMAL + "engine: {threads: " + "9" * 5000 + "}\n", "not valid YAML"),
        (MINIMAL + "created: 2001-02-30\n", "not valid YAML"),
        ("model: {bundle: '~nosuchuser_lw/b'}\ncameras: []\n", "model.bundle"),
        ("model: {bundle: '" + "a" * 300 + "'}\ncameras: []\n", "model.bundle"),
        ("model: {bundle: '" + "a/" * 3000 + "'}\ncameras: []\n", "model.bundle"),
        ("model: &m {bundle: *m}\n", "alias refers to a node that contains it"),
        ("[" * 5000 + "]" * 5000, "nested too deeply"),
        (MINIMAL + "#" * (2 << 20), "larger than"),
        (b"model: {bundle: \xff\xfe}\n", "cannot read"),
    ],
    ids=[
        "5000-digit integer",
        "impossible date",
        "unknown ~user",
        "name too long",
        "path too long",
        "alias to itself",
        "deep nesting",
        "2 MiB of comments",
        "not UTF-8",
    ],
)
def test_hostile_files_are_refused_with_a_config_error(workdir, text, says):
    path = workdir / "hostile.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=says) as info:
        load_config(path)
    assert str(path) in str(info.value)


def alias_bomb(levels: int) -> str:
    """Billion laughs in a key the schema reads: each level is 9 aliases of the previous one."""
    text = 'l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for i in range(1, levels + 1):
        text += f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]\n"
    return text + MINIMAL + f"engine: {{providers: [*l{levels}]}}\n"


def merge_bomb(levels: int) -> str:
    """`<<` merge keys: PyYAML copies the merged pairs, 9 times per level (9^levels pairs from ~300 bytes)."""
    text = "m0: &m0 {a: 1, b: 2}\n"
    for i in range(1, levels + 1):
        text += f"m{i}: &m{i} {{<<: [" + ", ".join([f"*m{i - 1}"] * 9) + "]}\n"
    return text + MINIMAL


@pytest.mark.e2e
@pytest.mark.parametrize("bomb", [alias_bomb(9), merge_bomb(9)], ids=["billion-laughs", "merge-keys"])
def test_yaml_bombs_are_refused_quickly_by_check_config(workdir, bomb):
    """A few hundred bytes that stand for billions of values: refused at once (exit 2), not expanded."""
    path = workdir / "bomb.yaml"
    path.write_text(bomb)
    assert len(bomb) < 1000
    t0 = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "linewatch.cli", "check-config", str(path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=20,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("check-config was still expanding the YAML bomb after 20 s")
    assert done.returncode == 2, done.stderr
    assert "aliases expand to more than" in done.stderr and str(path) in done.stderr
    assert time.monotonic() - t0 < 15
