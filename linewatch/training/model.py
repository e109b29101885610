"""DFR, top to bottom: uint8 BGR frames -> normalisation -> VGG19 maps -> regional features -> CAE -> error map.

The same module is trained (through `extract` + `cae`), evaluated (`TorchScorer`) and exported to ONNX
(`forward`), so the three can never disagree about preprocessing or scoring.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from linewatch import bundle
from linewatch.errors import BundleError
from linewatch.training.backbone import (
    CHANNELS,
    STRIDES,
    VGG19Features,
    layer_spec,
)
from linewatch.training.cae import CAE
from linewatch.training.regional import RegionalGenerator
from linewatch.training.weights import RANDOM, WeightsSource, resolve

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCHVISION_MEAN_RGB = (0.485, 0.456, 0.406)
TORCHVISION_STD_RGB = (0.229, 0.224, 0.225)


SCORES = ("mean_sq_error", "standardised_sq_error")
# Every tapped VGG layer an equal share of the score: each channel's weight × c_o / (n_layers · c_layer), i.e. the
# mean over layers of each layer's channel mean. Channel-equal weighting gives the 512-channel conv4 layers 59 % of
# f_{1:12}'s score; the early layers, where thin defects (cracks, scratches, pits) and stain edges show, then count:
# mean PRO-AUC +0.03 on the validation and the dev set (docs/BENCHMARKS.md "Maps that cover more of the
# defect"). Applies to the standardised score (the paper's plain mean stays the paper's). New checkpoints record
# True; checkpoints without the key were made before it and keep False; `linewatch export --no-layer-balance`
# gives a graph the channel-equal score back.
LAYER_BALANCED = True


@dataclass
class DFRConfig:
    layers: list[int] = field(default_factory=lambda: list(range(1, 13)))
    height: int = 256
    width: int = 256
    padding: str = "reflect"
    align: str = "bilinear"
    pool: int = 4
    c_d: int = 0  # 0 = not chosen yet (PCA at training)
    batchnorm: bool = False
    # One global factor that brings regional features to unit mean square (set at training). A scalar keeps
    # the paper's relative channel weighting while making the CAE's targets well-conditioned: Caffe-convention
    # VGG features are ~50× larger than torchvision-convention ones.
    feature_scale: float = 1.0
    # How the per-region error is averaged over channels: the paper's plain mean of squares, or each channel's
    # squared error divided by that channel's variance over the good training vectors (error_weight = 1/std²).
    # Plain, the high-energy texture channels drown everything else: a smooth foreign patch on grass scored
    # *below* grass itself (pixel ROC-AUC 0.39); standardised lifted every dev-benchmark category
    # (docs/BENCHMARKS.md). The default here is what checkpoints without the key were made with; training's
    # default is in linewatch/build/presets.py.
    score: str = "mean_sq_error"
    layer_balanced: bool = LAYER_BALANCED

    @property
    def c_o(self) -> int:
        return sum(CHANNELS[n - 1] for n in self.layers)

    @property
    def grid(self) -> tuple[int, int]:
        return self.height // self.pool, self.width // self.pool

    def map_sizes(self) -> list[tuple[int, int]]:
        """Spatial size of each chosen ReLU map (VGG convs keep size; each 2×2 pool floors)."""
        sizes = []
        for n in self.layers:
            h, w = self.height, self.width
            for _ in range(int(np.log2(STRIDES[n - 1]))):
                h, w = h // 2, w // 2
            sizes.append((h, w))
        return sizes

    def as_metadata(self) -> dict:
        d = asdict(self)
        d["layer_spec"] = layer_spec(self.layers)
        d["c_o"] = self.c_o
        return d


def layer_shares(layers: list[int]) -> torch.Tensor:
    """Per channel of the regional vector, c_o / (n_layers · c_layer): weights under which the channel mean of the
    error is the mean over layers of each layer's channel mean."""
    sizes = [CHANNELS[n - 1] for n in layers]
    return torch.cat([torch.full((s,), sum(sizes) / (len(sizes) * s)) for s in sizes])


def input_affine(convention: str) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(channel order, scale, bias) so that normalised = frame[:, order] * scale + bias, from BGR 0-255 frames."""
    if convention == "caffe":
        return [0, 1, 2], torch.ones(3), -torch.tensor(CAFFE_MEAN_BGR)
    if convention == "torchvision":
        std, mean = torch.tensor(TORCHVISION_STD_RGB), torch.tensor(TORCHVISION_MEAN_RGB)
        return [2, 1, 0], 1.0 / (255.0 * std), -mean / std
    raise ValueError(f"unknown weights convention {convention!r}")


class DFR(nn.Module):
    def __init__(self, config: DFRConfig, weights: WeightsSource = RANDOM):
        super().__init__()
        self.config, self.weights = config, weights
        for n, (h, w) in zip(config.layers, config.map_sizes()):
            if h < 1 or w < 1:
                raise ValueError(f"input {config.height}×{config.width} is too small for layer {n}")
        if config.height < config.pool or config.width < config.pool:
            raise ValueError(f"input must be at least {config.pool} pixels on each side")
        order, scale, bias = input_affine(weights.convention)
        self.channel_order = order
        self.register_buffer("in_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_bias", bias.view(1, 3, 1, 1), persistent=False)
        self.backbone = VGG19Features(config.layers, config.padding, weights)
        self.regional = RegionalGenerator(config.map_sizes(), config.height, config.width, config.align, config.pool)
        self.cae = CAE(config.c_o, config.c_d, config.batchnorm) if config.c_d else None
        if config.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {config.score!r}")
        self.register_buffer("error_weight", torch.ones(config.c_o), persistent=False)  # set by training
        self.register_buffer("layer_share", layer_shares(config.layers), persistent=False)

    def normalise(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 N×H×W×3 BGR -> float N×3×H×W in the weights' convention."""
        x = frames.permute(0, 3, 1, 2).float()
        if self.channel_order != [0, 1, 2]:
            x = x[:, self.channel_order]
        return x * self.in_scale + self.in_bias

    def extract(self, frames: torch.Tensor) -> torch.Tensor:
        """Regional features (N, c_o, H//4, W//4): the CAE's input and target."""
        feats = self.regional(self.backbone(self.normalise(frames)))
        return feats * self.config.feature_scale if self.config.feature_scale != 1.0 else feats

    def score_weights(self) -> torch.Tensor:
        """Per-channel weights of the squared error in the score: ones for the paper's plain mean."""
        if self.config.score == "mean_sq_error":
            return torch.ones_like(self.error_weight)  # the paper's plain mean, never rebalanced
        return self.error_weight * self.layer_share if self.config.layer_balanced else self.error_weight

    def region_error(self, feats: torch.Tensor) -> torch.Tensor:
        return ((feats - self.cae(feats)).pow(2) * self.score_weights().view(1, -1, 1, 1)).mean(dim=1)

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 N×H×W×3 BGR -> (anomaly_map N×H×W, image_score N)."""
        return self.maps_from_features(self.extract(frames))

    def maps_from_features(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Regional features (from `extract`) -> (anomaly_map N×H×W, image_score N)."""
        if self.cae is None:
            raise RuntimeError("the CAE is not built yet (c_d unknown): train the model first")
        err = self.region_error(feats)
        amap = F.interpolate(
            err.unsqueeze(1), size=(self.config.height, self.config.width), mode="bilinear", align_corners=False
        ).squeeze(1)
        return amap, amap.flatten(1).amax(dim=1)


# ---- checkpoint in the bundle ------------------------------------------------------------------------------


def save_checkpoint(model: DFR, bundle_dir: str | Path, extra: dict | None = None) -> Path:
    """model.pt holds settings, the backbone layers used and the CAE: self-contained for export anywhere."""
    path = Path(bundle_dir) / bundle.CHECKPOINT
    payload = {
        "config": asdict(model.config),
        "weights": model.weights.as_metadata(),
        "backbone": model.backbone.state_dict(),
        "cae": model.cae.state_dict() if model.cae is not None else None,
        "error_weight": model.error_weight.detach().cpu().clone(),
        "extra": extra or {},
    }
    tmp = path.with_suffix(".pt.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_model(bundle_dir: str | Path, device: str | torch.device = "cpu", follow_graph: bool = True) -> DFR:
    """The bundle's trained DFR; with `follow_graph`, scoring as its exported graph does (`layer_balanced`)."""
    path = Path(bundle_dir) / bundle.CHECKPOINT
    if not path.is_file():
        raise BundleError(f"torch checkpoint not found: {path} (train with `linewatch train --out {bundle_dir}`)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        saved = dict(payload["config"])
        config = DFRConfig(**{"layer_balanced": False, **saved})  # older checkpoints: channel-equal
        w = payload["weights"]
        source = WeightsSource(w["source"], w.get("path"), w.get("sha256"), w["convention"])
    except Exception as exc:
        raise BundleError(f"cannot read checkpoint {path}: {exc}") from exc
    model = DFR(
        config, RANDOM if source.kind == "random" else WeightsSource("checkpoint", None, None, source.convention)
    )
    model.weights = source
    model.backbone.load_state_dict(payload["backbone"], strict=True)
    if model.cae is None or payload["cae"] is None:
        raise BundleError(f"checkpoint {path} has no trained CAE")
    model.cae.load_state_dict(payload["cae"], strict=True)
    weight = payload.get("error_weight")  # absent in checkpoints from before the standardised score: all ones
    if weight is not None:
        if tuple(weight.shape) != (config.c_o,):
            raise BundleError(
                f"checkpoint {path}: error_weight has shape {tuple(weight.shape)}, expected ({config.c_o},)"
            )
        model.error_weight.copy_(weight)
    elif config.score != "mean_sq_error":
        raise BundleError(f"checkpoint {path}: score {config.score!r} but no error_weight stored")
    meta_path = Path(bundle_dir) / bundle.METADATA
    graph = bundle.read_metadata(bundle_dir).get("graph") if follow_graph and meta_path.is_file() else None
    if isinstance(graph, dict):  # score as the exported graph does (export may override the checkpoint's setting)
        balanced = graph.get("layer_balanced", False)  # graphs from before the setting: channel-equal
        if not isinstance(balanced, bool):
            raise BundleError(f"{meta_path}: graph.layer_balanced must be true or false, got {balanced!r}")
        model.config.layer_balanced = balanced
    return model.to(device).eval()


def build_model(config: DFRConfig, weights_path: str | None = None, random_init: bool = False) -> DFR:
    return DFR(config, resolve(weights_path, random_init=random_init)).eval()


class TorchScorer:
    """The Scorer contract (docs/DESIGN.md) on the torch model: numpy uint8 frames in, numpy maps out."""

    def __init__(self, model: DFR, device: str | torch.device = "cpu", batch: int = 8):
        self.model, self.device, self.batch = model.to(device).eval(), torch.device(device), batch

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path, device: str | None = None) -> "TorchScorer":
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(load_model(bundle_dir, device), device)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.model.config.height, self.model.config.width

    @torch.inference_mode()
    def score(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        frames = np.asarray(frames)
        h, w = self.input_size
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (h, w, 3):
            raise ValueError(f"expected uint8 frames N×{h}×{w}×3, got {frames.dtype} {frames.shape}")
        maps, scores = [], []
        for i in range(0, len(frames), self.batch):
            m, s = self.model(torch.from_numpy(frames[i : i + self.batch]).to(self.device))
            maps.append(m.float().cpu().numpy())
            scores.append(s.float().cpu().numpy())
        return np.concatenate(maps), np.concatenate(scores)
