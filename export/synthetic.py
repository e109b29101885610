"""Untrained bundles for speed benchmarks and export tests: real VGG19 (or random) backbone, random CAE.

Speed and memory do not depend on trained CAE weights, so `linewatch bench` and benchmarks/gpu_bench.sh can
measure paper settings without a training run. The metadata says plainly that the model is untrained.
"""

from __future__ import annotations

import datetime as _dt
import platform
from pathlib import Path

import numpy as np
import torch

from linewatch import __version__, bundle
from linewatch.training.backbone import parse_layers
from linewatch.training.model import DFRConfig, build_model, save_checkpoint


def make_untrained_bundle(
    out: str | Path,
    layers: str = "1:12",
    size: int = 256,
    c_d: int = 200,
    weights: str | None = None,
    random_init: bool = False,
    batchnorm: bool = False,
    padding: str = "reflect",
    seed: int = 0,
) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = DFRConfig(
        layers=parse_layers(layers), height=size, width=size, c_d=c_d, batchnorm=batchnorm, padding=padding
    )
    model = build_model(config, weights, random_init=random_init)
    # unit mean-square regional features on a noise frame, as training would set it
    frames = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (1, size, size, 3), dtype=np.uint8))
    with torch.no_grad():
        feats = model.extract(frames)
    model.config.feature_scale = float(1.0 / feats.pow(2).mean().sqrt().clamp_min(1e-12))
    if batchnorm:  # non-trivial running statistics, so folding them is really exercised
        with torch.no_grad():
            for norm in model.cae.norms:
                if isinstance(norm, torch.nn.BatchNorm1d):
                    norm.running_mean.uniform_(-0.5, 0.5)
                    norm.running_var.uniform_(0.5, 2.0)
                    norm.weight.uniform_(0.5, 1.5)
                    norm.bias.uniform_(-0.2, 0.2)
    model.eval()
    ckpt = save_checkpoint(model, out, extra={"untrained": True})
    bundle.write_metadata(
        out,
        {
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "input": {"height": size, "width": size, "layout": "NHWC", "dtype": "uint8", "color": "BGR"},
            "dfr": model.config.as_metadata(),
            "weights": model.weights.as_metadata(),
            "training": {
                "preset": "untrained",
                "note": "random CAE: for speed benchmarks and export tests only",
                "seed": seed,
                "checkpoint_sha256": bundle.sha256_file(ckpt),
            },
            "versions": {
                "linewatch": __version__,
                "python": platform.python_version(),
                "torch": torch.__version__,
                "numpy": np.__version__,
            },
        },
    )
    return out
