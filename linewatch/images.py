"""Image I/O shared by training, evaluation, calibration and the daemon (torch-free).

One resize function for every path, so the model sees frames prepared exactly as in training.
"""

from __future__ import annotations

import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import PIL.Image

from linewatch.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
PIL_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")  # the header readers for IMAGE_SUFFIXES, nothing else
# 2**27 px (134 MP, 400 MB as BGR): a bigger header is refused undecoded. Raise it with the variable for larger
# sensors; Pillow, which reads the header, refuses above 2 × PIL.Image.MAX_IMAGE_PIXELS (179 MP) by itself.
MAX_IMAGE_PIXELS = 2**27
MAX_PIXELS_ENV = "LINEWATCH_MAX_IMAGE_PIXELS"


def list_images(folder: str | Path) -> list[Path]:
    """Sorted image files directly in `folder`; a missing or empty folder is an error, not an empty list."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def as_bgr(image: np.ndarray) -> np.ndarray:
    """uint8 H×W×3 BGR from grey, BGRA or BGR input (grey is triplicated, as in the paper)."""
    if image.dtype != np.uint8:
        raise DataError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise DataError(f"unsupported image shape {image.shape}")


def max_image_pixels() -> int:
    """Largest width × height `read_image` decodes: $LINEWATCH_MAX_IMAGE_PIXELS, else MAX_IMAGE_PIXELS."""
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not value:
        return MAX_IMAGE_PIXELS
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ConfigError(f"{MAX_PIXELS_ENV}={value!r}: expected a positive whole number of pixels")
    return limit


def header_size(data: bytes, path: str | Path) -> tuple[int, int] | None:
    """(width, height) from the image header, read without decoding any pixel (Pillow opens lazily).

    None when Pillow cannot read the header: OpenCV then decides, under its own limit (CV_IO_MAX_IMAGE_PIXELS)."""
    try:
        with warnings.catch_warnings():  # Pillow's warnings about a header (size, EXIF) are ours to judge, not print
            warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
            with PIL.Image.open(io.BytesIO(data), formats=PIL_FORMATS) as img:
                width, height = img.size
    except PIL.Image.DecompressionBombError:  # above 2 × PIL.Image.MAX_IMAGE_PIXELS: Pillow's own refusal
        raise DataError(
            f"refusing to decode {path}: its header says more than {2 * (PIL.Image.MAX_IMAGE_PIXELS or 0)} pixels "
            "(Pillow's limit, PIL.Image.MAX_IMAGE_PIXELS)"
        ) from None
    except Exception:  # Pillow raises many types for a header it cannot parse; OpenCV decides
        return None
    return int(width), int(height)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """16-bit samples scaled to 8 bits (rounded), straight into a uint8 array: no float64 copy of a large image."""
    if image.dtype == np.uint16:
        return cv2.convertScaleAbs(image, alpha=1.0 / 257.0)
    return image


def decode_file(path: str | Path, flags: int, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image file with OpenCV `flags`; a missing, corrupt or oversized file raises DataError naming it.

    The header's width × height is checked against `max_pixels` (default `max_image_pixels()`) before anything
    is decoded, so a small file claiming a huge image (a decompression bomb) costs no memory."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    limit = max_image_pixels() if max_pixels is None else max_pixels
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
    size = header_size(data, path)
    if size is not None and size[0] * size[1] > limit:
        raise DataError(
            f"refusing to decode {path}: its header says {size[0]}×{size[1]} pixels, more than the limit of "
            f"{limit} ({MAX_PIXELS_ENV})"
        )
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags) if data else None
    except cv2.error as exc:  # e.g. OpenCV's own size limit, or a decoder that throws instead of returning None
        raise DataError(f"cannot decode image {path}: {str(exc).strip().splitlines()[-1]}") from None
    if image is None:
        raise DataError(f"cannot decode image (corrupt or unsupported format): {path}")
    if image.shape[0] * image.shape[1] > limit:  # a header Pillow could not read: too late for memory, not for use
        raise DataError(f"refusing {path}: {image.shape[1]}×{image.shape[0]} pixels, more than the limit of {limit}")
    return image


def read_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as uint8 BGR (16-bit scaled, grey triplicated, alpha dropped); a missing, corrupt or
    oversized file (see `decode_file`) raises DataError naming it."""
    return as_bgr(to_uint8(decode_file(path, cv2.IMREAD_UNCHANGED, max_pixels)))


def check_images(paths: Sequence[str | Path], what: str = "images") -> None:
    """Decode every image once, before any long work starts, and raise one DataError that names every file that
    cannot be used, each with its reason: a folder with several bad files is fixed in one round, not one file per
    hour-long run. A full decode, not a header check: a truncated JPEG has a perfect header. Threads overlap the
    reads (OpenCV releases the GIL); nothing is kept, so memory stays at a few images."""
    paths = list(paths)
    limit = max_image_pixels()

    def problem(path: str | Path) -> str | None:
        try:
            read_image(path, limit)
        except DataError as exc:
            return str(exc)
        return None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        bad = [reason for reason in pool.map(problem, paths) if reason is not None]
    if bad:
        raise DataError(
            f"{len(bad)} of {len(paths)} {what} cannot be used (fix or remove them, then run again):\n  "
            + "\n  ".join(bad)
        )


def read_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a ground-truth mask as bool H×W, optionally resized (nearest) to size=(height, width)."""
    mask = decode_file(path, cv2.IMREAD_GRAYSCALE)
    if size is not None and mask.shape != tuple(size):
        mask = cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    return mask > 127


def resize_to_model(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The one resize used everywhere before the model: area for shrinking, linear for enlarging."""
    image = as_bgr(image)
    if image.shape[:2] == (height, width):
        return np.ascontiguousarray(image)
    shrink = image.shape[0] > height or image.shape[1] > width
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interp)


def load_for_model(path: str | Path, height: int, width: int) -> np.ndarray:
    return resize_to_model(read_image(path), height, width)
