"""The speed/memory reference: DFR computed the naive way of the paper's code, in torch.

Every VGG map is resized to the full input size, all are concatenated (c_o × H × W: 906 MB per image for
f_{1:12} at 256²), mean-pooled 4×4/4, and the CAE runs as 1×1 convolutions. Same maths as the fused graph,
so `linewatch bench` reports how much faster and leaner the graph is than this, measured in the same run.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from linewatch.export.graph import linear_as_conv
from linewatch.training.model import DFR
from linewatch.training.regional import naive_regional


class NaiveDFR(nn.Module):
    def __init__(self, model: DFR):
        super().__init__()
        self.model = copy.deepcopy(model).float().eval()
        cae = self.model.cae
        self.convs = nn.ModuleList(linear_as_conv(lin) for lin in cae.linears)
        self.norms = nn.ModuleList(copy.deepcopy(n) for n in cae.norms)  # BatchNorm1d on (N, C, L) in eval
        self.relu_after = cae.RELU_AFTER

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.model.config
        maps = self.model.backbone(self.model.normalise(frames))
        feats = naive_regional(maps, cfg.height, cfg.width, cfg.align, cfg.pool) * cfg.feature_scale
        h = feats
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            h = conv(h)
            if not isinstance(norm, nn.Identity):
                n, c, gh, gw = h.shape
                h = norm(h.view(n, c, gh * gw)).view(n, c, gh, gw)
            if i in self.relu_after:
                h = torch.relu(h)
        err = ((feats - h).pow(2) * self.model.score_weights().view(1, -1, 1, 1)).mean(dim=1, keepdim=True)
        amap = F.interpolate(err, size=(cfg.height, cfg.width), mode="bilinear", align_corners=False).squeeze(1)
        return amap, amap.flatten(1).amax(dim=1)


class NaiveScorer:
    """Scorer protocol on `NaiveDFR` (numpy uint8 frames in, numpy maps out)."""

    def __init__(self, model: DFR, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.net = NaiveDFR(model)
        self.input_size = (model.config.height, model.config.width)

    @torch.inference_mode()
    def score(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        amap, score = self.net(torch.from_numpy(np.ascontiguousarray(frames)))
        return amap.numpy(), score.numpy()
