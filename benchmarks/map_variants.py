"""Anomaly-map variants, compared eval-only on one trained bundle (issue 15, item 2): channel weighting, flip
averaging, multi-resolution scoring, smoothing and upsampling of the map. Nothing is retrained; every variant is
a cheap function of the same CAE's regional error grids, and each could be folded into the fused graph.

`collect` runs the model once per view (the frame, its horizontal flip, the frame downscaled 2×
by 2×2 averaging, and its flip) and caches each view's regional error grid, flipped back, under both channel
weightings; `score` turns the cached grids into maps by a candidate recipe and evaluates them with the same exact
metrics as `linewatch eval`. A recipe is `+`-joined tokens (default: the shipped score, bilinear upsampling):

  lb            layer-balanced weighting (every VGG layer an equal share) instead of the standardised one
  h             average the grid with its horizontal flip's (flipped back)
  mr / mrmax    fuse with the 2×-downscaled view's grid (upsampled to the grid) by mean / by max
  mrh           the downscaled view flip-averaged too
  s<σ>          Gaussian smoothing of the grid, σ in grid cells (1 cell = 4 input pixels), reflect padding
  bicubic / nearest   upsampling of the grid to the input size (default bilinear)

  python benchmarks/map_variants.py collect runs/devbench-paper/grass-paper --data data/valset/grass \\
      --out runs/maps/valset-grass.npz
  python benchmarks/map_variants.py score runs/maps/valset-grass.npz --data data/valset/grass \\
      --recipes base,lb,s1,lb+s1 --json runs/maps/valset-grass.json
  python benchmarks/map_variants.py table runs/maps/valset-*.json     # markdown, mean over categories
  python benchmarks/map_variants.py noise runs/maps/valset-grass.npz --data data/valset/grass --b s1
  python benchmarks/map_variants.py areas runs/maps/devset-grass.npz --data data/devset/grass \
      --calib runs/maps/valset-grass.npz --recipes base,s1       # published area / true area per defect type
  python benchmarks/map_variants.py speed PLAIN_BUNDLE SMOOTHED_BUNDLE   # CPU images/s ratio, interleaved
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from linewatch.evaluation import datasets
from linewatch.evaluation.evaluate import metrics_by_type
from linewatch.images import read_image, read_mask, resize_to_model
from linewatch.training.backbone import CHANNELS
from linewatch.training.model import DFR, DFRConfig, load_model

VIEWS = ("id", "h", "half", "half_h")
WEIGHTS = ("std", "lb")


def weightings(model: DFR) -> dict[str, torch.Tensor]:
    cfg = model.config
    sizes = [CHANNELS[n - 1] for n in cfg.layers]
    layer_share = cfg.c_o / (len(sizes) * torch.cat([torch.full((s,), float(s)) for s in sizes]))
    standardised = model.error_weight.clone()  # the checkpoint's 1/std², whatever the bundle's layer setting
    return {"std": standardised, "lb": standardised * layer_share}


def half_model(model: DFR) -> DFR:
    """The same backbone, feature scale and CAE on a half-size input (its own regional matrices)."""
    cfg = DFRConfig(**{**model.config.__dict__, "height": model.config.height // 2, "width": model.config.width // 2})
    half = DFR(cfg, model.weights)
    half.backbone.load_state_dict(model.backbone.state_dict())
    half.cae.load_state_dict(model.cae.state_dict())
    half.error_weight.copy_(model.error_weight)
    return half.eval()


def grids(model: DFR, x: torch.Tensor, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Normalised float input (N, 3, h, w) -> regional error grid per weighting."""
    feats = model.regional(model.backbone(x))
    if model.config.feature_scale != 1.0:
        feats = feats * model.config.feature_scale
    sq = (feats - model.cae(feats)).pow(2)
    return {k: (sq * w.view(1, -1, 1, 1)).mean(dim=1) for k, w in weights.items()}


@torch.inference_mode()
def collect(bundle_dir: str, data: str, out: str, views: tuple[str, ...] = VIEWS, batch: int = 4) -> None:
    model = load_model(bundle_dir)
    half = half_model(model)
    weights = weightings(model)
    h, w = model.config.height, model.config.width
    samples = datasets.read_test_set(data)
    acc: dict[str, list[np.ndarray]] = {f"{v}/{k}": [] for v in views for k in WEIGHTS}
    t0 = time.perf_counter()
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        frames = torch.from_numpy(np.stack([resize_to_model(read_image(s.path), h, w) for s in chunk]))
        x = model.normalise(frames)
        xs = F.avg_pool2d(x, 2)  # the normalisation is per-channel affine, so it commutes with averaging
        for view, net, inp, flip in (
            ("id", model, x, None),
            ("h", model, x, -1),
            ("half", half, xs, None),
            ("half_h", half, xs, -1),
        ):
            if view not in views:
                continue
            g = grids(net, inp.flip(flip) if flip else inp, weights)
            for k, v in g.items():
                acc[f"{view}/{k}"].append((v.flip(flip) if flip else v).numpy())
        print(
            f"\r{start + len(chunk)}/{len(samples)} images, {time.perf_counter() - t0:.0f} s", end="", file=sys.stderr
        )
    print(file=sys.stderr)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        **{k: np.concatenate(v) for k, v in acc.items()},
        types=np.array([s.defect_type for s in samples]),
        size=np.array([h, w]),
    )


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).float()


def smooth(grid: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian on (N, 1, gh, gw) with reflect padding."""
    k = gaussian_kernel(sigma)
    r = len(k) // 2
    g = F.conv2d(F.pad(grid, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(g, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))


def recipe_maps(cache: dict, recipe: str) -> np.ndarray:
    tokens = [t for t in recipe.split("+") if t and t != "base"]
    weight = "lb" if "lb" in tokens else "std"
    view = {v: torch.from_numpy(cache[f"{v}/{weight}"]).unsqueeze(1) for v in VIEWS if f"{v}/{weight}" in cache}
    grid = view["id"]
    if "h" in tokens:
        grid = (grid + view["h"]) / 2
    size = tuple(grid.shape[-2:])
    if {"mr", "mrh", "mrmax"} & set(tokens):
        small = (view["half"] + view["half_h"]) / 2 if "mrh" in tokens else view["half"]
        small = F.interpolate(small, size=size, mode="bilinear", align_corners=False)
        grid = torch.maximum(grid, small) if "mrmax" in tokens else (grid + small) / 2
    for t in tokens:
        if t.startswith("s") and t[1:].replace(".", "").isdigit():
            grid = smooth(grid, float(t[1:]))
    mode = next((t for t in tokens if t in ("bicubic", "nearest")), "bilinear")
    known = {"lb", "h", "mr", "mrh", "mrmax", "bicubic", "nearest"}
    unknown = [t for t in tokens if t not in known and not (t.startswith("s") and t[1:].replace(".", "").isdigit())]
    if unknown:
        raise SystemExit(f"unknown recipe tokens {unknown} in {recipe!r}")
    h, w = (int(v) for v in cache["size"])
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(grid, size=(h, w), mode=mode, **kwargs)[:, 0].numpy()


def read_masks(data: str, size: tuple[int, int]) -> np.ndarray:
    samples = datasets.read_test_set(data)
    masks = np.zeros((len(samples), *size), bool)
    for i, s in enumerate(samples):
        if s.mask_path is not None:
            masks[i] = read_mask(s.mask_path, size)
    return masks


def score(cache_path: str, data: str, recipes: list[str], out: str | None) -> dict:
    cache = dict(np.load(cache_path))
    size = tuple(int(v) for v in cache["size"])
    masks, types = read_masks(data, size), cache["types"]
    results = {}
    for recipe in recipes:
        maps = recipe_maps(cache, recipe)
        r = metrics_by_type(maps, maps.reshape(len(maps), -1).max(axis=1), masks, types, data)
        results[recipe] = r
        o = r["overall"]
        per = " ".join(f"{t} {v['pixel_roc_auc']:.3f}/{v['pro_auc']:.3f}" for t, v in r["per_type"].items())
        print(
            f"{Path(data).name} {recipe:22s} pixel {o['pixel_roc_auc']:.4f}  PRO {o['pro_auc']:.4f}  "
            f"image {o['image_roc_auc']:.4f}  | {per}",
            flush=True,
        )
    if out:
        old = json.loads(Path(out).read_text()) if Path(out).is_file() else {}
        old.update(results)
        Path(out).write_text(json.dumps(old, indent=1) + "\n")
    return results


def noise(cache_path: str, data: str, a: str, b: str, n: int, seed: int = 0) -> dict:
    """Paired bootstrap over test images (good and defective resampled separately, maps subsampled 4× per side
    for speed): the spread of pixel ROC-AUC and PRO-AUC, and of their differences between recipes a and b."""
    from linewatch.evaluation import metrics

    cache = dict(np.load(cache_path))
    size = tuple(int(v) for v in cache["size"])
    masks = read_masks(data, size)[:, ::4, ::4]
    maps = {r: recipe_maps(cache, r)[:, ::4, ::4] for r in (a, b)}
    good = np.flatnonzero(cache["types"] == datasets.GOOD)
    bad = np.flatnonzero(cache["types"] != datasets.GOOD)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in ("pix_a", "pix_b", "pro_a", "pro_b")}
    for _ in range(n):
        idx = np.concatenate([rng.choice(good, len(good)), rng.choice(bad, len(bad))])
        for r, tag in ((a, "a"), (b, "b")):
            draws[f"pix_{tag}"].append(metrics.pixel_roc_auc(maps[r][idx], masks[idx]))
            draws[f"pro_{tag}"].append(metrics.pro_auc(maps[r][idx], masks[idx]))
    d = {k: np.array(v) for k, v in draws.items()}
    out = {
        "pixel_std": float(d["pix_a"].std()),
        "pro_std": float(d["pro_a"].std()),
        "pixel_diff_mean": float((d["pix_b"] - d["pix_a"]).mean()),
        "pixel_diff_std": float((d["pix_b"] - d["pix_a"]).std()),
        "pro_diff_mean": float((d["pro_b"] - d["pro_a"]).mean()),
        "pro_diff_std": float((d["pro_b"] - d["pro_a"]).std()),
        "resamples": n,
    }
    print(Path(data).name, json.dumps(out))
    return out


def areas(cache_path: str, data: str, calib_paths: list[str], recipes: list[str], reject_rate: float) -> dict:
    """Per defect type, the published defect area over the ground-truth area at a calibrated threshold.

    The threshold is what `linewatch calibrate --reject-rate R` sets with its default minimum defect area (one grid
    cell): the lowest at which at most R of the good parts fail the daemon's rule, here on the good test images of
    this cache and of `calib_paths` (the validation set's). The published area is the pixels of the verdict's
    defect regions (`linewatch.line.verdict.defect_mask`); per image area / truth, the median per type."""
    from linewatch.calibrate.thresholds import pixel_threshold_for_reject_rate
    from linewatch.line.verdict import defect_mask

    cache = dict(np.load(cache_path))
    size = tuple(int(v) for v in cache["size"])
    masks, types = read_masks(data, size), cache["types"]
    cell = 16
    out: dict = {}
    for recipe in recipes:
        maps = recipe_maps(cache, recipe)
        good = [maps[types == datasets.GOOD]]
        for c in calib_paths:
            other = dict(np.load(c))
            good.append(recipe_maps(other, recipe)[other["types"] == datasets.GOOD])
        calib = np.concatenate(good)
        t = pixel_threshold_for_reject_rate(calib, reject_rate, cell)
        per: dict = {}
        for name in sorted(set(types.tolist()) - {datasets.GOOD}):
            ratios, covered, found = [], [], 0
            for i in np.flatnonzero(types == name):
                pub = defect_mask(maps[i] > t, cell)
                truth = masks[i]
                ratios.append(pub.sum() / truth.sum())
                covered.append((pub & truth).sum() / truth.sum())
                found += bool((pub & truth).any())
            per[name] = {
                "median_area_ratio": float(np.median(ratios)),
                "median_truth_covered": float(np.median(covered)),
                "found": found,
                "images": len(ratios),
            }
        good_nok = sum(bool(defect_mask(m > t, cell).any()) for m in maps[types == datasets.GOOD])
        out[recipe] = {"threshold": float(t), "calib_images": len(calib), "good_test_nok": good_nok, "per_type": per}
        cells = " ".join(
            f"{k} {v['median_area_ratio']:.2f}/{v['median_truth_covered']:.2f}/{v['found']}" for k, v in per.items()
        )
        n_good = int((types == datasets.GOOD).sum())
        print(f"{Path(data).name} {recipe:16s} t={t:.4g} good NOK {good_nok}/{n_good} | {cells}")
    return out


def speed(plain: str, other: str, rounds: int, iters: int, threads: int) -> dict:
    """Images/s of two exported bundles' fp32 graphs (the same model, exported with and without a map change),
    interleaved round by round in fresh worker processes, as benchmarks/cpu_speed.py does; ratios within rounds."""
    import statistics

    from linewatch.evaluation.bench import measure

    ratios, rows = [], []
    for i in range(rounds):
        got = {}
        for name, path in (("plain", plain), ("other", other)):
            spec = {"bundle": path, "kind": "engine", "provider": "cpu", "batch": 1, "precision": "fp32"}
            got[name] = measure({**spec, "iters": iters, "threads": threads, "max_seconds": 120})["images_per_s"]
        ratios.append(got["other"] / got["plain"])
        rows.append(got)
        print(f"round {i + 1}: plain {got['plain']:.3f} img/s, other {got['other']:.3f} img/s, ratio {ratios[-1]:.3f}")
    out = {"rounds": rows, "median_ratio": statistics.median(ratios), "threads": threads, "iters": iters}
    print(f"median other/plain images/s: {out['median_ratio']:.3f}")
    return out


def table(paths: list[str]) -> str:
    """Markdown: per recipe, pixel ROC-AUC per category, then the mean pixel / PRO / image ROC-AUC."""
    by_cat = {Path(p).stem.split("-", 1)[1]: json.loads(Path(p).read_text()) for p in paths}
    cats = sorted(by_cat)
    recipes = [r for r in next(iter(by_cat.values())) if all(r in v for v in by_cat.values())]
    head = ["recipe", *cats, "mean pixel / PRO / image"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for recipe in recipes:
        o = [by_cat[c][recipe]["overall"] for c in cats]
        mean = [np.mean([x[k] for x in o]) for k in ("pixel_roc_auc", "pro_auc", "image_roc_auc")]
        cells = [f"{x['pixel_roc_auc']:.3f}" for x in o]
        lines.append(f"| {recipe} | " + " | ".join(cells) + " | " + " / ".join(f"{m:.3f}" for m in mean) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("bundle")
    c.add_argument("--data", required=True, help="MVTec-layout category")
    c.add_argument("--out", required=True, help=".npz cache of the error grids")
    c.add_argument("--views", default=",".join(VIEWS), help=f"comma-separated subset of {', '.join(VIEWS)}")
    s = sub.add_parser("score")
    s.add_argument("cache")
    s.add_argument("--data", required=True)
    s.add_argument("--recipes", default="base")
    s.add_argument("--json")
    n = sub.add_parser("noise")
    n.add_argument("cache")
    n.add_argument("--data", required=True)
    n.add_argument("--a", default="base")
    n.add_argument("--b", required=True)
    n.add_argument("--resamples", type=int, default=50)
    a = sub.add_parser("areas")
    a.add_argument("cache")
    a.add_argument("--data", required=True)
    a.add_argument("--calib", nargs="*", default=[], help="more caches whose good images join the calibration")
    a.add_argument("--recipes", default="base")
    a.add_argument("--reject-rate", type=float, default=0.05)
    a.add_argument("--json")
    sp = sub.add_parser("speed")
    sp.add_argument("plain", help="bundle exported with --map-smoothing 0")
    sp.add_argument("other", help="the same bundle exported with the change")
    sp.add_argument("--rounds", type=int, default=5)
    sp.add_argument("--iters", type=int, default=10)
    sp.add_argument("--threads", type=int, default=2)
    sp.add_argument("--json")
    t = sub.add_parser("table")
    t.add_argument("json", nargs="+")
    args = p.parse_args(argv)
    if args.cmd == "collect":
        collect(args.bundle, args.data, args.out, tuple(v for v in args.views.split(",") if v))
    elif args.cmd == "score":
        score(args.cache, args.data, [r.strip() for r in args.recipes.split(",") if r.strip()], args.json)
    elif args.cmd == "areas":
        res = areas(args.cache, args.data, args.calib, args.recipes.split(","), args.reject_rate)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    elif args.cmd == "speed":
        res = speed(args.plain, args.other, args.rounds, args.iters, args.threads)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    elif args.cmd == "noise":
        noise(args.cache, args.data, args.a, args.b, args.resamples)
    else:
        print(table(args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
