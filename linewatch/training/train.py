"""`linewatch train`: fit DFR's CAE on the frozen regional features of good images.

The CAE is a per-position MLP (1×1 convs), so every regional vector is an independent training sample:
features are extracted once, and training draws shuffled batches of vectors across all images and positions.
A share of the good images is held out; its reconstruction loss drives early stopping (never a test set).
The run is deterministic for a seed and resumable from `train_state.pt` after every epoch.
False rejects from the line (`--feedback`, linewatch/feedback.py) join the training images, never the validation
share, so early stopping still watches the same held-out images as a run without them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import math
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from linewatch import __version__, bundle
from linewatch import feedback as line_feedback
from linewatch.errors import BundleError, ConfigError, DataError
from linewatch.evaluation.datasets import good_image_folder
from linewatch.images import check_images, list_images
from linewatch.training.cae import CAE, pca_latent_dim
from linewatch.training.features import (
    CACHE_SUFFIX,
    FeatureStore,
    dataset_sha256,
    extract_to_store,
    sample_vectors,
    set_feature_scale,
)
from linewatch.training.model import DFR, DFRConfig, save_checkpoint
from linewatch.training.presets import TrainSettings, describe, resolve_settings
from linewatch.training.weights import WeightsSource, resolve
from linewatch.validation import validate

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.pt"
STATE_VERSION = 1
# Settings a resumed run may change; every other one must match the interrupted run.
RESUMABLE_CHANGES = {"epochs", "patience", "device", "extract_batch", "cache_ram_mb", "min_delta", "snapshot_epochs"}
VAL_BATCH = 16384
MIN_STD = 0.05
SNAPSHOTS = "snapshots"  # OUT/snapshots/epoch-NNN: bundles written during the run (`snapshot_epochs`)
ONECYCLE_WARMUP = 0.1  # share of the budget's steps the one-cycle schedule warms up over
ONECYCLE_START = 1 / 25  # its first learning rate, as a share of lr (torch's OneCycleLR default div_factor)


# ---- data ----------------------------------------------------------------------------------------------------


def good_images(data_dir: str | Path) -> list[Path]:
    """Good training images: an MVTec category's train/good, or the folder itself."""
    return list_images(good_image_folder(data_dir))


def split_train_val(paths: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Seeded split of good images; the validation share is at least one image."""
    if len(paths) < 2:
        raise DataError(f"training needs at least 2 good images (one is held out for validation), got {len(paths)}")
    n_val = min(len(paths) - 1, max(1, round(fraction * len(paths))))
    perm = np.random.default_rng(seed).permutation(len(paths))
    val = sorted(paths[i] for i in perm[:n_val])
    train = sorted(paths[i] for i in perm[n_val:])
    return train, val


# ---- batches of regional vectors -----------------------------------------------------------------------------


def positions_used(positions: int, fraction: float) -> int:
    """Regional positions per image that one epoch trains on (`position_fraction`, at least one)."""
    return positions if fraction >= 1.0 else max(1, round(fraction * positions))


def steps_per_epoch(store: FeatureStore, batch: int, block_images: int, fraction: float = 1.0) -> int:
    per_image = positions_used(store.positions, fraction)
    if block_images >= store.n_images:
        return math.ceil(store.n_images * per_image / batch)
    full, rest = divmod(store.n_images, block_images)
    per_block = lambda n: math.ceil(n * per_image / batch)  # noqa: E731
    return full * per_block(block_images) + (per_block(rest) if rest else 0)


def position_subset(n_images: int, positions: int, fraction: float, generator: torch.Generator) -> np.ndarray:
    """Flat (image * positions + position) indices of a fresh random share of each image's positions."""
    keys = torch.rand(n_images, positions, generator=generator)
    chosen = keys.argsort(dim=1)[:, : positions_used(positions, fraction)]
    return (torch.arange(n_images)[:, None] * positions + chosen).reshape(-1).numpy()


def epoch_batches(
    store: FeatureStore, batch: int, generator: torch.Generator, block_images: int, fraction: float = 1.0
):
    """Shuffled float32 batches of regional vectors covering the store once (or `fraction` of each image's).

    In RAM: one permutation of all vectors. On disk: images in shuffled blocks that fit the budget, vectors
    shuffled within each block (contiguous reads instead of random ones). With `fraction` < 1 each image
    contributes a random share of its positions, drawn from the same generator, so the run stays seeded.
    """
    channels = store.shape[2]
    if block_images >= store.n_images:
        flat = store.array.reshape(-1, channels)
        if fraction < 1.0:
            chosen = position_subset(store.n_images, store.positions, fraction, generator)
            perm = chosen[torch.randperm(len(chosen), generator=generator).numpy()]
        else:
            perm = torch.randperm(store.n_vectors, generator=generator).numpy()
        for i in range(0, len(perm), batch):
            yield torch.from_numpy(flat[perm[i : i + batch]])
        return
    order = torch.randperm(store.n_images, generator=generator).numpy()
    for b in range(0, len(order), block_images):
        images = np.sort(order[b : b + block_images])
        block = np.asarray(store.array[images]).reshape(-1, channels)
        if fraction < 1.0:
            block = block[position_subset(len(images), store.positions, fraction, generator)]
        perm = torch.randperm(len(block), generator=generator).numpy()
        for i in range(0, len(perm), batch):
            yield torch.from_numpy(block[perm[i : i + batch]])


def learning_rate(settings: TrainSettings, step: int, total_steps: int) -> float:
    """The rate of optimiser step `step` (0-based) of a budget of `total_steps` under `lr_schedule`.

    A pure function of the step, so a resumed run continues the schedule exactly without a scheduler state.
    """
    peak = settings.lr
    if settings.lr_schedule == "constant" or total_steps <= 0:
        return peak
    progress = min(step, total_steps) / total_steps
    if settings.lr_schedule == "onecycle":
        warmup = ONECYCLE_WARMUP
        if progress < warmup:
            return peak * (ONECYCLE_START + (1.0 - ONECYCLE_START) * progress / warmup)
        progress = (progress - warmup) / (1.0 - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


class StandardisedCAE(nn.Module):
    """The CAE trained on per-channel standardised vectors: an exact reparametrisation, folded away at the end.

    Regional ReLU features are far from centred and their channels' spreads differ by orders of magnitude;
    plain training sits for many epochs on a plateau where it reconstructs little more than the mean vector.
    Standardising inside the module ((x - mean) / std in, * std + mean out) keeps the loss in the original
    feature space (the paper's error) and folds into the first and last Linear, so the bundle holds the plain
    Table VIII network.
    """

    def __init__(self, cae: CAE, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.cae = cae
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("std", std.float().clone())

    def forward_vectors(self, x: torch.Tensor) -> torch.Tensor:
        return self.cae.forward_vectors((x - self.mean) / self.std) * self.std + self.mean

    def folded(self) -> CAE:
        cae = copy.deepcopy(self.cae)
        first, last = cae.linears[0], cae.linears[-1]
        with torch.no_grad():
            first.bias -= first.weight @ (self.mean / self.std)
            first.weight /= self.std[None, :]
            last.weight *= self.std[:, None]
            last.bias.mul_(self.std).add_(self.mean)
        return cae


def channel_statistics(sample: np.ndarray, min_std: float = MIN_STD) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of regional vectors; near-dead channels get `min_std` (features are unit-scale)."""
    x = torch.from_numpy(sample).double()
    return x.mean(0).float(), x.std(0).clamp_min(min_std).float()


@torch.no_grad()
def reconstruction_loss(cae: nn.Module, store: FeatureStore, device: torch.device) -> float:
    """Mean squared reconstruction error over every vector of `store` (eval mode)."""
    was_training = cae.training
    cae.eval()
    flat = store.array.reshape(-1, store.shape[2])
    total, count = 0.0, 0
    for i in range(0, len(flat), VAL_BATCH):
        x = torch.from_numpy(np.asarray(flat[i : i + VAL_BATCH])).to(device).float()
        total += float(F.mse_loss(cae.forward_vectors(x), x, reduction="sum"))
        count += x.numel()
    cae.train(was_training)
    return total / count


# ---- training state (resume) ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Progress:
    epoch: int = 0  # epochs completed
    best_val: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False
    fit_seconds: float = 0.0
    fit_cpu_seconds: float = 0.0  # process CPU time (all threads) of the epochs: the budget on a shared machine
    history: list = dataclasses.field(default_factory=list)  # [{epoch, train_loss, val_loss}]


def save_train_state(
    path: Path,
    *,
    settings: TrainSettings,
    config: DFRConfig,
    weights: WeightsSource,
    data_sha: str,
    split: dict,
    progress: Progress,
    cae: StandardisedCAE,
    best_cae: dict,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> None:
    payload = {
        "version": STATE_VERSION,
        "settings": settings.model_dump(),
        "config": dataclasses.asdict(config),
        "weights": weights.as_metadata(),
        "dataset_sha256": data_sha,
        "split": split,
        "progress": dataclasses.asdict(progress),
        "cae": cae.cae.state_dict(),
        "input_norm": {"mean": cae.mean.cpu(), "std": cae.std.cpu()},
        "best_cae": best_cae,
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_train_state(path: Path) -> dict:
    if not path.is_file():
        raise BundleError(f"--resume: no training state at {path} (start without --resume)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BundleError(f"--resume: cannot read training state {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise BundleError(f"--resume: {path} is not a linewatch training state (version {STATE_VERSION})")
    return state


def check_resumable(state: dict, settings: TrainSettings, data_sha: str, path: Path) -> None:
    # a state saved before a setting existed was trained with its default (the behaviour before it)
    defaults = {k: f.get_default(call_default_factory=True) for k, f in TrainSettings.model_fields.items()}
    old = {**defaults, **state["settings"]}
    new = settings.model_dump()
    changed = sorted(k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k])
    if changed:
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed)
        raise ConfigError(
            f"--resume: settings differ from the run saved in {path} ({diffs}); "
            f"only {', '.join(sorted(RESUMABLE_CHANGES))} may change"
        )
    if new["lr_schedule"] != "constant" and old.get("epochs") != new["epochs"]:
        raise ConfigError(
            f"--resume: epochs {old.get('epochs')} -> {new['epochs']}: the {new['lr_schedule']} learning-rate "
            f"schedule of the run saved in {path} spans its epoch budget; resume with --epochs {old.get('epochs')}"
        )
    if state["dataset_sha256"] != data_sha:
        raise DataError(
            f"--resume: the training images changed since the run saved in {path} "
            f"(dataset sha256 {state['dataset_sha256'][:12]} -> {data_sha[:12]})"
        )


def check_output_dir(out: Path, resume: bool) -> None:
    """A fresh run needs an empty --out; a resumed run must not leave a stale exported graph behind."""
    if resume:
        stale = [
            n for n in (bundle.GRAPH, bundle.GRAPH_FP16, bundle.GRAPH_INT8, bundle.CALIBRATION) if (out / n).exists()
        ]
        if stale:
            raise ConfigError(
                f"--resume: {out} already holds {', '.join(stale)} made from the old model; "
                f"train into a new --out instead"
            )
    elif out.exists() and any(out.iterdir()):
        hint = " (an interrupted run: add --resume)" if (out / TRAIN_STATE).exists() else ""
        raise ConfigError(f"--out {out} is not empty{hint}; choose a new directory or remove it")


# ---- the run -------------------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name:
        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise ConfigError(f"--device {name!r}: {exc}") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available here")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_config(settings: TrainSettings) -> DFRConfig:
    return DFRConfig(
        layers=settings.layer_list(),
        height=settings.size,
        width=settings.size,
        padding=settings.padding,
        align=settings.align,
        batchnorm=settings.batchnorm,
        score=settings.score,
    )


def versions() -> dict:
    import torchvision

    return {
        "linewatch": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
    }


def features_identity(config: DFRConfig, weights: WeightsSource, data_sha: str, split: dict) -> dict:
    """What the extracted regional features depend on: a cached store is reused only if all of it matches."""
    return {
        "dataset_sha256": data_sha,
        "weights_sha256": weights.sha256,
        "split": split,
        "features": {
            k: getattr(config, k) for k in ("layers", "height", "width", "padding", "align", "pool", "feature_scale")
        },
    }


@dataclasses.dataclass
class Run:
    """What one training run works from, settled before any feature is extracted."""

    settings: TrainSettings
    data: str | Path  # as given: logged as given, recorded resolved
    out: Path
    device: torch.device
    weights: WeightsSource
    data_sha: str
    train_paths: list[Path]
    val_paths: list[Path]
    state: dict | None  # the interrupted run's train_state.pt when resuming
    feedback_root: Path | None = None  # --feedback: the folder whose false rejects joined the training images
    feedback: list[line_feedback.Entry] = dataclasses.field(default_factory=list)

    @property
    def state_path(self) -> Path:
        return self.out / TRAIN_STATE

    @property
    def split(self) -> dict:
        return {"train": [p.name for p in self.train_paths], "val": [p.name for p in self.val_paths]}


@dataclasses.dataclass
class Fit:
    """The CAE in training and what `train_state.pt` keeps of it after every epoch."""

    cae: StandardisedCAE
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # the batch shuffles
    progress: Progress
    best_cae: dict  # state dict of the epoch with the best validation loss


def check_same_weights(state: dict, weights: WeightsSource, path: Path) -> None:
    if state["weights"]["sha256"] != weights.sha256:
        raise ConfigError(
            f"--resume: VGG19 weights differ from the run saved in {path} "
            f"({state['weights']['sha256']} -> {weights.sha256})"
        )


def feedback_images(folder: str | Path) -> tuple[Path, list[line_feedback.Entry]]:
    """The false rejects of a feedback folder (never its missed defects), checked against their sidecars' sha256;
    the folder must be writable, so the run can mark them used when it ends."""
    root = line_feedback.feedback_root(Path(folder))
    corrections = line_feedback.verified(line_feedback.entries(root, line_feedback.FALSE_REJECT))
    if not os.access(root, os.W_OK):
        raise line_feedback.FeedbackError(
            f"--feedback {root} is not writable: the run could not record in {line_feedback.USED} which corrections "
            f"it used"
        )
    small = sum(1 for e in corrections if e.sidecar.get("source") == "preview")
    if small:
        log.warning(
            "%d false reject(s) are the dashboard's downscaled previews, not full frames (start the dashboard with "
            "--archive for full frames)",
            small,
        )
    return root, corrections


def start_run(
    settings: TrainSettings,
    data: str | Path,
    out: Path,
    weights_path: str | None,
    random_init: bool,
    resume: bool,
    feedback: str | Path | None = None,
) -> Run:
    """Check --out, read and split the good images, find the weights; a resumed run must match the saved one.
    Every image is decoded once here, so bad files are all named before extraction starts."""
    check_output_dir(out, resume)
    device = pick_device(settings.device)
    paths = good_images(data)
    check_images(paths, f"good images in {good_image_folder(data)}")
    root, corrections = feedback_images(feedback) if feedback is not None else (None, [])
    extra = [e.image for e in corrections]
    if extra:
        check_images(extra, f"false rejects in {root}")
    data_sha = dataset_sha256(paths + extra)
    state = load_train_state(out / TRAIN_STATE) if resume else None
    if state is not None:
        check_resumable(state, settings, data_sha, out / TRAIN_STATE)
    weights = resolve(weights_path, random_init=random_init)
    if state is not None:
        check_same_weights(state, weights, out / TRAIN_STATE)
    train_paths, val_paths = split_train_val(paths, settings.val_fraction, settings.seed)
    train_paths += extra
    log.info(
        "training on %d good images (%d of them false rejects from %s), validating on %d (from %s); device %s",
        len(train_paths),
        len(extra),
        root,
        len(val_paths),
        data,
        device,
    )
    log.info("settings: %s", describe(settings))
    return Run(settings, data, out, device, weights, data_sha, train_paths, val_paths, state, root, corrections)


def frozen_model(run: Run) -> DFR:
    """The frozen DFR the CAE learns from: a fresh run's c_d is chosen after extraction, a resumed run has its own."""
    torch.manual_seed(run.settings.seed)
    config = DFRConfig(**run.state["config"]) if run.state else model_config(run.settings)
    if run.state is None:
        config.c_d = 0
    return DFR(config, run.weights).to(run.device).eval()


def measure_feature_scale(model: DFR, run: Run) -> None:
    scale = set_feature_scale(model, run.train_paths, run.device, run.settings.extract_batch)
    log.info("feature scale %.6g (unit mean square regional features)", scale)


@contextlib.contextmanager
def feature_stores(run: Run, config: DFRConfig):
    """(train, val) stores, in RAM or on disk within the budget, named by what their features depend on.

    An interrupted run keeps its finished on-disk features for --resume; a finished run deletes them.
    """
    budget = run.settings.cache_ram_mb * (1 << 20)
    grid = config.grid[0] * config.grid[1]
    identity = features_identity(config, run.weights, run.data_sha, run.split)
    train_store = FeatureStore(
        len(run.train_paths),
        grid,
        config.c_o,
        budget,
        run.out / ("train" + CACHE_SUFFIX),
        identity={**identity, "part": "train"},
    )
    val_budget = budget if train_store.on_disk else budget - train_store.array.nbytes
    val_store = FeatureStore(
        len(run.val_paths),
        grid,
        config.c_o,
        val_budget,
        run.out / ("val" + CACHE_SUFFIX),
        identity={**identity, "part": "val"},
    )
    finished = False
    try:
        yield train_store, val_store
        finished = True
    finally:
        train_store.close(keep=not finished)
        val_store.close(keep=not finished)


def extract_features(model: DFR, run: Run, train_store: FeatureStore, val_store: FeatureStore) -> None:
    """Fill each store that an interrupted run did not already finish, and mark it complete."""
    for store, part_paths, part in ((train_store, run.train_paths, "train"), (val_store, run.val_paths, "val")):
        if not store.reused:
            extract_to_store(model, part_paths, store, run.device, run.settings.extract_batch, f"features ({part})")
            store.mark_complete()


def choose_latent(sample: np.ndarray, settings: TrainSettings, n_images: int) -> int:
    """c_d: --latent, or the principal components that reach `pca_variance` of the sampled regional vectors."""
    if settings.latent:
        return settings.latent
    c_d = pca_latent_dim(torch.from_numpy(sample), settings.pca_variance)
    log.info(
        "c_d = %d (PCA, %.0f %% variance of %d regional vectors from %d images)",
        c_d,
        100 * settings.pca_variance,
        len(sample),
        n_images,
    )
    return c_d


def standardised_cae(run: Run, config: DFRConfig, train_store: FeatureStore) -> StandardisedCAE:
    """A fresh run takes c_d and the input standardisation from one seeded sample of training vectors (and sets
    c_d in `config`); a resumed run has both in its state."""
    if run.state is None:
        sample = sample_vectors(train_store, run.settings.pca_samples, np.random.default_rng(run.settings.seed))
        mean, std = channel_statistics(sample)
        config.c_d = choose_latent(sample, run.settings, len(run.train_paths))
    else:
        mean, std = run.state["input_norm"]["mean"], run.state["input_norm"]["std"]
    try:
        return StandardisedCAE(CAE(config.c_o, config.c_d, config.batchnorm), mean, std).to(run.device)
    except ValueError as exc:
        raise ConfigError(f"latent: {exc}") from exc


def start_fit(run: Run, cae: StandardisedCAE) -> Fit:
    """Adam and a seeded shuffle generator; a resumed run continues from its saved weights, states and progress."""
    settings = run.settings
    optimizer = torch.optim.Adam(cae.cae.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    fit = Fit(cae, optimizer, generator, Progress(), copy.deepcopy(cae.cae.state_dict()))
    if run.state is not None:
        restore_fit(fit, run.state, settings.patience)
    return fit


def restore_fit(fit: Fit, state: dict, patience: int) -> None:
    fit.cae.cae.load_state_dict(state["cae"])
    fit.optimizer.load_state_dict(state["optimizer"])
    fit.generator.set_state(state["generator"])
    fit.progress, fit.best_cae = Progress(**state["progress"]), state["best_cae"]
    fit.progress.stopped_early = fit.progress.bad_epochs >= patience  # patience may change on resume
    log.info(
        "resuming after epoch %d (best val loss %.5f at epoch %d)",
        fit.progress.epoch,
        fit.progress.best_val,
        fit.progress.best_epoch,
    )


def save_run_state(run: Run, config: DFRConfig, fit: Fit) -> None:
    """train_state.pt: everything --resume needs to continue exactly where this epoch ended."""
    save_train_state(
        run.state_path,
        settings=run.settings,
        config=config,
        weights=run.weights,
        data_sha=run.data_sha,
        split=run.split,
        progress=fit.progress,
        cae=fit.cae,
        best_cae=fit.best_cae,
        optimizer=fit.optimizer,
        generator=fit.generator,
    )


def train_epoch(
    fit: Fit,
    train: FeatureStore,
    settings: TrainSettings,
    device: torch.device,
    block_images: int,
    bar: tqdm,
    steps: int,
) -> float:
    """One pass over every training vector (or `position_fraction` of them) in shuffled batches; returns the mean
    training loss. `steps` per epoch place each step on the learning-rate schedule."""
    total, count = 0.0, 0
    first_step, budget = fit.progress.epoch * steps, settings.epochs * steps
    batches = epoch_batches(train, settings.batch_vectors, fit.generator, block_images, settings.position_fraction)
    for step, x in enumerate(batches, first_step):
        x = x.to(device).float()
        for group in fit.optimizer.param_groups:
            group["lr"] = learning_rate(settings, step, budget)
        fit.optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(fit.cae.forward_vectors(x), x)
        loss.backward()
        fit.optimizer.step()
        total += float(loss.detach()) * len(x)
        count += len(x)
        bar.update(1)
        bar.set_postfix(
            epoch=fit.progress.epoch + 1, loss=f"{float(loss.detach()):.4f}", best_val=f"{fit.progress.best_val:.4f}"
        )
    return total / count


def record_epoch(fit: Fit, train_loss: float, val_loss: float, settings: TrainSettings) -> None:
    """Count the epoch; keep its weights if the validation loss improved by `min_delta`, else spend patience."""
    progress = fit.progress
    if not math.isfinite(val_loss):
        raise ValueError(
            f"validation loss is {val_loss} at epoch {progress.epoch + 1}: training diverged (try a lower lr)"
        )
    progress.epoch += 1
    progress.history.append({"epoch": progress.epoch, "train_loss": train_loss, "val_loss": val_loss})
    if val_loss < progress.best_val * (1.0 - settings.min_delta):
        progress.best_val, progress.best_epoch, progress.bad_epochs = val_loss, progress.epoch, 0
        fit.best_cae = copy.deepcopy(fit.cae.cae.state_dict())
    else:
        progress.bad_epochs += 1
        progress.stopped_early = progress.bad_epochs >= settings.patience


def fit_cae(
    fit: Fit,
    train: FeatureStore,
    val: FeatureStore,
    settings: TrainSettings,
    device: torch.device,
    save_state: Callable[[], None],
    snapshot: Callable[[], None] | None = None,
) -> None:
    """Epochs of shuffled vector batches until the budget or the patience runs out; `fit.best_cae` ends best.
    After each epoch named in `snapshot_epochs`, `snapshot()` writes the best model so far."""
    progress = fit.progress
    block_images = train.images_per_block(settings.cache_ram_mb * (1 << 20) // 4)
    steps = steps_per_epoch(train, settings.batch_vectors, block_images, settings.position_fraction)
    remaining = settings.epochs - progress.epoch
    fit.cae.train()
    with tqdm(
        total=max(0, remaining) * steps, desc="train CAE", unit="step", mininterval=1.0, dynamic_ncols=True
    ) as bar:
        while progress.epoch < settings.epochs and not progress.stopped_early:
            started, cpu_started = time.perf_counter(), time.process_time()
            train_loss = train_epoch(fit, train, settings, device, block_images, bar, steps)
            val_loss = reconstruction_loss(fit.cae, val, device)
            record_epoch(fit, train_loss, val_loss, settings)
            progress.fit_seconds += time.perf_counter() - started
            progress.fit_cpu_seconds += time.process_time() - cpu_started
            save_state()
            log.info(
                "epoch %d/%d: train loss %.5f, val loss %.5f (best %.5f at epoch %d)%s",
                progress.epoch,
                settings.epochs,
                train_loss,
                val_loss,
                progress.best_val,
                progress.best_epoch,
                ", stopping early" if progress.stopped_early else "",
            )
            if snapshot is not None and progress.epoch in settings.snapshot_epochs:
                snapshot()


def with_best_cae(model: DFR, fit: Fit) -> DFR:
    """The model with the best epoch's CAE, standardisation folded away, and the standardised score's 1/std².
    The CAE in training is left as it is, so a snapshot can be taken between epochs."""
    best = StandardisedCAE(copy.deepcopy(fit.cae.cae), fit.cae.mean, fit.cae.std)
    best.cae.load_state_dict(fit.best_cae)
    model.cae = best.folded()
    if model.config.score != "mean_sq_error":
        model.error_weight.copy_(1.0 / fit.cae.std.double().pow(2).float().to(model.error_weight.device))
    return model.cpu().eval()


def training_record(
    run: Run, progress: Progress, started: float, extract_seconds: float, cpu_started: float = 0.0
) -> dict:
    """metadata.json's `training`: data, split sizes, epochs, losses, times and settings.
    `cpu_seconds` is this command's process CPU time (all threads), the fair budget on a shared machine."""
    return {
        "data": str(Path(run.data).resolve()),
        "dataset_sha256": run.data_sha,
        "n_train": len(run.train_paths),
        "n_val": len(run.val_paths),
        "epochs": progress.epoch,
        "best_epoch": progress.best_epoch,
        "stopped_early": progress.stopped_early,
        "seed": run.settings.seed,
        "preset": run.settings.preset,
        "best_val_loss": progress.best_val,
        "train_seconds": round(time.perf_counter() - started, 2),
        "cpu_seconds": round(time.process_time() - cpu_started, 2),
        "extract_seconds": round(extract_seconds, 2),
        "fit_seconds": round(progress.fit_seconds, 2),
        "fit_cpu_seconds": round(progress.fit_cpu_seconds, 2),
        "device": str(run.device),
        "settings": run.settings.model_dump(),
        **({"feedback": feedback_record(run)} if run.feedback_root is not None else {}),
        "history": progress.history,
    }


def feedback_record(run: Run) -> dict:
    """metadata.json's `training.feedback`: the folder and each false reject trained on (file, sha256)."""
    assert run.feedback_root is not None
    return {"folder": str(run.feedback_root.resolve()), "files": line_feedback.describe(run.feedback)}


def write_bundle(run: Run, model: DFR, training: dict, out: Path | None = None) -> dict:
    """model.pt (with the training record less its loss history), then metadata.json, in `out` (default: the
    run's --out); returns the metadata."""
    out = run.out if out is None else out
    checkpoint = save_checkpoint(model, out, extra={"training": {k: v for k, v in training.items() if k != "history"}})
    training["checkpoint_sha256"] = bundle.sha256_file(checkpoint)
    config = model.config
    meta = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input": {"height": config.height, "width": config.width, "layout": "NHWC", "dtype": "uint8", "color": "BGR"},
        "dfr": config.as_metadata(),
        "weights": run.weights.as_metadata(),
        "training": training,
        "versions": versions(),
    }
    bundle.write_metadata(out, meta)
    return meta


def snapshot_dir(out: Path, epoch: int) -> Path:
    return out / SNAPSHOTS / f"epoch-{epoch:03d}"


def write_snapshot(run: Run, model: DFR, fit: Fit, started: float, extract_seconds: float, cpu_started: float) -> None:
    """An evaluable bundle of the best weights so far, as a run with this epoch budget would have ended
    (under a constant learning rate), without touching the training state."""
    out = snapshot_dir(run.out, fit.progress.epoch)
    out.mkdir(parents=True, exist_ok=True)
    snap = with_best_cae(copy.deepcopy(model), fit)
    write_bundle(run, snap, training_record(run, fit.progress, started, extract_seconds, cpu_started), out)
    log.info("snapshot after epoch %d: %s", fit.progress.epoch, out)


def train(
    settings: TrainSettings,
    data: str | Path,
    out: str | Path,
    weights_path: str | None = None,
    random_init: bool = False,
    resume: bool = False,
    feedback: str | Path | None = None,
) -> dict:
    """Train a bundle in `out`; returns its metadata. `feedback`: a feedback folder whose false rejects join the
    training images and are marked used once the bundle is written."""
    started, cpu_started = time.perf_counter(), time.process_time()
    run = start_run(settings, data, Path(out), weights_path, random_init, resume, feedback)
    model = frozen_model(run)
    run.out.mkdir(parents=True, exist_ok=True)
    extract_started = time.perf_counter()
    if run.state is None:
        measure_feature_scale(model, run)
    with feature_stores(run, model.config) as (train_store, val_store):
        extract_features(model, run, train_store, val_store)
        extract_seconds = time.perf_counter() - extract_started
        fit = start_fit(run, standardised_cae(run, model.config, train_store))
        save_state = functools.partial(save_run_state, run, model.config, fit)
        snapshot = functools.partial(write_snapshot, run, model, fit, started, extract_seconds, cpu_started)
        fit_cae(fit, train_store, val_store, run.settings, run.device, save_state, snapshot)
    if fit.progress.epoch == 0:
        raise ConfigError("epochs: no epoch was trained (the budget is 0 or already spent)")
    model = with_best_cae(model, fit)
    meta = write_bundle(run, model, training_record(run, fit.progress, started, extract_seconds, cpu_started))
    if run.feedback_root is not None:
        line_feedback.mark_used(run.feedback_root, run.feedback, by="train", target=str(run.out.resolve()))
    return meta


@dataclasses.dataclass
class Retrain:
    """What `--from MODEL` fills in where the command line leaves it open."""

    settings: dict  # the recorded training settings, less the device (a resource of this machine, not the model)
    data: str
    weights: str | None
    random_init: bool
    feedback: str | None


def retrain_from(model: str | Path, weights: str | None, random_init: bool) -> Retrain:
    """MODEL's recorded training: settings, data folder, weights (the same file, or one with the same sha256) and
    feedback folder."""
    meta = bundle.read_metadata(model)
    training = meta.get("training") or {}
    recorded = training.get("settings")
    if not isinstance(recorded, dict) or not training.get("data"):
        raise BundleError(
            f"--from {model}: its metadata records no training settings and data (not trained by `linewatch train`, "
            f"or by a version before they were recorded); give --data and the settings instead"
        )
    settings = validate(TrainSettings, recorded, f"{Path(model) / bundle.METADATA} (training.settings)").model_dump()
    settings.pop("device", None)
    if weights is None and not random_init:
        w = meta.get("weights") or {}
        if w.get("source") == "random":
            random_init = True
        elif w.get("path") and Path(w["path"]).is_file():
            weights = str(w["path"])
        else:
            found = resolve()
            if w.get("sha256") and found.sha256 != w["sha256"]:
                raise ConfigError(
                    f"--from {model}: it was trained with VGG19 weights {w.get('path')} (sha256 "
                    f"{str(w['sha256'])[:12]}), which are not here, and the weights found ({found.path}) differ: "
                    f"pass --weights FILE"
                )
            weights = found.path
    fb = (training.get("feedback") or {}).get("folder")
    return Retrain(settings, str(training["data"]), weights, random_init, fb)


def cli_train(args) -> int:
    data, weights, random_init, fb = args.data, args.weights, args.random_init, args.feedback
    base = None
    if args.from_model:
        if args.preset:
            raise ConfigError("--from takes MODEL's training settings and --preset would replace them all: give one")
        again = retrain_from(args.from_model, weights, random_init)
        base, weights, random_init = again.settings, again.weights, again.random_init
        data, fb = data or again.data, fb or again.feedback
        log.info("retraining %s: data %s, feedback %s", args.from_model, data, fb or "none")
    if not data:
        raise ConfigError("--data is required (or --from MODEL, which trains on MODEL's training data again)")
    settings = resolve_settings(args, base)
    meta = train(
        settings, data, args.out, weights_path=weights, random_init=random_init, resume=args.resume, feedback=fb
    )
    t, d = meta["training"], meta["dfr"]
    print(
        f"trained {args.out}: {d['height']}x{d['width']}, layers {d['layer_spec']}, c_o {d['c_o']}, "
        f"c_d {d['c_d']}; {t['epochs']} epochs (best {t['best_epoch']}, val loss {t['best_val_loss']:.5f}); "
        f"{t['n_train']} train / {t['n_val']} val images; {t['train_seconds']:.1f} s"
    )
    if "feedback" in t:
        print(f"{len(t['feedback']['files'])} false reject(s) from {t['feedback']['folder']} trained on, marked used")
    return 0
