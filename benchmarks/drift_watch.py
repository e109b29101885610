"""Drift watch (issue 16, item 3): parts until a false alarm without drift, parts until alarm after a lighting change.

Held-out data: good parts from the demo photo's calibration band (linewatch/demo/parts.py, a seed the demo never
uses: new crops of the region calibration drew from, so exchangeable with the calibration parts; `--band line`
takes the demo line's region instead), scored by the bundle's ONNX engine as they are and after a simulated change:
brightness x0.8, a slight blur (Gaussian, sigma 1 px) and a warm colour cast (red x1.1, blue x0.9). The watch is
designed exactly as the daemon designs it (linewatch/line/drift.py, the config's defaults) from the bundle's
calibration.json good_image_scores.

Streams of parts are drawn with replacement from each set of scores, so no daemon needs to run: a part falls
outside the good parts' band with the empirical rate p of its set, independently, and the simulation draws the
(geometric) gaps between parts outside, which is the same process as drawing every part, only faster. Each stream
starts with a fresh watch (as after a start or a reload); a stream without an alarm within --max-parts is censored
(counted as that many).

    linewatch demo --out /tmp/p16demo        # a demo bundle (~3 min on 2 cores), or any 128² demo-like bundle
    python benchmarks/drift_watch.py --model /tmp/p16demo/model [--parts 120 --streams 300 --json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

from linewatch.calibrate.store import load_calibration
from linewatch.demo.parts import make_parts
from linewatch.line import drift
from linewatch.line.config import DriftConfig
from linewatch.line.engine import Engine
from linewatch.line.verdict import judge
from linewatch.protocol.wire import Verdict

HELD_OUT_SEED = 16_000  # the demo uses seeds 0..3 (plus its --seed): these parts are new to training and calibration


def brightness(img: np.ndarray) -> np.ndarray:
    return np.clip(img.astype(np.float32) * 0.8, 0, 255).astype(np.uint8)


def blur(img: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), 1.0)


def colour_cast(img: np.ndarray) -> np.ndarray:
    return np.clip(img.astype(np.float32) * np.array([0.9, 1.0, 1.1], np.float32), 0, 255).astype(np.uint8)


CHANGES = {
    "none (good parts)": None,
    "brightness x0.8": brightness,
    "blur sigma 1 px": blur,
    "colour cast": colour_cast,
}


def simulate(p: float, plan: drift.DriftDesign, streams: int, max_parts: int, rng: np.random.Generator) -> dict:
    """Parts until warn and until alarm of `streams` fresh watches on iid parts outside with probability p."""
    warn = np.full(streams, max_parts, np.int64)
    alarm = np.full(streams, max_parts, np.int64)
    if p <= 0:
        return summary(warn, alarm, max_parts)
    s = np.zeros(streams, np.int64)
    t = np.zeros(streams, np.int64)
    warned = np.zeros(streams, bool)
    live = np.ones(streams, bool)
    while live.any():
        idx = np.flatnonzero(live)
        gap = rng.geometric(p, idx.size) - 1  # parts inside the band before the next one outside
        t[idx] += gap + 1
        s[idx] = np.maximum(0, s[idx] - plan.down * gap) + plan.up
        new_warn = idx[(s[idx] >= plan.warn_at) & ~warned[idx]]
        warn[new_warn] = np.minimum(t[new_warn], max_parts)
        warned[new_warn] = True
        done = idx[s[idx] >= plan.alarm_at]
        alarm[done] = np.minimum(t[done], max_parts)
        live[done] = False
        over = idx[t[idx] >= max_parts]
        live[over] = False
    return summary(warn, alarm, max_parts)


def summary(warn: np.ndarray, alarm: np.ndarray, max_parts: int) -> dict:
    def stats(x: np.ndarray) -> dict:
        return {
            "mean": float(x.mean()),
            "median": float(np.median(x)),
            "p10": float(np.percentile(x, 10)),
            "max": int(x.max()),
            "censored": float(np.mean(x >= max_parts)),
        }

    return {"warn": stats(warn), "alarm": stats(alarm)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="a calibrated 128² bundle (e.g. the demo's model/)")
    ap.add_argument("--parts", type=int, default=400, help="held-out good parts (no change)")
    ap.add_argument("--changed-parts", type=int, default=120, help="held-out parts scored per simulated change")
    ap.add_argument("--streams", type=int, default=300, help="simulated streams per condition")
    ap.add_argument("--max-parts", type=int, default=10_000_000, help="a stream without alarm stops here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--band", default="calibrate", choices=["calibrate", "line"], help="photo region of the parts")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)

    cal = load_calibration(args.model)
    cfg = DriftConfig()
    plan = drift.design(
        drift.calibration_scores(cal), cfg.quantile, cfg.detect_rate, cfg.confidence, cfg.warn_arl0, cfg.alarm_arl0
    )
    if isinstance(plan, str):
        print(f"drift watch unavailable: {plan}", file=sys.stderr)
        return 1
    engine = Engine(args.model, providers="cpu", threads=1)
    h, w = engine.input_size
    parts = make_parts(args.parts, args.band, h, 0.0, HELD_OUT_SEED + args.seed)
    rng = np.random.default_rng(args.seed)
    rows = []
    for name, change in CHANGES.items():
        chosen = parts if change is None else parts[: args.changed_parts]
        frames = np.stack([p.image if change is None else change(p.image) for p in chosen])
        scores, nok = [], 0
        for start in range(0, len(frames), 16):
            maps, batch_scores = engine.score(frames[start : start + 16])
            scores.extend(float(v) for v in batch_scores)
            nok += sum(judge(m, s, cal).verdict == Verdict.NOK for m, s in zip(maps, batch_scores))
        arr = np.asarray(scores)
        above, below = float(np.mean(arr > plan.high)), float(np.mean(arr < plan.low))
        p = above + below
        row = {
            "change": name,
            "parts": len(scores),
            "median_score": float(np.median(scores)),
            "nok_rate": nok / len(scores),
            "above_rate": above,
            "below_rate": below,
            "exact_arl_warn": drift.arl(p, plan.up, plan.down, plan.warn_at) if p > 0 else float("inf"),
            "exact_arl_alarm": drift.arl(p, plan.up, plan.down, plan.alarm_at) if p > 0 else float("inf"),
            **simulate(p, plan, args.streams, args.max_parts, rng),
        }
        rows.append(row)
        print(
            f"{name:<18} median score {row['median_score']:.3f}  NOK {100 * row['nok_rate']:5.1f} %  "
            f"above/below band {100 * above:5.1f}/{100 * below:5.1f} %  "
            f"parts to warn: mean {row['warn']['mean']:.4g} median {row['warn']['median']:.4g}"
            f"  to alarm: mean {row['alarm']['mean']:.4g} median {row['alarm']['median']:.4g} "
            f"p10 {row['alarm']['p10']:.4g} (censored {100 * row['alarm']['censored']:.0f} %; exact ARL "
            f"{row['exact_arl_alarm']:.4g})",
            flush=True,
        )
    result = {
        "model": str(args.model),
        "band": args.band,
        "design": {
            "n_good": plan.n_good,
            "band": [plan.low, plan.high],
            "p0_bound": plan.p0,
            "p1": plan.p1,
            "up": plan.up,
            "down": plan.down,
            "warn_at_nats": plan.warn_at * plan.unit,
            "alarm_at_nats": plan.alarm_at * plan.unit,
            "warn_arl0_bound": plan.warn_arl0,
            "alarm_arl0_bound": plan.alarm_arl0,
        },
        "streams": args.streams,
        "max_parts": args.max_parts,
        "rows": rows,
    }
    print(json.dumps(result["design"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
