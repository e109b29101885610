"""The fused export module: DFR rewritten for speed with the same maths, then traced to one ONNX graph.

Rewrites (each exact up to float rounding, each kept because it measured faster; see docs/BENCHMARKS.md):
- input normalisation (channel order, scale, mean) folded into conv1_1 when padding is `reflect` (reflected
  pixels are real pixels, so the affine map commutes with the padding; with zero padding it would not);
- the regional generator as two small constant matrices per map size (no full-resolution tensor), with the
  global feature scale folded into them;
- the CAE's first layer applied at the native resolution of maps coarser than the regional grid: resizing and
  pooling act on space, a 1×1 layer on channels, so they commute; f_{9:12} at 256² then cost 1024 instead of 4096
  positions, and maps of equal size share one resize;
- BatchNorm folded into the preceding 1×1 layer; the CAE runs as 1×1 convolutions in NCHW (ORT's blocked conv
  layout beat 2-D GEMMs on channel-last rows, 167 vs 250 ms for the last layer);
- f - f_hat as the last layer with negated weights plus a residual add, and the channel mean of squares as a
  1×1 conv with weights 1/c_o: both stay in the blocked layout (ReduceMean + layout reorders cost ~90 ms);
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from linewatch.training.backbone import CHANNELS
from linewatch.training.cae import CAE
from linewatch.training.model import DFR


def fold_input_into_conv(conv: nn.Conv2d, order: list[int], scale: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """conv(normalise(x)) as one conv on raw BGR 0-255 x, where normalise(x)[c] = x[order[c]]·scale[c] + bias[c]."""
    w = conv.weight.detach().double()
    scale, bias = scale.flatten().double(), bias.flatten().double()
    folded = torch.zeros_like(w)
    for c, src in enumerate(order):
        folded[:, src] = w[:, c] * scale[c]
    extra = (w * bias.view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
    out = copy.deepcopy(conv)
    out.weight.data = folded.to(conv.weight.dtype)
    out.bias.data = (conv.bias.detach().double() + extra).to(conv.bias.dtype)
    return out


def linear_as_conv(linear: nn.Linear) -> nn.Conv2d:
    conv = nn.Conv2d(linear.in_features, linear.out_features, 1)
    conv.weight.data = linear.weight.detach().clone().view(linear.out_features, linear.in_features, 1, 1)
    conv.bias.data = linear.bias.detach().clone()
    return conv


def columns_as_conv(linear: nn.Linear, cols: torch.Tensor) -> nn.Conv2d:
    """The part of a Linear that reads input channels `cols`, as a bias-free 1×1 conv."""
    conv = nn.Conv2d(len(cols), linear.out_features, 1, bias=False)
    conv.weight.data = linear.weight.detach()[:, cols].clone()[:, :, None, None]
    return conv


def size_groups(sizes: list[tuple[int, int]]) -> list[list[int]]:
    """Indices of the tapped maps grouped by map size; maps of one size share one resize."""
    groups: dict[tuple[int, int], list[int]] = {}
    for k, size in enumerate(sizes):
        groups.setdefault(size, []).append(k)
    members = list(groups.values())
    # layers are sorted and map sizes never grow with depth, so groups are contiguous and in channel order
    if [k for m in members for k in m] != list(range(len(sizes))):
        raise ValueError(f"map sizes {sizes} are not grouped contiguously")
    return members


def channel_ranges(layers: list[int]) -> list[tuple[int, int]]:
    """Where each tapped layer's channels sit in the concatenated regional vector."""
    ranges, start = [], 0
    for n in layers:
        ranges.append((start, start + CHANNELS[n - 1]))
        start += CHANNELS[n - 1]
    return ranges


class FusedDFR(nn.Module):
    """uint8 N×H×W×3 BGR -> (anomaly_map float32 N×H×W, image_score float32 N), same maths as `DFR.forward`."""

    def __init__(self, model: DFR):
        super().__init__()
        model = copy.deepcopy(model).float().eval()
        if model.cae is None:
            raise ValueError("the model has no trained CAE; train it before export")
        cae = model.cae.fold_batchnorm()
        self.height, self.width = model.config.height, model.config.width
        self.build_input_and_backbone(model)
        self.build_regional(model)
        self.build_first_layer(model, cae.linears[0])
        self.build_rest(model, cae)

    def build_input_and_backbone(self, model: DFR) -> None:
        """VGG19's layers up to the last tap; the input normalisation folded into conv1_1 where that is exact."""
        body = list(model.backbone.body.named_children())
        self.fold_input = model.config.padding == "reflect"
        if self.fold_input:
            first = fold_input_into_conv(body[0][1], model.channel_order, model.in_scale, model.in_bias)
            body[0] = (body[0][0], first)
        else:
            self.channel_order = list(model.channel_order)
            self.register_buffer("in_scale", model.in_scale.clone())
            self.register_buffer("in_bias", model.in_bias.clone())
        self.body = nn.ModuleList(m for _, m in body)
        self.taps = [i for i, (name, _) in enumerate(body) if int(name) in model.backbone._taps]

    def build_regional(self, model: DFR) -> None:
        """One (mh, mwt) matrix pair per map size, the global feature scale folded into mh."""
        self.groups = size_groups(model.config.map_sizes())
        for g, members in enumerate(self.groups):
            k = members[0]
            mh = getattr(model.regional, f"mh{k}") * model.config.feature_scale
            self.register_buffer(f"mh{g}", mh.clone())
            self.register_buffer(f"mwt{g}", getattr(model.regional, f"mwt{k}").clone())

    def build_first_layer(self, model: DFR, first: nn.Linear) -> None:
        """The CAE's first layer split by input channels: groups of maps coarser than the regional grid apply their
        part at native resolution (`first_parts`), the others share one conv on the regional features (`fine`)."""
        cfg = model.config
        sizes, ranges = cfg.map_sizes(), channel_ranges(cfg.layers)
        grid_positions = cfg.grid[0] * cfg.grid[1]
        self.coarse = [sizes[m[0]][0] * sizes[m[0]][1] < grid_positions for m in self.groups]
        group_cols = [torch.cat([torch.arange(*ranges[k]) for k in members]) for members in self.groups]
        self.first_parts = nn.ModuleList(
            columns_as_conv(first, cols) for cols, coarse in zip(group_cols, self.coarse) if coarse
        )
        fine_cols = [cols for cols, coarse in zip(group_cols, self.coarse) if not coarse]
        self.fine = columns_as_conv(first, torch.cat(fine_cols)) if fine_cols else None
        self.register_buffer("first_bias", first.bias.detach().clone().view(1, -1, 1, 1))

    def build_rest(self, model: DFR, cae: CAE) -> None:
        """The other CAE layers as 1×1 convs; the last one negated (f - f_hat as a residual add) and the channel
        mean of squares as a 1×1 conv with the standardised score's 1/std² and layer shares folded in (free at run
        time)."""
        self.rest = nn.ModuleList(linear_as_conv(lin) for lin in cae.linears[1:])
        self.relu_after = [i - 1 for i in cae.RELU_AFTER if i > 0]  # indices into `rest`
        self.last_neg = copy.deepcopy(self.rest[-1])
        self.last_neg.weight.data.neg_()
        self.last_neg.bias.data.neg_()
        self.channel_mean = nn.Conv2d(cae.c_o, 1, 1, bias=False)
        weight = model.score_weights().detach().float()
        self.channel_mean.weight.data = (weight / cae.c_o).view(1, -1, 1, 1).clone()

    def normalise(self, frames: torch.Tensor) -> torch.Tensor:
        """NHWC uint8 -> NCHW float; the channel order, scale and mean only where conv1_1 could not absorb them."""
        x = frames.permute(0, 3, 1, 2).to(torch.float32)
        if not self.fold_input:
            if self.channel_order != [0, 1, 2]:
                x = x[:, self.channel_order]
            x = x * self.in_scale + self.in_bias
        return x

    def backbone(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for i, module in enumerate(self.body):
            x = module(x)
            if i in self.taps:
                maps.append(x)
        return maps

    def regional(self, maps: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per size group: its regional features, and for coarse groups their first-layer part on the grid."""
        regional, folded = [], []
        for g, members in enumerate(self.groups):
            mh, mwt = getattr(self, f"mh{g}"), getattr(self, f"mwt{g}")
            stacked = maps[members[0]] if len(members) == 1 else torch.cat([maps[k] for k in members], dim=1)
            regional.append(torch.matmul(mh, torch.matmul(stacked, mwt)))
            if self.coarse[g]:
                part = self.first_parts[sum(self.coarse[:g])](stacked)
                folded.append(torch.matmul(mh, torch.matmul(part, mwt)))
        return regional, folded

    def first_layer(self, regional: list[torch.Tensor], folded: list[torch.Tensor]) -> torch.Tensor:
        """The CAE's first layer before its ReLU: bias + fine part on the grid + the coarse parts."""
        z = self.first_bias
        if self.fine is not None:
            fine = [r for r, c in zip(regional, self.coarse) if not c]
            z = z + self.fine(torch.cat(fine, dim=1) if len(fine) > 1 else fine[0])
        for part in folded:
            z = z + part
        return z

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        regional, folded = self.regional(self.backbone(self.normalise(frames)))
        feats = torch.cat(regional, dim=1) if len(regional) > 1 else regional[0]
        h = torch.relu(self.first_layer(regional, folded))
        for i, conv in enumerate(self.rest[:-1]):
            h = conv(h)
            if i in self.relu_after:
                h = torch.relu(h)
        # f - f_hat as one conv with negated weights plus a residual add (fused by ORT), then the channel
        # mean of squares as a 1×1 conv: both stay in ORT's blocked conv layout, unlike ReduceMean
        diff = self.last_neg(h) + feats
        err = self.channel_mean(diff.pow(2))  # one consumer of diff: the fp16 converter needs that
        return self.upsample(err)

    def upsample(self, err: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amap = F.interpolate(err, size=(self.height, self.width), mode="bilinear", align_corners=False)
        amap = amap.reshape(-1, self.height, self.width)  # squeeze(1) would trace to a shape test + If
        return amap, amap.flatten(1).amax(dim=1)
