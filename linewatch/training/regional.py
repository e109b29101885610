"""Regional generator: align every feature map to the input size, mean-filter 4×4 with stride 4, concatenate.

Both steps are linear and separable along height and width, so for each map they collapse into two small
constant matrices: out = M_h · F · M_wᵀ with M = Pool · Resize. This gives the paper's 64×64×c_o map for a 256²
input without ever building the 256²×c_o tensor (906 MB per image for f_{1:12}). The matrices are built by
running torch's own 1-D interpolation on an identity, so index conventions match `naive_regional` exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ALIGN_MODES = ("nearest", "bilinear")


def resize_matrix(n_in: int, n_out: int, align: str) -> torch.Tensor:
    """(n_out × n_in) matrix equal to 1-D nearest / linear(align_corners=True) resizing."""
    eye = torch.eye(n_in, dtype=torch.float64).unsqueeze(1)  # (n_in, 1, n_in): one basis vector per batch item
    if align == "nearest":
        res = F.interpolate(eye, size=n_out, mode="nearest")
    elif align == "bilinear":
        res = F.interpolate(eye, size=n_out, mode="linear", align_corners=True)
    else:
        raise ValueError(f"align must be one of {ALIGN_MODES}, got {align!r}")
    return res[:, 0, :].T.contiguous()


def pool_matrix(n: int, k: int = 4) -> torch.Tensor:
    """(n//k × n) matrix of k-wide, stride-k means (floor like avg_pool2d)."""
    out = torch.zeros(n // k, n, dtype=torch.float64)
    for i in range(n // k):
        out[i, i * k : (i + 1) * k] = 1.0 / k
    return out


def region_matrix(n_in: int, n_full: int, align: str, k: int = 4) -> torch.Tensor:
    return pool_matrix(n_full, k) @ resize_matrix(n_in, n_full, align)


class RegionalGenerator(nn.Module):
    """Maps of shapes `map_sizes` [(h_l, w_l)] -> one (N, Σc_l, H//4, W//4) regional feature map."""

    def __init__(
        self, map_sizes: list[tuple[int, int]], height: int, width: int, align: str = "bilinear", pool: int = 4
    ):
        super().__init__()
        self.align, self.pool = align, pool
        self.height, self.width = height, width
        self.n = len(map_sizes)
        for i, (h, w) in enumerate(map_sizes):
            self.register_buffer(f"mh{i}", region_matrix(h, height, align, pool).float(), persistent=False)
            self.register_buffer(
                f"mwt{i}", region_matrix(w, width, align, pool).T.contiguous().float(), persistent=False
            )

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        out = []
        for i, f in enumerate(maps):
            mh, mwt = getattr(self, f"mh{i}"), getattr(self, f"mwt{i}")
            out.append(torch.matmul(mh, torch.matmul(f, mwt)))
        return torch.cat(out, dim=1)


def naive_regional(
    maps: list[torch.Tensor], height: int, width: int, align: str = "bilinear", pool: int = 4
) -> torch.Tensor:
    """The paper's definition, literally: resize every map to H×W, concatenate, 4×4/4 mean. The reference."""
    if align == "nearest":
        up = [F.interpolate(f, size=(height, width), mode="nearest") for f in maps]
    else:
        up = [F.interpolate(f, size=(height, width), mode="bilinear", align_corners=True) for f in maps]
    return F.avg_pool2d(torch.cat(up, dim=1), kernel_size=pool, stride=pool)
