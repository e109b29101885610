"""The CAE of Table VIII: widths, ReLU placement, 1×1-conv equivalence, BatchNorm folding, PCA choice of c_d."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA

from linewatch.training.cae import CAE, cae_widths, pca_latent_dim

pytestmark = pytest.mark.integration


def test_widths_follow_table_viii():
    # Table VIII for f_{1:12} (c_o = 3456) and c_d = 200: 3456 -> 1828 -> 400 -> 200 -> 400 -> 1828 -> 3456.
    assert cae_widths(3456, 200) == [3456, 1828, 400, 200, 400, 1828, 3456]
    cae = CAE(3456, 200)
    shapes = [(m.in_features, m.out_features) for m in cae.linears]
    assert shapes == [(3456, 1828), (1828, 400), (400, 200), (200, 400), (400, 1828), (1828, 3456)]


def test_relu_after_layers_1_2_4_5_only():
    torch.manual_seed(0)
    cae = CAE(48, 6).eval()
    x = torch.randn(64, 48)
    l1, l2, l3, l4, l5, l6 = cae.linears
    expected = l6(torch.relu(l5(torch.relu(l4(l3(torch.relu(l2(torch.relu(l1(x))))))))))
    torch.testing.assert_close(cae.forward_vectors(x), expected)
    # the latent code (after layer 3) and the output are linear: both take negative values
    latent = l3(torch.relu(l2(torch.relu(l1(x)))))
    assert (latent < 0).any() and (cae.forward_vectors(x) < 0).any()


def test_linear_layers_equal_1x1_convolutions_on_maps():
    torch.manual_seed(1)
    cae = CAE(40, 5).eval()
    fmap = torch.randn(2, 40, 3, 5)
    x = fmap
    for i, linear in enumerate(cae.linears):
        x = F.conv2d(x, linear.weight[:, :, None, None], linear.bias)
        if i in (0, 1, 3, 4):
            x = torch.relu(x)
    torch.testing.assert_close(cae(fmap), x, rtol=1e-5, atol=1e-5)


def test_batchnorm_folding_keeps_eval_output():
    torch.manual_seed(2)
    cae = CAE(32, 4, batchnorm=True)
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in cae.modules()) == 4
    opt = torch.optim.Adam(cae.parameters(), lr=1e-2)
    data = torch.randn(512, 32) * 3 + 1
    for _ in range(20):  # non-trivial running statistics and affine parameters
        opt.zero_grad()
        F.mse_loss(cae.forward_vectors(data), data).backward()
        opt.step()
    cae.eval()
    x = torch.randn(100, 32) * 3 + 1
    before = cae.forward_vectors(x).detach()
    cae.fold_batchnorm()
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in cae.modules())
    torch.testing.assert_close(cae.forward_vectors(x).detach(), before, rtol=1e-4, atol=1e-4)


def test_latent_size_must_be_below_input_size():
    with pytest.raises(ValueError, match="c_d"):
        CAE(16, 16)
    with pytest.raises(ValueError, match="c_d"):
        CAE(16, 0)


@pytest.mark.parametrize("rank,channels,decay", [(5, 40, 1.0), (12, 64, 0.8), (30, 96, 0.93)])
def test_pca_latent_dim_matches_sklearn(rank, channels, decay):
    rng = np.random.default_rng(rank)
    basis = np.linalg.qr(rng.normal(size=(channels, rank)))[0].T  # orthonormal rows
    scales = decay ** np.arange(rank)
    data = (rng.normal(size=(3000, rank)) * scales) @ basis + 0.001 * rng.normal(size=(3000, channels))
    expected = PCA(n_components=0.9, svd_solver="full").fit(data).n_components_
    assert pca_latent_dim(torch.from_numpy(data), 0.9) == expected
    assert expected <= rank


def test_pca_latent_dim_of_equal_variance_rank_15_data():
    # 15 equal components: 13 explain 86.7 %, 14 explain 93.3 %, so 90 % needs 14.
    rng = np.random.default_rng(7)
    basis = np.linalg.qr(rng.normal(size=(32, 15)))[0].T
    data = rng.normal(size=(20000, 15)) @ basis
    assert pca_latent_dim(torch.from_numpy(data), 0.9) == 14
    assert PCA(n_components=0.9, svd_solver="full").fit(data).n_components_ == 14
