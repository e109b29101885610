"""How separable are a category's defects in the features DFR reads? Reference scorers on the very same regional
features as a trained bundle, evaluated with the same exact metrics as `linewatch eval`:

- knn:   PatchCore-style, unsupervised: the distance of each test region to its nearest good training region
         (memory bank of --bank random training regions; 0 = all).
- probe: supervised, a reference no good-only method is promised to reach: a logistic regression on the regional
         vectors, trained on the labelled regions of half the test images of each type (good and defective) and
         scored on the other half, then the halves swapped (2-fold cross-fitting by image, so no image is scored by
         a probe that saw it). Region label = at least half of its 4×4 pixels are defect; regions with less are
         left out of training only.
- mlp:   the same with a one-hidden-layer network, so the reference is not only a linear one.

If even the supervised probes stay far below a target, the defects are barely in these features and no amount of
CAE training will find them. Build-side script (torch, scikit-learn).

  python benchmarks/feature_ceiling.py runs/devbench-paper4/grass-paper --data data/devset/grass --bank 16384
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from linewatch.evaluation import datasets
from linewatch.evaluation.evaluate import metrics_by_type, score_samples
from linewatch.images import list_images
from linewatch.training.features import load_frames
from linewatch.training.model import TorchScorer, load_model

ROOT = Path(__file__).resolve().parent.parent

QUERY_CHUNK = 2048
PROBE_MAX_NEGATIVES = 60_000  # per fold: all defect regions are kept, good ones subsampled


class FeatureTap(TorchScorer):
    """DFR's own maps, keeping the regional vectors each batch was scored on (N, positions, c_o)."""

    def __init__(self, model):
        super().__init__(model, "cpu")
        self.features: list[np.ndarray] = []

    @torch.inference_mode()
    def score(self, frames: np.ndarray):
        feats = self.model.extract(torch.from_numpy(frames))
        n, c = feats.shape[:2]
        self.features.append(feats.reshape(n, c, -1).transpose(1, 2).numpy().copy())
        amap, score = self.model.maps_from_features(feats)
        return amap.numpy(), score.numpy()


def upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """N×gh×gw region scores -> N×H×W maps, bilinear like the model's own map."""
    t = torch.from_numpy(np.ascontiguousarray(grid, np.float32)).unsqueeze(1)
    return F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False).squeeze(1).numpy()


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of each query row to its nearest bank row."""
    bank_sq = (bank * bank).sum(1)
    out = []
    for start in range(0, len(queries), QUERY_CHUNK):
        q = queries[start : start + QUERY_CHUNK]
        d2 = (q * q).sum(1, keepdim=True) - 2.0 * (q @ bank.T) + bank_sq
        out.append(d2.min(1).values.clamp_min(0).sqrt())
    return torch.cat(out)


def region_fraction(masks: np.ndarray, pool: int) -> np.ndarray:
    """Fraction of defect pixels in each pool×pool region: N×H×W bool -> N×(H/pool)×(W/pool)."""
    n, h, w = masks.shape
    return masks.reshape(n, h // pool, pool, w // pool, pool).mean(axis=(2, 4))


def folds(types: np.ndarray) -> np.ndarray:
    """0/1 per image: alternate within each defect type, so both folds hold every type."""
    fold = np.zeros(len(types), int)
    for name in np.unique(types):
        idx = np.flatnonzero(types == name)
        fold[idx] = np.arange(len(idx)) % 2
    return fold


def linear_probe(strength: float):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=strength, class_weight="balanced", max_iter=300)


def mlp_probe(seed: int):
    """One hidden layer of 256 ReLUs: a nonlinear readout, so the ceiling is not just a linear one."""
    from sklearn.neural_network import MLPClassifier

    return MLPClassifier(
        hidden_layer_sizes=(256,),
        alpha=1e-3,
        batch_size=512,
        learning_rate_init=1e-3,
        max_iter=40,
        early_stopping=True,
        n_iter_no_change=5,
        random_state=seed,
    )


def probe_logit(probe, x: np.ndarray) -> np.ndarray:
    """The probe's pre-sigmoid output: probabilities saturate to exactly 0/1 in float and would tie."""
    if hasattr(probe, "decision_function"):
        return probe.decision_function(x)
    hidden = np.maximum(x @ probe.coefs_[0] + probe.intercepts_[0], 0.0)  # MLPClassifier: one ReLU layer
    return (hidden @ probe.coefs_[1] + probe.intercepts_[1])[:, 0]


def probe_grid(
    features: np.ndarray, fraction: np.ndarray, fold: np.ndarray, seed: int, make_probe, balance: bool
) -> np.ndarray:
    """Cross-fitted probe scores (logit or decision function) per region, N×positions. `balance` draws as many good
    regions as defect ones, for probes without class weights."""
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    n, p, c = features.shape
    frac = fraction.reshape(n, p)
    out = np.empty((n, p), np.float32)
    for k in (0, 1):
        train = fold == k
        x = features[train].reshape(-1, c)
        f = frac[train].reshape(-1)
        pos, neg = np.flatnonzero(f >= 0.5), np.flatnonzero(f == 0)
        keep = min(len(neg), len(pos) if balance else PROBE_MAX_NEGATIVES)
        neg = rng.choice(neg, keep, replace=False)
        rows = np.concatenate([pos, neg])
        y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
        scaler = StandardScaler().fit(x[rows])
        probe = make_probe().fit(scaler.transform(x[rows]), y)
        test = features[~train].reshape(-1, c)
        score = probe_logit(probe, scaler.transform(test))
        out[~train] = score.reshape(-1, p)
    return out


def summary(maps: np.ndarray, masks: np.ndarray, types: np.ndarray, data_dir: str) -> dict:
    """`linewatch eval`'s metric sets for maps, image score = map maximum as DFR's."""
    return metrics_by_type(maps, maps.reshape(len(maps), -1).max(axis=1), masks, types, data_dir)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="trained bundle (its backbone, layers and size give the features)")
    p.add_argument("--data", required=True, help="MVTec-layout category the bundle was trained on")
    p.add_argument("--bank", type=int, default=16384, help="kNN memory bank size (random training regions; 0 = all)")
    p.add_argument(
        "--probe-c",
        default="0.0001,0.001,0.01",
        help="inverse L2 strengths of the probe, comma-separated; each is reported (the best is the "
        "ceiling: chosen on the test images, so it flatters the probe, never DFR)",
    )
    p.add_argument("--methods", default="knn,probe,mlp", help="comma-separated: knn, probe (linear), mlp")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the three result sets here")
    return p.parse_args(argv)


def parse_methods(text: str) -> set[str]:
    methods = {m.strip() for m in text.split(",") if m.strip()}
    unknown = methods - {"knn", "probe", "mlp"}
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}: choose from knn, probe, mlp")
    return methods


def good_region_bank(model, data_dir: str, size: int) -> torch.Tensor:
    """Regional vectors of the good training images; `size` random ones of them (0 = all)."""
    h, w = model.config.height, model.config.width
    train_paths = list_images(datasets.good_image_folder(data_dir))
    bank = []
    for start in range(0, len(train_paths), 8):
        f = model.extract(torch.from_numpy(load_frames(train_paths[start : start + 8], h, w)))
        bank.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]))
    bank = torch.cat(bank)
    if 0 < size < len(bank):
        bank = bank[torch.randperm(len(bank))[:size]]
    return bank


def knn_maps(model, features: np.ndarray, data_dir: str, bank_size: int) -> tuple[np.ndarray, int]:
    """(N×H×W maps of each test region's distance to its nearest good training region, the bank's size)."""
    cfg = model.config
    with torch.inference_mode():
        bank = good_region_bank(model, data_dir, bank_size)
        dist = nearest_distance(torch.from_numpy(features.reshape(-1, features.shape[2])), bank)
    return upsample(dist.numpy().reshape(-1, *cfg.grid), cfg.height, cfg.width), len(bank)


def chosen_probes(methods: set[str], args: argparse.Namespace) -> list[tuple]:
    """(label, probe factory, whether to balance the classes) for each probe asked for."""
    probes = []
    if "probe" in methods:
        probes += [
            (f"probe C={c:g}", functools.partial(linear_probe, c), False)
            for c in (float(v) for v in args.probe_c.split(","))
        ]
    if "mlp" in methods:
        probes.append(("mlp probe", functools.partial(mlp_probe, args.seed), True))
    return probes


def print_results(name: str, results: dict) -> None:
    for method, r in results.items():
        o = r["overall"]
        per = " ".join(f"{t} {v['pixel_roc_auc']:.3f}" for t, v in r["per_type"].items())
        print(
            f"{name} {method:11s} pixel {o['pixel_roc_auc']:.4f}  PRO {o['pro_auc']:.4f}  "
            f"image {o['image_roc_auc']:.4f}  | pixel per type: {per}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model = load_model(args.bundle)
    cfg = model.config
    samples = datasets.read_test_set(args.data)
    types = np.array([s.defect_type for s in samples])
    methods = parse_methods(args.methods)
    results = {}

    t0 = time.time()
    tap = FeatureTap(model)
    maps, _, masks = score_samples(tap, samples, batch=8)
    features = np.concatenate(tap.features)  # (N, positions, c_o), sample order
    results["dfr"] = summary(maps, masks, types, args.data)
    print(f"features {features.shape} in {time.time() - t0:.0f} s", file=sys.stderr)

    bank_size = 0
    if "knn" in methods:
        t0 = time.time()
        knn, bank_size = knn_maps(model, features, args.data, args.bank)
        results["knn"] = summary(knn, masks, types, args.data)
        print(f"knn (bank {bank_size}) in {time.time() - t0:.0f} s", file=sys.stderr)

    fraction, fold = region_fraction(masks, cfg.pool), folds(types)
    for label, make_probe, balance in chosen_probes(methods, args):
        t0 = time.time()
        logits = probe_grid(features, fraction, fold, args.seed, make_probe, balance)
        results[label] = summary(
            upsample(logits.reshape(-1, *cfg.grid), cfg.height, cfg.width), masks, types, args.data
        )
        print(f"{label} in {time.time() - t0:.0f} s", file=sys.stderr)

    print_results(Path(args.data).name, results)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"bundle": args.bundle, "data": args.data, "bank": bank_size, **results}, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
