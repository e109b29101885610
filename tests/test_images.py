"""read_image (and so the folder camera): decompression bombs are refused from the header, before any memory is
spent, and 16-bit images become 8-bit without a float64 copy."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from linewatch.errors import DataError
from linewatch.images import check_images, list_images, read_image
from tests.helpers import write_bad_images

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_file(width: int, height: int, idat: bytes | None = None, colour_type: int = 2) -> bytes:
    """A PNG whose IHDR claims width × height (8-bit; RGB by default) and whose IDAT is `idat` (default: a few
    zero bytes, far too little for the claim)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64) if idat is None else idat
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def zero_png(width: int, height: int) -> bytes:
    """A real, valid grey PNG of zeros: deflate packs 1000:1, so a small file decodes to width × height bytes."""
    row = b"\0" * (width + 1)  # filter byte + pixels
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return png_file(width, height, idat, colour_type=0)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real 16×16 JPEG whose SOF0 header is rewritten to claim width × height."""
    data = bytearray(cv2.imencode(".jpg", np.full((16, 16, 3), 90, np.uint8))[1].tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.fixture(scope="module", params=[12000, 20000])
def bomb(request, tmp_path_factory) -> Path:
    """A few hundred kB that decode to 144 or 400 Mpx: above linewatch's limit (the smaller one also below
    Pillow's own), below OpenCV's (2**30 px), which would decode them."""
    side = request.param
    path = tmp_path_factory.mktemp("bomb") / f"bomb{side}.png"
    path.write_bytes(zero_png(side, side))
    return path


@pytest.mark.parametrize(
    "name, data",
    [
        ("huge_header.png", png_file(100_000, 100_000)),
        ("huge_header.jpg", jpeg_claiming(65_000, 65_000)),
    ],
)
def test_a_header_claiming_a_huge_image_is_a_data_error_naming_the_file(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        read_image(path)
    assert str(path) in str(err.value) and time.monotonic() - start < 1.0


def test_a_real_decompression_bomb_is_refused_before_decoding(bomb):
    """In a fresh interpreter, so its peak memory is the bomb's alone: the limit keeps it at the baseline
    (decoding would take 144 or 400 MB, three times that as BGR)."""
    probe = (
        "import json, resource, sys\n"
        "from linewatch.errors import DataError\n"
        "from linewatch.images import read_image\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    read_image(sys.argv[1]); outcome = 'decoded'\n"
        "except DataError as exc:\n"
        "    outcome = str(exc)\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'outcome': outcome, 'grown_mb': (after - before) / 1024}))\n"
    )
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", probe, str(bomb)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["outcome"].startswith(f"refusing to decode {bomb}: "), report
    assert report["grown_mb"] < 50, report
    assert time.monotonic() - start < 30


def test_the_limit_is_configurable(tmp_path, monkeypatch):
    path = tmp_path / "part.png"
    cv2.imwrite(str(path), np.full((100, 120), 7, np.uint8))
    assert read_image(path).shape == (100, 120, 3)
    with pytest.raises(DataError, match="120×100"):
        read_image(path, max_pixels=100 * 120 - 1)
    monkeypatch.setenv("LINEWATCH_MAX_IMAGE_PIXELS", str(100 * 119))
    with pytest.raises(DataError, match="LINEWATCH_MAX_IMAGE_PIXELS"):
        read_image(path)
    monkeypatch.setenv("LINEWATCH_MAX_IMAGE_PIXELS", str(100 * 120))
    assert read_image(path).shape == (100, 120, 3)


def test_16_bit_images_become_8_bit_bgr_rounded_without_a_float64_copy(tmp_path):
    ramp = (np.arange(1000 * 1000 * 3, dtype=np.uint32) * 7 % 65536).astype(np.uint16).reshape(1000, 1000, 3)
    ramp[0, :4] = [[0, 0, 0], [128, 129, 385], [32896, 65535, 65407], [1000, 1028, 1029]]
    path = tmp_path / "sixteen.png"
    assert cv2.imwrite(str(path), ramp)
    tracemalloc.start()
    try:
        image = read_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # decoded uint16 (6 MB) + the uint8 result (3 MB); a float64 copy alone would be 24 MB
    assert peak < 2 * ramp.nbytes, f"peak {peak / 1e6:.1f} MB while reading a {ramp.nbytes / 1e6:.1f} MB image"
    assert image.dtype == np.uint8 and image.shape == ramp.shape
    np.testing.assert_array_equal(image, np.rint(ramp / 257.0).astype(np.uint8))
    assert image[0, :4].tolist() == [[0, 0, 0], [0, 1, 1], [128, 255, 255], [4, 4, 4]]
    grey = np.full((8, 8), 65535, np.uint16)
    bgra = np.zeros((8, 8, 4), np.uint16)
    bgra[..., 2] = 257 * 200
    bgra[..., 3] = 65535
    for name, sixteen, expected in (("g.png", grey, [255, 255, 255]), ("a.png", bgra, [0, 0, 200])):
        cv2.imwrite(str(tmp_path / name), sixteen)
        out = read_image(tmp_path / name)
        assert out.shape == (8, 8, 3) and out.dtype == np.uint8 and out[3, 3].tolist() == expected


def test_check_images_names_every_bad_file_with_its_reason_in_one_error(tmp_path):
    for i in range(5):
        assert cv2.imwrite(str(tmp_path / f"good{i}.png"), np.full((40, 40, 3), 30 * i, np.uint8))
    bad = write_bad_images(tmp_path)
    files = list_images(tmp_path)
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        check_images(files, "parts")
    message = str(err.value)
    assert time.monotonic() - start < 2.0
    assert message.startswith("3 of 8 parts cannot be used"), message
    for path, reason in zip(bad, ("cannot decode image", "cannot decode image", "refusing to decode")):
        (line,) = [line for line in message.splitlines() if str(path) in line]
        assert reason in line, line
    assert "good" not in message
    check_images([p for p in files if p not in bad])  # the good ones alone pass
