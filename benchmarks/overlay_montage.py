"""One picture of the dev benchmark: an overlay per category (rows) and defect type (columns), image 001 of each.

linewatch eval MODEL --data data/devset/CAT --overlays runs/overlays/CAT      # for each category
python benchmarks/overlay_montage.py runs/overlays --out docs/devbench_overlays.jpg
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

TILE = 200


def tile(path: Path, label: str) -> np.ndarray:
    image = cv2.imread(str(path))
    if image is None:
        raise SystemExit(f"cannot read overlay {path}")
    image = cv2.resize(image, (TILE, TILE), interpolation=cv2.INTER_AREA)
    for colour, width in (((0, 0, 0), 3), ((255, 255, 255), 1)):
        cv2.putText(image, label, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, width, cv2.LINE_AA)
    return image


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overlays", help="folder with one `linewatch eval --overlays` folder per category")
    p.add_argument("--out", required=True)
    p.add_argument("--image", default="001.png", help="which test image of each type")
    args = p.parse_args(argv)
    root = Path(args.overlays)
    categories = sorted(d for d in root.iterdir() if d.is_dir())
    if not categories:
        raise SystemExit(f"no category folders in {root}")
    rows = []
    for cat in categories:
        types = ["good"] + sorted(d.name for d in cat.iterdir() if d.is_dir() and d.name != "good")
        rows.append(np.hstack([tile(cat / t / args.image, f"{cat.name} {t}") for t in types]))
    if len({r.shape[1] for r in rows}) != 1:
        raise SystemExit("categories have different numbers of defect types")
    if not cv2.imwrite(args.out, np.vstack(rows), [cv2.IMWRITE_JPEG_QUALITY, 85]):
        raise SystemExit(f"cannot write {args.out}")
    print(f"wrote {args.out}: {len(rows)} categories x {rows[0].shape[1] // TILE} columns")
    return 0


if __name__ == "__main__":
    sys.exit(main())
