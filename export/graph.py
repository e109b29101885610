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
- fp16 (optional): everything up to the reconstruction in half precision, the error and the outputs in float32.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from linewatch.training.backbone import CHANNELS
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


class FusedDFR(nn.Module):
    """uint8 N×H×W×3 BGR -> (anomaly_map float32 N×H×W, image_score float32 N), same maths as `DFR.forward`."""

    def __init__(self, model: DFR, fold_input: bool = True, fold_first: bool = True, fp16: bool = False):
        super().__init__()
        model = copy.deepcopy(model).float().eval()
        if model.cae is None:
            raise ValueError("the model has no trained CAE; train it before export")
        cae = model.cae.fold_batchnorm()
        cfg = model.config
        self.height, self.width, self.fp16 = cfg.height, cfg.width, fp16
        grid_h, grid_w = cfg.grid

        # input stage + backbone
        body = list(model.backbone.body.named_children())
        self.fold_input = fold_input and cfg.padding == "reflect"
        if self.fold_input:
            first = fold_input_into_conv(body[0][1], model.channel_order, model.in_scale, model.in_bias)
            body[0] = (body[0][0], first)
        else:
            self.channel_order = list(model.channel_order)
            self.register_buffer("in_scale", model.in_scale.clone())
            self.register_buffer("in_bias", model.in_bias.clone())
        self.body = nn.ModuleList(m for _, m in body)
        self.taps = [i for i, (name, _) in enumerate(body) if int(name) in model.backbone._taps]

        # regional generator, grouped by map size: one (mh, mwt) pair per size, feature scale folded into mh
        sizes = cfg.map_sizes()
        groups: dict[tuple[int, int], list[int]] = {}
        for k, size in enumerate(sizes):
            groups.setdefault(size, []).append(k)
        self.groups = list(groups.values())
        for g, members in enumerate(self.groups):
            k = members[0]
            mh = getattr(model.regional, f"mh{k}") * cfg.feature_scale
            self.register_buffer(f"mh{g}", mh.clone())
            self.register_buffer(f"mwt{g}", getattr(model.regional, f"mwt{k}").clone())

        # first CAE layer: split by input channels; coarse groups (fewer positions than the grid) fold it in
        offsets, start = [], 0
        for n in cfg.layers:
            offsets.append((start, start + CHANNELS[n - 1]))
            start += CHANNELS[n - 1]
        first = cae.linears[0]
        self.coarse = [fold_first and sizes[m[0]][0] * sizes[m[0]][1] < grid_h * grid_w for m in self.groups]
        self.first_parts = nn.ModuleList()
        fine_cols = []
        for g, members in enumerate(self.groups):
            cols = torch.cat([torch.arange(*offsets[k]) for k in members])
            if self.coarse[g]:
                part = nn.Conv2d(len(cols), first.out_features, 1, bias=False)
                part.weight.data = first.weight.detach()[:, cols].clone()[:, :, None, None]
                self.first_parts.append(part)
            else:
                fine_cols.append(cols)
        # layers are sorted and map sizes never grow with depth, so groups are contiguous and in channel order
        if [k for m in self.groups for k in m] != list(range(len(sizes))):
            raise ValueError(f"map sizes {sizes} are not grouped contiguously")
        self.fine = None
        if fine_cols:
            cols = torch.cat(fine_cols)
            self.fine = nn.Conv2d(len(cols), first.out_features, 1, bias=False)
            self.fine.weight.data = first.weight.detach()[:, cols].clone()[:, :, None, None]
        self.register_buffer("first_bias", first.bias.detach().clone().view(1, -1, 1, 1))
        self.rest = nn.ModuleList(linear_as_conv(lin) for lin in cae.linears[1:])
        self.relu_after = [i - 1 for i in cae.RELU_AFTER if i > 0]  # indices into `rest`
        self.last_neg = copy.deepcopy(self.rest[-1])
        self.last_neg.weight.data.neg_()
        self.last_neg.bias.data.neg_()
        self.channel_mean = nn.Conv2d(cae.c_o, 1, 1, bias=False)
        # the channel mean of squares, with the standardised score's 1/std² folded in (free at run time)
        weight = model.score_weights().detach().float()
        self.channel_mean.weight.data = (weight / cae.c_o).view(1, -1, 1, 1).clone()
        if fp16:
            self.half_()

    def half_(self) -> None:
        """fp16 weights and buffers; the error's channel mean stays float32 (squares of fp16 differences)."""
        self.half()
        self.channel_mean.float()

    def backbone(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for i, module in enumerate(self.body):
            x = module(x)
            if i in self.taps:
                maps.append(x)
        return maps

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = torch.float16 if self.fp16 else torch.float32
        x = frames.permute(0, 3, 1, 2).to(dtype)
        if not self.fold_input:
            if self.channel_order != [0, 1, 2]:
                x = x[:, self.channel_order]
            x = x * self.in_scale + self.in_bias
        maps = self.backbone(x)
        regional, folded = [], []
        for g, members in enumerate(self.groups):
            mh, mwt = getattr(self, f"mh{g}"), getattr(self, f"mwt{g}")
            stacked = maps[members[0]] if len(members) == 1 else torch.cat([maps[k] for k in members], dim=1)
            regional.append(torch.matmul(mh, torch.matmul(stacked, mwt)))
            if self.coarse[g]:
                part = self.first_parts[sum(self.coarse[:g])](stacked)
                folded.append(torch.matmul(mh, torch.matmul(part, mwt)))
        feats = torch.cat(regional, dim=1) if len(regional) > 1 else regional[0]
        z = self.first_bias
        if self.fine is not None:
            fine = [r for r, c in zip(regional, self.coarse) if not c]
            z = z + self.fine(torch.cat(fine, dim=1) if len(fine) > 1 else fine[0])
        for part in folded:
            z = z + part
        h = torch.relu(z)
        for i, conv in enumerate(self.rest[:-1]):
            h = conv(h)
            if i in self.relu_after:
                h = torch.relu(h)
        # f - f_hat as one conv with negated weights plus a residual add (fused by ORT), then the channel
        # mean of squares as a 1×1 conv: both stay in ORT's blocked conv layout, unlike ReduceMean
        diff = self.last_neg(h) + feats
        if self.fp16:
            diff = diff.float()
        err = self.channel_mean(diff.pow(2))  # one consumer of diff: the fp16 converter needs that
        return self.upsample(err)

    def upsample(self, err: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amap = F.interpolate(err, size=(self.height, self.width), mode="bilinear", align_corners=False)
        amap = amap.reshape(-1, self.height, self.width)  # squeeze(1) would trace to a shape test + If
        return amap, amap.flatten(1).amax(dim=1)
