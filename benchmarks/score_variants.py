"""Channel weightings of the anomaly score, compared eval-only on one trained bundle (no retraining: the CAE and its
reconstruction are shared, only the per-channel weights of the squared error change; any of them would fold into the
fused graph's channel-mean layer like the shipped ones do).

- standardised:          each channel's squared error over its training variance (the default until issue 15);
- layer-balanced:        the same, rescaled so every VGG layer carries an equal share (channel-equal weighting lets
                         the 512-channel conv4 layers hold 59 % of f_{1:12}'s score); the default since issue 15
                         (`DFRConfig.layer_balanced`; benchmarks/map_variants.py compares it with map changes);
- plain:                 the paper's plain mean;
- plain layer-balanced:  the plain mean with every layer carrying an equal share.

Tune on a second dev set built with another seed, confirm on the first:

  python benchmarks/make_devset.py --out data/valset --seed 1
  python benchmarks/score_variants.py runs/devbench-paper4/grass-paper --data data/valset/grass
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from linewatch.evaluation import datasets
from linewatch.evaluation.evaluate import metrics_by_type, score_samples
from linewatch.training.backbone import CHANNELS
from linewatch.training.model import TorchScorer, load_model

ROOT = Path(__file__).resolve().parent.parent

SHIPPED = "standardised"


def variants(model) -> dict[str, torch.Tensor]:
    cfg = model.config
    sizes = [CHANNELS[n - 1] for n in cfg.layers]
    layer_share = cfg.c_o / (len(sizes) * torch.cat([torch.full((s,), float(s)) for s in sizes]))
    standardised = model.error_weight.clone()
    plain = torch.ones_like(standardised)
    return {
        SHIPPED: standardised,
        "layer-balanced": standardised * layer_share,
        "plain": plain,
        "plain layer-balanced": plain * layer_share,
    }


class VariantScorer(TorchScorer):
    """Scores with the shipped weighting and keeps every variant's maps of the same reconstruction."""

    def __init__(self, model, weights: dict[str, torch.Tensor]):
        super().__init__(model, "cpu")
        self.weights = weights
        self.maps: dict[str, list[np.ndarray]] = {name: [] for name in weights}

    @torch.inference_mode()
    def score(self, frames: np.ndarray):
        h, w = self.input_size
        feats = self.model.extract(torch.from_numpy(frames))
        squared = (feats - self.model.cae(feats)).pow(2)
        for name, weight in self.weights.items():
            err = (squared * weight.view(1, -1, 1, 1)).mean(dim=1, keepdim=True)
            self.maps[name].append(F.interpolate(err, size=(h, w), mode="bilinear", align_corners=False)[:, 0].numpy())
        shipped = self.maps[SHIPPED][-1]
        return shipped, shipped.reshape(len(shipped), -1).max(axis=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle")
    p.add_argument("--data", required=True, help="MVTec-layout category")
    args = p.parse_args(argv)
    model = load_model(args.bundle)
    if model.config.score == "mean_sq_error" and not torch.any(model.error_weight != 1):
        raise SystemExit(f"{args.bundle} stores no training variances (made before the standardised score)")
    samples = datasets.read_test_set(args.data)
    types = np.array([s.defect_type for s in samples])
    scorer = VariantScorer(model, variants(model))
    _, _, masks = score_samples(scorer, samples)
    for name, chunks in scorer.maps.items():
        maps = np.concatenate(chunks)
        r = metrics_by_type(maps, maps.reshape(len(maps), -1).max(axis=1), masks, types, args.data)
        o = r["overall"]
        per = " ".join(f"{t} {v['pixel_roc_auc']:.3f}" for t, v in r["per_type"].items())
        print(
            f"{Path(args.data).name} {name:21s} pixel {o['pixel_roc_auc']:.4f}  PRO {o['pro_auc']:.4f}  "
            f"image {o['image_roc_auc']:.4f}  | {per}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
