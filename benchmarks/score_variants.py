"""Channel weightings of the anomaly score, compared eval-only on one trained bundle (no retraining: the CAE and its
reconstruction are shared, only the per-channel weights of the squared error change; any of them would fold into the
fused graph's channel-mean layer like the shipped ones do).

- standardised:          the shipped default, each channel's squared error over its training variance;
- layer-balanced:        the same, rescaled so every VGG layer carries an equal share (channel-equal weighting lets
                         the 512-channel conv4 layers hold 59 % of f_{1:12}'s score);
- plain:                 the paper's plain mean;
- plain layer-balanced:  the plain mean with every layer carrying an equal share.

Tune on a second dev set built with another seed, confirm on the first:

  python benchmarks/make_devset.py --out data/valset --seed 1
  python benchmarks/score_variants.py runs/devbench-paper4/grass-paper --data data/valset/grass
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from linewatch import datasets  # noqa: E402
from linewatch.build.backbone import CHANNELS  # noqa: E402
from linewatch.build.model import load_model  # noqa: E402
from linewatch.images import read_image, read_mask, resize_to_model  # noqa: E402


def summary_function():
    spec = importlib.util.spec_from_file_location("feature_ceiling", Path(__file__).with_name("feature_ceiling.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.summary


def variants(model) -> dict[str, torch.Tensor]:
    cfg = model.config
    sizes = [CHANNELS[n - 1] for n in cfg.layers]
    layer_share = cfg.c_o / (len(sizes) * torch.cat([torch.full((s,), float(s)) for s in sizes]))
    standardised = model.error_weight.clone()
    plain = torch.ones_like(standardised)
    return {"standardised": standardised, "layer-balanced": standardised * layer_share, "plain": plain,
            "plain layer-balanced": plain * layer_share}


@torch.inference_mode()
def variant_maps(model, samples: list[datasets.Sample], weights: dict[str, torch.Tensor], batch: int = 8):
    h, w = model.config.height, model.config.width
    maps = {k: np.empty((len(samples), h, w), np.float32) for k in weights}
    masks = np.zeros((len(samples), h, w), bool)
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        frames = torch.from_numpy(np.stack([resize_to_model(read_image(s.path), h, w) for s in chunk]))
        feats = model.extract(frames)
        squared = (feats - model.cae(feats)).pow(2)
        for name, weight in weights.items():
            err = (squared * weight.view(1, -1, 1, 1)).mean(dim=1, keepdim=True)
            maps[name][start:start + len(chunk)] = F.interpolate(err, size=(h, w), mode="bilinear",
                                                                 align_corners=False)[:, 0].numpy()
        for i, s in enumerate(chunk, start):
            if s.mask_path is not None:
                masks[i] = read_mask(s.mask_path, (h, w))
    return maps, masks


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
    maps, masks = variant_maps(model, samples, variants(model))
    summary = summary_function()
    for name, m in maps.items():
        r = summary(m, masks, types)
        o = r["overall"]
        per = " ".join(f"{t} {v['pixel_roc_auc']:.3f}" for t, v in r["per_type"].items())
        print(f"{Path(args.data).name} {name:21s} pixel {o['pixel_roc_auc']:.4f}  PRO {o['pro_auc']:.4f}  "
              f"image {o['image_roc_auc']:.4f}  | {per}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
