"""Regional generator = the paper's naive definition, without the full-resolution tensor; layer selection."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from linewatch.training.backbone import CHANNELS, STRIDES, VGG19Features, parse_layers
from linewatch.training.model import DFRConfig
from linewatch.training.regional import RegionalGenerator, naive_regional

CASES = [  # (height, width, layer spec): non-square, odd multiples, every depth
    (72, 100, "1:4"),
    (64, 96, "9:12"),
    (64, 80, "1:16"),
    (64, 96, "12"),
    (68, 52, "1:12"),
    (40, 44, "5:8"),
    (48, 64, "13:16"),
]


@functools.lru_cache(maxsize=1)
def full_backbone() -> VGG19Features:
    torch.manual_seed(0)
    return VGG19Features(list(range(1, 17)), "reflect")  # random init: equivalence is weight-independent


def backbone_maps(height: int, width: int, layers: list[int]) -> list[torch.Tensor]:
    torch.manual_seed(height * width)
    with torch.no_grad():
        maps = full_backbone()(torch.randn(1, 3, height, width) * 50)
    return [maps[n - 1] for n in layers]


@pytest.mark.integration
@pytest.mark.parametrize("align", ["bilinear", "nearest"])
@pytest.mark.parametrize("height,width,spec", CASES)
def test_separable_generator_equals_naive_definition(height, width, spec, align):
    layers = parse_layers(spec)
    maps = backbone_maps(height, width, layers)
    config = DFRConfig(layers=layers, height=height, width=width, align=align)
    assert [tuple(m.shape[-2:]) for m in maps] == config.map_sizes()
    generator = RegionalGenerator(config.map_sizes(), height, width, align)
    with torch.no_grad():
        got = generator(maps)
        expected = naive_regional(maps, height, width, align)
    assert got.shape == (1, config.c_o, height // 4, width // 4) == expected.shape
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.integration
def test_align_modes_differ():
    layers = parse_layers("9:12")
    maps = backbone_maps(64, 64, layers)
    sizes = [tuple(m.shape[-2:]) for m in maps]
    a = RegionalGenerator(sizes, 64, 64, "bilinear")(maps)
    b = RegionalGenerator(sizes, 64, 64, "nearest")(maps)
    assert (a - b).abs().max() > 1e-3 * b.abs().max()


def largest_allocation(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events())


@pytest.mark.integration
def test_generator_never_allocates_a_full_resolution_map():
    layers = parse_layers("1:8")
    height, width = 64, 96
    maps = backbone_maps(height, width, layers)
    generator = RegionalGenerator([tuple(m.shape[-2:]) for m in maps], height, width, "bilinear")
    c_o = sum(m.shape[1] for m in maps)
    full_resolution = c_o * height * width * 4  # the N×c_o×H×W float tensor the paper's definition builds
    output = c_o * (height // 4) * (width // 4) * 4
    with torch.no_grad():
        naive_peak = largest_allocation(lambda: naive_regional(maps, height, width, "bilinear"))
        separable_peak = largest_allocation(lambda: generator(maps))
    assert naive_peak >= full_resolution  # the measurement does see the full-resolution tensor
    assert separable_peak <= output  # nothing larger than the (16× smaller) result is ever allocated
    for name, buf in generator.named_buffers():  # only small matrices: (H/4 × h_l) and (w_l × W/4)
        assert buf.numel() <= max(height, width) * max(height, width) // 4, name


@pytest.mark.integration
def test_layers_1_12_compute_no_conv5():
    backbone = VGG19Features(parse_layers("1:12"), "reflect")
    convs = [m for m in backbone.body if isinstance(m, torch.nn.Conv2d)]
    pools = [m for m in backbone.body if isinstance(m, torch.nn.MaxPool2d)]
    assert len(convs) == 12 and len(pools) == 3  # conv5_x and the pool before them are absent
    assert [c.out_channels for c in convs] == CHANNELS[:12]
    assert all(c.padding_mode == "reflect" for c in convs)
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == CHANNELS[:12]
    assert [64 // m.shape[-1] for m in maps] == STRIDES[:12]


@pytest.mark.integration
def test_single_deep_layer_and_zero_padding():
    backbone = VGG19Features(parse_layers("9:12"), "zero")
    convs = [m for m in backbone.body if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 12 and all(c.padding_mode == "zeros" for c in convs)
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 32, 48))
    assert len(maps) == 4 and all(m.shape[1:] == (512, 4, 6) for m in maps)


@pytest.mark.unit
@pytest.mark.parametrize(
    "spec,expected", [("1:12", list(range(1, 13))), ("12", [12]), ("9:12", [9, 10, 11, 12]), ("1,3,5", [1, 3, 5])]
)
def test_parse_layers(spec, expected):
    assert parse_layers(spec) == expected


@pytest.mark.unit
@pytest.mark.parametrize("spec", ["0:3", "1:17", "a", "3:1", ""])
def test_parse_layers_rejects_bad_specs(spec):
    with pytest.raises(ValueError, match="layer"):
        parse_layers(spec)
