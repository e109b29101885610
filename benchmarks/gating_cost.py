"""Image gating and ignore-mask cost per frame (docs/BENCHMARKS.md, "Image gating cost"):
`python benchmarks/gating_cost.py`, one OpenCV thread, a 640x480 textured frame that passes every test."""

from __future__ import annotations

import os
import tempfile
import time

import cv2
import numpy as np

from linewatch.line.config import GatingConfig
from linewatch.line.gating import FrameGate
from linewatch.line.ignore_mask import IgnoreMask
from linewatch.validation import validate


def timed(fn, n: int) -> tuple[float, float]:
    t = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    ms = np.array(t) * 1000
    return float(np.median(ms)), float(np.percentile(ms, 99))


def main() -> None:
    cv2.setNumThreads(1)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:480, :640]
    frame = np.dstack([np.where(((yy // 16) + (xx // 16)) % 2 == 0, 90, 170).astype(np.uint8)] * 3)
    frame = np.clip(frame + rng.normal(0, 4, frame.shape), 0, 255).astype(np.uint8)
    refs = tempfile.mkdtemp()
    cv2.imwrite(os.path.join(refs, "sharp.png"), frame)
    cv2.imwrite(os.path.join(refs, "empty.png"), np.full_like(frame, 60))
    brightness = {"min_mean": 40, "max_mean": 220, "max_clipped": 0.2}
    presence = {"presence_min_diff": 8, "empty_reference": "empty.png"}
    focus = {"focus_min_ratio": 0.5, "focus_reference": "sharp.png"}
    print("| gate at 640x480 | median ms | p99 ms |\n| --- | --- | --- |")
    for name, cfg in (
        ("brightness (histogram: mean, clipped)", brightness),
        ("presence (empty-station reference)", presence),
        ("focus (Laplacian variance, ratio)", focus),
        ("all three", {**brightness, **presence, **focus}),
    ):
        gate = FrameGate("bench", validate(GatingConfig, cfg, "bench", context={"base": refs}))
        assert gate.check(frame) is None  # passes: every test runs
        print("| {} | {:.2f} | {:.2f} |".format(name, *timed(lambda: gate.check(frame), 300)))
    mask = IgnoreMask([[[0, 0], [0.3, 0], [0.3, 0.3], [0, 0.3]], [[0.6, 0.6], [0.9, 0.7], [0.7, 0.95]]])
    amap = rng.random((256, 256)).astype(np.float32)
    mask.apply(amap)  # the raster is built once per size
    print(
        "| ignore mask, 256x256 map (apply + max) | {:.3f} | {:.3f} |".format(
            *timed(lambda: mask.apply(amap).max(), 1000)
        )
    )


if __name__ == "__main__":
    main()
