"""Image I/O shared by training, evaluation, calibration and the daemon (torch-free).

One resize function for every path, so the model sees frames prepared exactly as in training.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from linewatch.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


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


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as uint8 BGR; a missing or corrupt file raises DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise DataError(f"cannot decode image (corrupt or unsupported format): {path}")
    if image.dtype == np.uint16:
        image = (image / 257).astype(np.uint8)
    return as_bgr(image)


def read_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a ground-truth mask as bool H×W, optionally resized (nearest) to size=(height, width)."""
    path = Path(path)
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise DataError(f"cannot read mask: {path}")
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
