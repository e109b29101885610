"""Trivial baseline for the dev benchmark: per-pixel z-score against the good training images.

Anomaly map = |x - mean| / (std + eps) per pixel and channel, averaged over the channels; image score = map max.
It implements the Scorer protocol (docs/DESIGN.md), so `linewatch.evaluation.evaluate.evaluate_scorer` runs it exactly
like DFR. A method worth shipping has to beat it by a wide margin.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from linewatch.images import list_images, load_for_model


class ZScoreBaseline:
    def __init__(self, mean: np.ndarray, std: np.ndarray, eps: float = 1.0):
        self.mean, self.std, self.eps = mean.astype(np.float32), std.astype(np.float32), float(eps)
        self.input_size = tuple(int(v) for v in mean.shape[:2])

    @classmethod
    def fit(cls, good_folder: str | Path, input_size: tuple[int, int], eps: float = 1.0) -> "ZScoreBaseline":
        """Per-pixel mean/std (population) over the folder's images at the model size, in one float64 pass."""
        h, w = input_size
        total = np.zeros((h, w, 3), np.float64)
        total_sq = np.zeros((h, w, 3), np.float64)
        paths = list_images(good_folder)
        for path in paths:
            frame = load_for_model(path, h, w).astype(np.float64)
            total += frame
            total_sq += frame * frame
        mean = total / len(paths)
        std = np.sqrt(np.maximum(total_sq / len(paths) - mean * mean, 0.0))
        return cls(mean, std, eps)

    def score(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (*self.input_size, 3):
            raise ValueError(
                f"expected uint8 frames N×{self.input_size[0]}×{self.input_size[1]}×3, "
                f"got {frames.dtype} {frames.shape}"
            )
        z = np.abs(frames.astype(np.float32) - self.mean) / (self.std + self.eps)
        maps = z.mean(axis=3)
        return maps, maps.max(axis=(1, 2))
