"""The convolutional autoencoder of Table VIII: 1×1 convolutions only, i.e. one MLP applied per region.

Written with Linear layers on channel-last vectors: identical maths to 1×1 convs, and it lets training feed
shuffled regional vectors (any position is an independent sample for a per-position network).
"""

from __future__ import annotations

import torch
from torch import nn


def cae_widths(c_o: int, c_d: int) -> list[int]:
    c_mid = (c_o + c_d) // 2
    return [c_o, c_mid, 2 * c_d, c_d, 2 * c_d, c_mid, c_o]


class CAE(nn.Module):
    """c_o -> (c_o+c_d)//2 -> 2c_d -> c_d -> 2c_d -> (c_o+c_d)//2 -> c_o; ReLU after layers 1, 2, 4, 5."""

    RELU_AFTER = (0, 1, 3, 4)

    def __init__(self, c_o: int, c_d: int, batchnorm: bool = False):
        super().__init__()
        if not 0 < c_d < c_o:
            raise ValueError(f"latent size c_d must be in 1..{c_o - 1}, got {c_d}")
        self.c_o, self.c_d, self.batchnorm = c_o, c_d, batchnorm
        widths = cae_widths(c_o, c_d)
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.norms = nn.ModuleList(
            nn.BatchNorm1d(widths[i + 1]) if batchnorm and i in self.RELU_AFTER else nn.Identity() for i in range(6)
        )

    def forward_vectors(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, c_o) regional vectors -> reconstructions (B, c_o)."""
        for i, (linear, norm) in enumerate(zip(self.linears, self.norms)):
            x = norm(linear(x))
            if i in self.RELU_AFTER:
                x = torch.relu(x)
        return x

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        """fmap: (N, c_o, h, w) -> reconstruction of the same shape."""
        n, c, h, w = fmap.shape
        vec = fmap.permute(0, 2, 3, 1).reshape(n * h * w, c)
        return self.forward_vectors(vec).reshape(n, h, w, c).permute(0, 3, 1, 2)

    def fold_batchnorm(self) -> "CAE":
        """Fold eval-mode BatchNorm into the preceding Linear (for export); returns self."""
        for i, norm in enumerate(self.norms):
            if isinstance(norm, nn.BatchNorm1d):
                linear = self.linears[i]
                scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
                linear.weight.data = linear.weight.data * scale[:, None]
                linear.bias.data = (linear.bias.data - norm.running_mean) * scale + norm.bias
                self.norms[i] = nn.Identity()
        self.batchnorm = False
        return self


def pca_latent_dim(vectors: torch.Tensor, variance: float = 0.9) -> int:
    """Smallest number of principal components whose explained variance reaches `variance` (paper: 0.9)."""
    if vectors.ndim != 2 or vectors.shape[0] < 2:
        raise ValueError("PCA needs a (n >= 2, c) matrix of regional vectors")
    x = vectors.double()
    x = x - x.mean(0, keepdim=True)
    cov = x.T @ x / (x.shape[0] - 1)
    eig = torch.linalg.eigvalsh(cov).flip(0).clamp_min(0)
    ratio = torch.cumsum(eig, 0) / eig.sum()
    k = int(torch.searchsorted(ratio, torch.tensor(variance, dtype=ratio.dtype)).item()) + 1
    return max(1, min(k, vectors.shape[1] - 1))
