"""Calibration on a stream with defective parts in it: escape and false-reject rates afterwards (issue 13, item 2).

The demo's synthetic parts (linewatch/demo/parts.py, CC0 brick photo, 128² `fast` bundle): calibration streams from
the photo's calibration band with 0 %, 10 % and 30 % defective parts mixed in, held-out parts from its line band
(good and defective, never seen by training or calibration). For each stream it runs the real `linewatch calibrate`:

- `first`: a first calibration on the stream (no earlier calibration: only the outlier test within the batch);
- `recal`: a recalibration on the stream of a bundle calibrated on a clean stream (outlier test against the earlier
  calibration's good scores too, and the 1.5x threshold-jump guard);
- `naive`: the same thresholds computed without excluding anything (what calibrate did before), for comparison.

Then the escape rate (defective held-out parts judged OK) and the false-reject rate (good held-out parts judged NOK)
of the calibration in force, by the daemon's verdict rule. Usage (a few minutes on 2 cores; `--model` reuses an
exported fast bundle, e.g. the demo's linewatch-demo/model, else one is trained):

    python benchmarks/calibration_contamination.py --out /tmp/lw-contam [--model linewatch-demo/model]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from linewatch import bundle
from linewatch.calibrate.command import set_thresholds
from linewatch.calibrate.store import load_calibration
from linewatch.cli import main as linewatch
from linewatch.demo.parts import Part, make_parts
from linewatch.line.engine import Engine
from linewatch.line.verdict import judge
from linewatch.protocol.wire import Verdict

SIZE = 128


def write_parts(folder: Path, parts: list[Part]) -> Path:
    if folder.exists():
        shutil.rmtree(folder)  # a stream is exactly these parts, whatever an earlier run left
    folder.mkdir(parents=True)
    for i, p in enumerate(parts):
        cv2.imwrite(str(folder / f"{i:03d}_{p.kind}.png"), p.image)
    return folder


def train_model(out: Path) -> Path:
    data = write_parts(out / "train", make_parts(60, "train", SIZE, 0.0, 1))
    model = out / "model"
    cmd = [sys.executable, "-m", "linewatch.cli"]
    subprocess.run(
        [*cmd, "train", "--data", str(data), "--out", str(model), "--preset", "fast", "--epochs", "6"], check=True
    )
    subprocess.run([*cmd, "export", str(model)], check=True)
    return model


def fresh_bundle(model: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(model, dst, ignore=shutil.ignore_patterns("calibration*", "*.pt"))
    return dst


def rates(engine: Engine, cal, parts: list[Part]) -> dict:
    maps, scores = engine.score(np.stack([p.image for p in parts]))
    nok = np.array([judge(m, s, cal).verdict == Verdict.NOK for m, s in zip(maps, scores)])
    bad = np.array([p.defective for p in parts])
    return {
        "escape_rate": float(1.0 - nok[bad].mean()),
        "escapes": int((~nok[bad]).sum()),
        "false_reject_rate": float(nok[~bad].mean()),
        "false_rejects": int(nok[~bad].sum()),
        "defective": int(bad.sum()),
        "good": int((~bad).sum()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/lw-contam", help="working folder")
    ap.add_argument("--model", help="an exported fast bundle (default: train one into --out)")
    ap.add_argument("--n-cal", type=int, default=120, help="parts in each calibration stream")
    ap.add_argument("--n-held", type=int, default=120, help="held-out line parts (half defective)")
    ap.add_argument("--reject-rate", type=float, default=0.02, help="calibrate --reject-rate")
    ap.add_argument("--contamination", default="0,0.1,0.3", help="shares of defective parts in the stream")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else train_model(out)
    engine = Engine(model, providers="cpu")
    held = make_parts(args.n_held, "line", SIZE, 0.5, 99)
    base = ["--reject-rate", str(args.reject_rate), "--daemon-user", "root"]

    clean = write_parts(out / "stream_clean", make_parts(args.n_cal, "calibrate", SIZE, 0.0, 7))
    reference = fresh_bundle(model, out / "bundle_reference")
    assert linewatch(["calibrate", str(reference), "--good", str(clean), *base]) == 0
    ref_cal = load_calibration(reference)
    rows = [{"stream": "clean reference", **rates(engine, ref_cal, held), "pixel_threshold": ref_cal.pixel_threshold}]

    for share in [float(v) for v in args.contamination.split(",")]:
        stream = make_parts(args.n_cal, "calibrate", SIZE, share, 11)
        folder = write_parts(out / f"stream_{share:g}", stream)
        n_bad = sum(p.defective for p in stream)
        # naive: every image counts (calibrate before this change)
        maps, scores = engine.score(np.stack([p.image for p in stream]))
        th = set_thresholds(
            maps, scores, None, None, 0.3, reject_rate=args.reject_rate, min_area=ref_cal.min_defect_area
        )
        naive = ref_cal.model_copy(update={"pixel_threshold": th.pixel})
        rows.append(
            {"stream": f"{share:.0%} defective, naive", **rates(engine, naive, held), "pixel_threshold": th.pixel}
        )
        # first calibration on the stream
        first = fresh_bundle(model, out / f"bundle_first_{share:g}")
        result = out / f"first_{share:g}.json"
        assert linewatch(["calibrate", str(first), "--good", str(folder), *base, "--json", str(result)]) == 0
        excluded = json.loads(result.read_text())["excluded"]
        cal = load_calibration(first)
        caught = sum("_good" not in e["image"] for e in excluded)
        rows.append(
            {
                "stream": f"{share:.0%} defective, first calibration",
                **rates(engine, cal, held),
                "pixel_threshold": cal.pixel_threshold,
                "excluded": f"{caught} of {n_bad} defective, {len(excluded) - caught} good",
            }
        )
        # recalibration of the bundle calibrated on the clean stream
        recal = fresh_bundle(model, out / f"bundle_recal_{share:g}")
        shutil.copy(reference / bundle.CALIBRATION, recal / bundle.CALIBRATION)
        result = out / f"recal_{share:g}.json"
        code = linewatch(
            ["calibrate", str(recal), "--good", str(folder), "--daemon-user", "root", "--json", str(result)]
        )
        cal = load_calibration(recal)
        row = {"stream": f"{share:.0%} defective, recalibration", **rates(engine, cal, held)}
        row["pixel_threshold"] = cal.pixel_threshold
        if code == 0:
            excluded = json.loads(result.read_text())["excluded"]
            caught = sum("_good" not in e["image"] for e in excluded)
            row["excluded"] = f"{caught} of {n_bad} defective, {len(excluded) - caught} good"
        else:
            row["excluded"] = f"refused (exit {code}): the clean calibration stays"
        rows.append(row)

    print("\n| calibration | pixel threshold | escapes | escape rate | false rejects | false-reject rate | excluded |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['stream']} | {r['pixel_threshold']:.4g} | {r['escapes']}/{r['defective']} | "
            f"{r['escape_rate']:.3f} | {r['false_rejects']}/{r['good']} | {r['false_reject_rate']:.3f} | "
            f"{r.get('excluded', '')} |"
        )
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
