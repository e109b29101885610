"""Training settings: two named presets, an optional YAML file and command-line flags, merged in that order.

Every key is typed and range-checked; an unknown key is refused naming the key and the file, so a typo can
never fall back to a default in silence.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from linewatch.errors import ConfigError
from linewatch.training.backbone import parse_layers


@dataclass
class TrainSettings:
    """Defaults are the `fast` preset."""

    preset: str = "fast"
    # model
    size: int = 128  # square input, pixels (frames are resized to size×size)
    layers: str = "1:8"  # VGG19 ReLU layers, 1-based inclusive range (paper: 1:12)
    padding: str = "reflect"  # reflect | zero (paper Table V: zero padding raises border false alarms)
    align: str = "bilinear"  # bilinear (reference code) | nearest (paper text)
    batchnorm: bool = False  # BatchNorm in the CAE as in the reference code (folded at export)
    latent: int = 0  # c_d; 0 = PCA at `pca_variance` explained variance
    pca_variance: float = 0.9
    pca_samples: int = 20000  # regional vectors sampled across all training images for PCA
    # optimisation
    epochs: int = 8  # budget of passes over all training vectors
    batch_vectors: int = 4096  # regional vectors per step (shuffled across images and positions)
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 3  # epochs without validation improvement before stopping
    min_delta: float = 1e-4  # relative improvement that counts
    val_fraction: float = 0.15  # share of good images held out for early stopping (at least 1)
    seed: int = 0
    # resources
    extract_batch: int = 16  # images per backbone pass
    cache_ram_mb: int = 4096  # features above this go to an on-disk cache in the output directory
    device: str = ""  # "" = cuda if available, else cpu
    # per-region error: standardised_sq_error (each channel's squared error over its training variance) or the
    # paper's plain mean_sq_error; see linewatch/build/model.py DFRConfig.score
    score: str = "standardised_sq_error"

    def layer_list(self) -> list[int]:
        return parse_layers(self.layers)


PRESETS: dict[str, dict[str, Any]] = {
    # The paper's setting (Yang et al. 2020, Sec. IV): 256², f_{1:12}, c_d by PCA, Adam lr 1e-4. The paper runs 700
    # epochs of 4-image batches; we train on shuffled regional vectors with an epoch budget and early stopping.
    "paper": dict(
        size=256,
        layers="1:12",
        padding="reflect",
        align="bilinear",
        latent=0,
        lr=1e-4,
        batch_vectors=4096,
        epochs=150,
        patience=10,
        extract_batch=4,
    ),
    # A CPU preset: ~100 images train in a few minutes on 2 cores (see docs/BENCHMARKS.md, "Training time").
    "fast": dict(
        size=128,
        layers="1:8",
        padding="reflect",
        align="bilinear",
        latent=0,
        lr=1e-3,
        batch_vectors=4096,
        epochs=8,
        patience=3,
        extract_batch=16,
    ),
}

CHOICES = {
    "preset": tuple(PRESETS),
    "padding": ("reflect", "zero"),
    "align": ("bilinear", "nearest"),
    "score": ("standardised_sq_error", "mean_sq_error"),
}
POSITIVE = {"size", "epochs", "batch_vectors", "pca_samples", "extract_batch", "patience"}
NON_NEGATIVE = {"latent", "weight_decay", "min_delta", "cache_ram_mb", "seed"}
FIELD_TYPES = {f.name: f.type for f in fields(TrainSettings)}
# CLI flag -> settings key (flags named as in linewatch/cli.py)
CLI_KEYS = {
    "preset": "preset",
    "size": "size",
    "layers": "layers",
    "padding": "padding",
    "align": "align",
    "epochs": "epochs",
    "latent": "latent",
    "seed": "seed",
    "device": "device",
    "score": "score",
}


def _check_value(key: str, value: Any, where: str) -> Any:
    """Type- and range-check one setting; `where` names the file or flag for the error."""
    kind = FIELD_TYPES[key]
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key}: expected true or false, got {value!r}")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key}: expected an integer, got {value!r}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key}: expected a number, got {value!r}")
        value = float(value)
    elif kind == "str":
        if key == "layers" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key}: expected a string, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{where}: {key}: expected one of {', '.join(CHOICES[key])}, got {value!r}")
    if key in POSITIVE and value <= 0:
        raise ConfigError(f"{where}: {key}: must be > 0, got {value!r}")
    if key in NON_NEGATIVE and value < 0:
        raise ConfigError(f"{where}: {key}: must be >= 0, got {value!r}")
    if key == "layers":
        try:
            parse_layers(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: layers: {exc}") from exc
    if key in ("pca_variance", "val_fraction") and not 0.0 < value < 1.0:
        raise ConfigError(f"{where}: {key}: must be between 0 and 1 (exclusive), got {value!r}")
    if key == "lr" and value <= 0:
        raise ConfigError(f"{where}: lr: must be > 0, got {value!r}")
    if key == "size" and value < 16:
        raise ConfigError(f"{where}: size: at least 16 pixels, got {value!r}")
    return value


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Checked key -> value mapping from a YAML training config."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of training settings at the top level")
    out = {}
    for key, value in data.items():
        if key not in FIELD_TYPES:
            raise ConfigError(f"{path}: {key}: unknown key (known keys: {', '.join(FIELD_TYPES)})")
        out[key] = _check_value(key, value, str(path))
    return out


def resolve_settings(args) -> TrainSettings:
    """Preset defaults < config file < command-line flags. The preset may come from the file or the flag."""
    from_file = read_config_file(args.config) if getattr(args, "config", None) else {}
    flags = {key: getattr(args, flag) for flag, key in CLI_KEYS.items() if getattr(args, flag, None) is not None}
    flags = {key: _check_value(key, value, f"--{key}") for key, value in flags.items()}
    preset = flags.get("preset") or from_file.get("preset") or "fast"
    merged: dict[str, Any] = {**PRESETS[preset], **from_file, **flags, "preset": preset}
    return TrainSettings(**merged)


def describe(settings: TrainSettings) -> str:
    return ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(settings).items())
