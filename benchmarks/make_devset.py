"""Build the dev benchmark: an MVTec-layout dataset from CC0 texture photos shipped with scikit-image.

Each category is one 512×512 grey photo (skimage.data.brick / grass / gravel). Training crops come from the top
rows of the photo and test crops from the bottom rows, so no test pixel was ever seen in training. Defects are
synthesised with pyimgano 0.9.1 (`pyimgano.synthesis`: scratch, crack, pit and stain presets, its CutPaste, and a
DRAEM-style paste of a foreign texture), applied at the output size so the ground-truth masks are exact.
Deterministic for a given --seed; defect types are drawn in DEFECT_TYPES order, so adding a type at the end leaves
every earlier image unchanged.

`draem` follows DRAEM (Zavrtanik et al., ICCV 2021): a Perlin-noise mask (2^k noise scales), a crop of a foreign
texture (grey skimage photos that are not a category: camera, coins, moon, page, text, clock, cell) blended in with
opacity β ∈ [0.1, 1]; the whole mask is the ground truth whatever β is, as in DRAEM.

  pip install --no-deps pyimgano==0.9.1     # MIT; its other runtime deps are already ours
  python benchmarks/make_devset.py --out data/devset
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np

CATEGORIES = ("brick", "grass", "gravel")
DEFECT_TYPES = ("scratch", "crack", "pit", "stain", "cutpaste", "draem")
FOREIGN_SOURCES = ("camera", "coins", "moon", "page", "text", "clock", "cell")  # DRAEM's anomaly source textures
DRAEM_OPACITY = (0.1, 1.0)
DRAEM_THRESHOLD = (0.6, 0.8)  # on pyimgano's [0, 1] fractal Perlin noise: masks of ~5-35 % of the image
TRAIN_ROWS = (0.0, 0.6)  # fraction of the photo's rows for training crops
TEST_ROWS = (0.6, 1.0)
SYNTH_TRIES = 20
MIN_DEFECT_PIXELS = 4


def photo(category: str) -> np.ndarray:
    """The category's 512×512 uint8 grey photo from scikit-image."""
    from skimage import data

    if category not in CATEGORIES:
        raise SystemExit(f"unknown category {category!r}: choose from {', '.join(CATEGORIES)}")
    image = getattr(data, category)()
    if image.ndim != 2 or image.dtype != np.uint8:
        raise SystemExit(f"skimage.data.{category}() is not a uint8 grey image: {image.dtype} {image.shape}")
    return image


def crop_spec(rng: np.random.Generator, shape: tuple[int, int], rows: tuple[float, float], crop: int) -> dict:
    """Random crop position inside a row band of the photo, with random flips."""
    h, w = shape
    lo, hi = int(rows[0] * h), int(rows[1] * h)
    if hi - lo < crop or w < crop:
        raise SystemExit(f"crop {crop} px does not fit the row band {lo}..{hi} of a {h}×{w} photo")
    return {
        "row": int(rng.integers(lo, hi - crop + 1)),
        "col": int(rng.integers(0, w - crop + 1)),
        "crop": crop,
        "flip_h": bool(rng.random() < 0.5),
        "flip_v": bool(rng.random() < 0.5),
    }


def cut(image: np.ndarray, spec: dict, size: int) -> np.ndarray:
    """The crop described by `spec`, flipped and area-resized to size×size, as BGR (grey triplicated)."""
    r, c, k = spec["row"], spec["col"], spec["crop"]
    patch = image[r : r + k, c : c + k]
    if spec["flip_h"]:
        patch = patch[:, ::-1]
    if spec["flip_v"]:
        patch = patch[::-1]
    patch = cv2.resize(np.ascontiguousarray(patch), (size, size), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(patch, cv2.COLOR_GRAY2BGR)


def foreign_bank():
    """pyimgano TextureSourceBank of the DRAEM anomaly sources (grey photos shipped with scikit-image)."""
    from pyimgano.synthesis import TextureSourceBank
    from skimage import data

    return TextureSourceBank([np.asarray(getattr(data, name)(), dtype=np.uint8) for name in FOREIGN_SOURCES])


def draem(image: np.ndarray, rng: np.random.Generator, bank) -> tuple[np.ndarray, np.ndarray]:
    """DRAEM-style anomaly: foreign texture under a thresholded Perlin mask, blended with opacity β."""
    from pyimgano.synthesis import fractal_perlin_noise_2d
    from pyimgano.synthesis.blend import alpha_blend

    h, w = image.shape[:2]
    res = (2 ** int(rng.integers(1, 5)), 2 ** int(rng.integers(1, 5)))
    noise = fractal_perlin_noise_2d((h, w), res, rng=rng, octaves=3)
    mask = np.where(noise >= rng.uniform(*DRAEM_THRESHOLD), 255, 0).astype(np.uint8)
    overlay = bank.sample_overlay((h, w), rng=rng, color_jitter=0.0)
    out = alpha_blend(image, overlay, mask, alpha=float(rng.uniform(*DRAEM_OPACITY)))
    return out, mask


def synthesise(image: np.ndarray, defect: str, rng: np.random.Generator, bank=None) -> tuple[np.ndarray, np.ndarray]:
    """(defective BGR image, uint8 mask 0/255) from pyimgano; retried until the mask is non-trivial."""
    from pyimgano.synthesis import AnomalySynthesizer, SynthSpec
    from pyimgano.synthesis.cutpaste import cutpaste

    synth = None if defect in ("cutpaste", "draem") else AnomalySynthesizer(SynthSpec(preset=defect))
    if defect == "draem" and bank is None:
        bank = foreign_bank()
    for _ in range(SYNTH_TRIES):
        if defect == "draem":
            out, mask = draem(image, rng, bank)
        elif synth is None:
            out, mask = cutpaste(image, rng=rng, variant="3way")
        else:
            result = synth.synthesize(image, rng=rng)
            out, mask = result.image_u8, result.mask_u8
        mask = np.where(mask > 0, 255, 0).astype(np.uint8)
        changed = np.any(out != image, axis=2)
        if np.count_nonzero(changed & (mask > 0)) >= MIN_DEFECT_PIXELS:
            return np.ascontiguousarray(out), mask
    raise SystemExit(f"pyimgano produced no visible {defect} defect in {SYNTH_TRIES} tries")


def save(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise SystemExit(f"cannot write {path}")


def make_category(
    out: Path,
    category: str,
    size: int,
    crop: int,
    n_train: int,
    n_good: int,
    n_defect: int,
    seed: int,
    defects: tuple[str, ...] = DEFECT_TYPES,
) -> dict:
    """Write one category in MVTec layout plus devset.json recording every crop, so it can be checked/rebuilt."""
    source = photo(category)
    # one stream per category, keyed by its name: a category's images do not depend on which others are built
    rng = np.random.default_rng([seed, zlib.crc32(category.encode())])
    root = out / category
    manifest = {
        "category": category,
        "source": f"skimage.data.{category}()",
        "size": size,
        "seed": seed,
        "train_rows": TRAIN_ROWS,
        "test_rows": TEST_ROWS,
        "images": [],
    }

    def add(rel: str, spec: dict, image: np.ndarray, defect: str = "good", mask: np.ndarray | None = None):
        save(root / rel, image)
        entry = {"file": rel, "defect": defect, **spec}
        if mask is not None:
            mask_rel = f"ground_truth/{defect}/{Path(rel).stem}_mask.png"
            save(root / mask_rel, mask)
            entry["mask"] = mask_rel
        manifest["images"].append(entry)

    for i in range(n_train):
        spec = crop_spec(rng, source.shape, TRAIN_ROWS, crop)
        add(f"train/good/{i:03d}.png", spec, cut(source, spec, size))
    for i in range(n_good):
        spec = crop_spec(rng, source.shape, TEST_ROWS, crop)
        add(f"test/good/{i:03d}.png", spec, cut(source, spec, size))
    bank = foreign_bank() if "draem" in defects else None
    for defect in defects:
        for i in range(n_defect):
            spec = crop_spec(rng, source.shape, TEST_ROWS, crop)
            image, mask = synthesise(cut(source, spec, size), defect, rng, bank)
            add(f"test/{defect}/{i:03d}.png", spec, image, defect, mask)
    from pyimgano import __version__ as pyimgano_version

    manifest["pyimgano"] = pyimgano_version
    (root / "devset.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/devset", help="output folder (one MVTec category per sub-folder)")
    p.add_argument("--categories", default=",".join(CATEGORIES), help="comma-separated: brick,grass,gravel")
    p.add_argument("--defects", default=",".join(DEFECT_TYPES), help="comma-separated defect types")
    p.add_argument("--size", type=int, default=256, help="output image size in pixels (square)")
    p.add_argument("--crop", type=int, default=192, help="crop size in photo pixels (same for train and test)")
    p.add_argument("--n-train", type=int, default=80, help="good training images per category")
    p.add_argument("--n-good", type=int, default=15, help="good test images per category")
    p.add_argument("--n-defect", type=int, default=10, help="test images per defect type per category")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    defects = tuple(d.strip() for d in args.defects.split(",") if d.strip())
    unknown = sorted(set(defects) - set(DEFECT_TYPES))
    if unknown:
        raise SystemExit(f"unknown defect type(s) {unknown}: choose from {', '.join(DEFECT_TYPES)}")
    if min(args.n_train, args.n_good, args.n_defect) < 1 or args.size < 16:
        raise SystemExit("--n-train, --n-good and --n-defect must be >= 1 and --size >= 16")
    out = Path(args.out)
    for category in categories:
        m = make_category(
            out, category, args.size, args.crop, args.n_train, args.n_good, args.n_defect, args.seed, defects
        )
        print(
            f"{out / category}: {args.n_train} train, {args.n_good} good test, "
            f"{len(m['images']) - args.n_train - args.n_good} defect test images",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
