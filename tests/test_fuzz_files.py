"""Fuzzing what the daemon and the tools read from disk: calibration.json, metadata.json and image files.

Whatever the bytes, the answer is a valid value or the documented error (BundleError, DataError), never another
exception, and quickly. Bounded (max_examples, deadline) so the whole file runs in seconds in CI."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from linewatch import bundle
from linewatch.calibrate.store import FILE_KEYS, Calibration, read_calibration_file
from linewatch.errors import BundleError, DataError
from linewatch.images import read_image
from tests.test_images import jpeg_claiming, png_file

pytestmark = pytest.mark.unit

FUZZ = settings(
    max_examples=200,
    deadline=2000,  # ms per example: a parser that hangs or crawls fails here
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,  # no .hypothesis folder in the checkout; a failure prints its reproducing example
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
)


def nested(depth: int, opener: str, closer: str, core: str = "0") -> str:
    return opener * depth + core + closer * depth


deep_json = st.builds(
    nested,
    st.integers(min_value=1, max_value=200_000),
    st.sampled_from(["[", '{"a": ', '{"settings": [', "[{}, "]),
    st.sampled_from(["]", "}", "]}", "]"]),
)
hostile_text = st.sampled_from(
    [
        '{"version": ' + "9" * 5000 + "}",  # more digits than Python converts
        '{"pixel_threshold": 1e999}',
        '{"pixel_threshold": NaN}',
        '{"model_sha256": "\\ud800"}',  # a lone surrogate
        "\ufeff{}",
        "",
        "null",
    ]
)


GRAPH_SHA = "3f" * 32  # the graph the calibration must belong to


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """One folder for the whole module; each example overwrites one file in it."""
    return tmp_path_factory.mktemp("fuzz")


def calibration_like(values: dict[str, Any], drop: list[str]) -> dict[str, Any]:
    """A calibration file's keys with fuzzed values, some keys removed: exercises the validator, not just json."""
    data: dict[str, Any] = {"schema": "linewatch-calibration", "schema_version": 1}
    data.update(values)
    for key in drop:
        data.pop(key, None)
    return data


def loads_or_bundle_error(path: Path, sha: str) -> None:
    try:
        cal = read_calibration_file(path, sha)
    except BundleError as exc:
        assert str(path) in str(exc)
    else:
        assert isinstance(cal, Calibration) and cal.model_sha256 == sha


calibration_fields = st.fixed_dictionaries(
    {
        "version": json_scalars,
        "model_sha256": st.sampled_from(["<graph>", "0" * 64, "X" * 64]) | json_scalars,
        "pixel_threshold": json_scalars,
        "image_threshold": json_scalars,
        "min_defect_area": json_scalars,
        "created": json_scalars,
    },
    optional={"settings": json_values, "previous_version": json_scalars, "fpr_target": json_scalars},
)


@FUZZ
@given(
    content=st.one_of(
        json_values.map(json.dumps),
        deep_json,
        hostile_text,
        st.binary(max_size=2000),
        st.tuples(calibration_fields, st.lists(st.sampled_from(FILE_KEYS), max_size=2)),
    )
)
def test_calibration_json(folder, content):
    """Any text, bytes, nesting, or a calibration's keys with wrong values: a Calibration or a BundleError."""
    path = folder / bundle.CALIBRATION
    if isinstance(content, tuple):
        values, drop = content
        if values["model_sha256"] == "<graph>":
            values["model_sha256"] = GRAPH_SHA
        content = json.dumps(calibration_like(values, drop))
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    loads_or_bundle_error(path, GRAPH_SHA)


def metadata_or_bundle_error(folder: Path) -> None:
    try:
        meta = bundle.read_metadata(folder)
    except BundleError as exc:
        assert str(folder) in str(exc)
    else:
        assert meta["format"] == bundle.FORMAT and meta["format_version"] == bundle.FORMAT_VERSION
        assert all(type(meta["input"][k]) is int and meta["input"][k] > 0 for k in ("height", "width"))


@FUZZ
@given(
    content=st.one_of(
        json_values.map(json.dumps),
        deep_json,
        hostile_text,
        st.binary(max_size=2000),
        st.fixed_dictionaries(
            {
                "format": st.sampled_from([bundle.FORMAT]) | json_scalars,
                "format_version": st.sampled_from([bundle.FORMAT_VERSION]) | json_scalars,
                "input": st.fixed_dictionaries({"height": json_scalars, "width": json_scalars}) | json_values,
            }
        ).map(json.dumps),
    )
)
def test_metadata_json(tmp_path_factory, content):
    """Any text, bytes, nesting, or metadata keys with wrong values: the metadata dict or a BundleError."""
    folder = tmp_path_factory.mktemp("meta", numbered=True)
    if isinstance(content, bytes):
        (folder / bundle.METADATA).write_bytes(content)
    else:
        (folder / bundle.METADATA).write_text(content, encoding="utf-8", errors="surrogatepass")
    metadata_or_bundle_error(folder)


# --- image files (read_image is what the folder camera, calibrate and eval read files with) -----------------------

SAMPLE = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
ENCODED = {ext: cv2.imencode(ext, SAMPLE)[1].tobytes() for ext in (".png", ".jpg", ".bmp", ".tiff", ".webp")}


def image_or_data_error(path: Path) -> None:
    try:
        image = read_image(path)
    except DataError as exc:
        assert str(path) in str(exc)
    else:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert image.shape[0] * image.shape[1] <= 2**27


@st.composite
def damaged_images(draw: st.DrawFn) -> tuple[str, bytes]:
    """A real small image of each format, truncated or with a few bytes overwritten."""
    ext = draw(st.sampled_from(sorted(ENCODED)))
    data = bytearray(ENCODED[ext])
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    else:
        for _ in range(draw(st.integers(1, 8))):
            if data:
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return ext, bytes(data)


def bmp_claiming(width: int, height: int) -> bytes:
    data = bytearray(ENCODED[".bmp"])
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


huge_headers = st.one_of(
    st.builds(
        lambda w, h, ct: (".png", png_file(w, h, colour_type=ct)),
        st.integers(1, 2**31 - 1),
        st.integers(1, 2**31 - 1),
        st.sampled_from([0, 2, 6]),
    ),
    st.builds(lambda w, h: (".jpg", jpeg_claiming(w, h)), st.integers(1, 65535), st.integers(1, 65535)),
    st.builds(
        lambda w, h: (".bmp", bmp_claiming(w, h)), st.integers(-(2**31), 2**31 - 1), st.integers(-(2**31), 2**31 - 1)
    ),
)


@FUZZ
@given(
    sample=damaged_images()
    | huge_headers
    | st.tuples(st.sampled_from([".png", ".jpg", ".tif", ".webp"]), st.binary(max_size=512))
)
def test_image_files(tmp_path_factory, sample):
    ext, data = sample
    path = tmp_path_factory.mktemp("img", numbered=True) / f"frame{ext}"
    path.write_bytes(data)
    image_or_data_error(path)
