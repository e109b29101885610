"""Frozen regional features, extracted once per training run.

The backbone never trains, so every image's regional features are computed once and stored as fp16
(n_images, positions, c_o) — vector-major, so a regional vector is one contiguous row. When the store would
exceed the RAM budget it lives in an np.memmap file in the output directory instead and is read in blocks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from linewatch.bundle import sha256_file
from linewatch.images import load_for_model

log = logging.getLogger(__name__)

CACHE_SUFFIX = ".features.f16"
SCALE_SAMPLE_IMAGES = 8


class FeatureStore:
    """fp16 regional vectors of a list of images, in RAM or in an on-disk memmap.

    An on-disk store whose extraction finished is marked by a JSON file beside it (`identity`: data, weights,
    feature settings, split). An interrupted run keeps both, and a resumed run with the same identity reads the
    features from the file instead of extracting them again, which matters when the set is large enough to live
    on disk in the first place."""

    def __init__(
        self,
        n_images: int,
        positions: int,
        channels: int,
        ram_budget_bytes: int,
        cache_path: str | Path | None = None,
        identity: dict | None = None,
    ):
        self.shape = (n_images, positions, channels)
        nbytes = n_images * positions * channels * 2
        self.cache_path, self.identity, self.reused = None, identity, False
        if nbytes <= ram_budget_bytes or cache_path is None:
            self.array = np.empty(self.shape, dtype=np.float16)
            return
        self.cache_path = Path(cache_path)
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        if self._complete_cache_matches(nbytes):
            self.array = np.memmap(self.cache_path, dtype=np.float16, mode="c", shape=self.shape)  # never written back
            self.reused = True
            log.info("reusing the features an interrupted run extracted: %s", self.cache_path)
            return
        self.marker_path.unlink(missing_ok=True)
        self.array = np.memmap(self.cache_path, dtype=np.float16, mode="w+", shape=self.shape)
        log.info("features (%.1f GB) exceed the RAM budget: on-disk cache %s", nbytes / 1e9, self.cache_path)

    @property
    def marker_path(self) -> Path:
        return self.cache_path.with_name(self.cache_path.name + ".json")

    def _marker(self) -> dict:
        return {"shape": list(self.shape), "dtype": "float16", "identity": self.identity}

    def _complete_cache_matches(self, nbytes: int) -> bool:
        if self.identity is None or not self.cache_path.is_file() or not self.marker_path.is_file():
            return False
        try:
            marker = json.loads(self.marker_path.read_text())
        except (OSError, ValueError):
            return False
        return marker == self._marker() and self.cache_path.stat().st_size == nbytes

    def mark_complete(self) -> None:
        """Record that every image is in the on-disk cache (written last, so a partial cache is never reused)."""
        if self.on_disk and not self.reused and self.identity is not None:
            self.marker_path.write_text(json.dumps(self._marker()) + "\n")

    @property
    def on_disk(self) -> bool:
        return self.cache_path is not None

    @property
    def n_images(self) -> int:
        return self.shape[0]

    @property
    def positions(self) -> int:
        return self.shape[1]

    @property
    def n_vectors(self) -> int:
        return self.shape[0] * self.shape[1]

    def images_per_block(self, block_budget_bytes: int) -> int:
        """How many images one shuffling block may hold: all of them in RAM, a budgeted share on disk."""
        if not self.on_disk:
            return self.n_images
        per_image = self.positions * self.shape[2] * 2
        return max(1, min(self.n_images, block_budget_bytes // per_image))

    def vectors(self, flat_index: np.ndarray) -> np.ndarray:
        """Rows by flat (image * positions + position) index, sorted reads for the memmap's sake."""
        order = np.argsort(flat_index, kind="stable")
        flat = self.array.reshape(-1, self.shape[2])
        out = np.empty((len(flat_index), self.shape[2]), dtype=np.float16)
        out[order] = flat[flat_index[order]]
        return out

    def close(self, keep: bool = False) -> None:
        """Drop the memmap and delete its file, unless `keep` and the extraction finished (for --resume)."""
        if self.cache_path is not None:
            self.array = None
            if keep and self.marker_path.is_file():
                log.info("kept the extracted features in %s for --resume", self.cache_path)
                return
            self.cache_path.unlink(missing_ok=True)
            self.marker_path.unlink(missing_ok=True)


def load_frames(paths: list[Path], height: int, width: int) -> np.ndarray:
    return np.stack([load_for_model(p, height, width) for p in paths])


@torch.inference_mode()
def regional_vectors(model, frames: np.ndarray, device: torch.device) -> np.ndarray:
    """(N, positions, c_o) float32 regional vectors of uint8 BGR frames, scaled by config.feature_scale."""
    feats = model.extract(torch.from_numpy(frames).to(device))
    n, c = feats.shape[:2]
    return feats.reshape(n, c, -1).transpose(1, 2).float().cpu().numpy()


def feature_scale(vectors: np.ndarray) -> float:
    """The global factor that gives regional features unit mean square (see DFRConfig.feature_scale)."""
    ms = float(np.mean(np.square(vectors, dtype=np.float64)))
    if not math.isfinite(ms) or ms <= 0:
        raise ValueError("regional features are all zero or not finite: cannot set a feature scale")
    return 1.0 / math.sqrt(ms)


def spread_indices(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n) (all of them when k >= n)."""
    if k >= n:
        return list(range(n))
    return sorted({int(round(i * (n - 1) / (k - 1))) for i in range(k)}) if k > 1 else [0]


def set_feature_scale(model, paths: list[Path], device: torch.device, batch: int) -> float:
    """Measure raw features on images spread over the training set and store the factor in the config.

    Done before the main extraction so the fp16 store only ever holds unit-scale values (raw Caffe-convention
    features reach the thousands, too close to fp16's 65504 limit).
    """
    cfg = model.config
    cfg.feature_scale = 1.0
    sample = [paths[i] for i in spread_indices(len(paths), SCALE_SAMPLE_IMAGES)]
    chunks = [
        regional_vectors(model, load_frames(sample[i : i + batch], cfg.height, cfg.width), device)
        for i in range(0, len(sample), batch)
    ]
    cfg.feature_scale = feature_scale(np.concatenate(chunks))
    return cfg.feature_scale


def extract_to_store(
    model, paths: list[Path], store: FeatureStore, device: torch.device, batch: int, desc: str
) -> None:
    """Fill `store` with the regional vectors of `paths`, a progress bar counting images."""
    cfg = model.config
    with tqdm(total=len(paths), desc=desc, unit="img", mininterval=1.0, dynamic_ncols=True) as bar:
        for i in range(0, len(paths), batch):
            chunk = paths[i : i + batch]
            vecs = regional_vectors(model, load_frames(chunk, cfg.height, cfg.width), device)
            if not np.isfinite(vecs).all() or np.abs(vecs).max() > 6e4:
                raise ValueError(f"regional features of {chunk[0]}.. overflow fp16 even after scaling")
            store.array[i : i + len(chunk)] = vecs.astype(np.float16)
            bar.update(len(chunk))
    if store.on_disk:
        store.array.flush()


def sample_vectors(store: FeatureStore, count: int, rng: np.random.Generator) -> np.ndarray:
    """Up to `count` regional vectors drawn uniformly from every image and position, float32."""
    count = min(count, store.n_vectors)
    flat = rng.choice(store.n_vectors, size=count, replace=False)
    return store.vectors(flat).astype(np.float32)


def dataset_sha256(paths: list[Path]) -> str:
    """Identity of a training set: its sorted file names, each with the sha256 of its contents."""
    h = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        h.update(path.name.encode() + b"\0" + bytes.fromhex(sha256_file(path)))
    return h.hexdigest()
