"""Training settings: two named presets, an optional YAML file and command-line flags, merged in that order.

`TrainSettings` is a strict pydantic model (`linewatch.validation`): every key is typed and range-checked, and an
unknown key is refused naming the key and the file, so a typo can never fall back to a default in silence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from linewatch.errors import ConfigError
from linewatch.training.backbone import parse_layers
from linewatch.validation import StrictModel, expected, validate

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


def _layers_as_text(value: Any) -> Any:
    """YAML reads `layers: 12` as an integer; a single layer is still a valid spec, so it becomes "12"."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _valid_layers(spec: str) -> str:
    try:
        parse_layers(spec)
    except ValueError as exc:
        raise expected("a range like 1:12, a single layer like 12, or 1,3,5 (layers 1..16)", spec) from exc
    return spec


LayerSpec = Annotated[StrictStr, BeforeValidator(_layers_as_text), AfterValidator(_valid_layers)]


class TrainSettings(StrictModel):
    """Defaults are the `fast` preset."""

    preset: Literal[tuple(PRESETS)] = Field("fast", description="named defaults: fast (CPU) or paper")  # type: ignore[valid-type]
    # model
    size: StrictInt = Field(128, ge=16, description="square input, pixels (frames are resized to size×size)")
    layers: LayerSpec = Field("1:8", description="VGG19 ReLU layers, 1-based inclusive range (paper: 1:12)")
    padding: Literal["reflect", "zero"] = Field(
        "reflect", description="backbone padding (paper Table V: zero padding raises border false alarms)"
    )
    align: Literal["bilinear", "nearest"] = Field(
        "bilinear", description="how feature maps are aligned: bilinear (reference code) or nearest (paper text)"
    )
    batchnorm: StrictBool = Field(False, description="BatchNorm in the CAE as in the reference code (folded at export)")
    latent: StrictInt = Field(0, ge=0, description="c_d; 0 = PCA at `pca_variance` explained variance")
    pca_variance: StrictFloat = Field(0.9, gt=0, lt=1, description="explained variance that chooses c_d")
    pca_samples: StrictInt = Field(
        20000, ge=1, description="regional vectors sampled across all training images for PCA"
    )
    # optimisation
    epochs: StrictInt = Field(8, ge=1, description="budget of passes over all training vectors")
    batch_vectors: StrictInt = Field(
        4096, ge=1, description="regional vectors per step (shuffled across images and positions)"
    )
    lr: StrictFloat = Field(1e-3, gt=0, description="Adam learning rate (the peak rate under a schedule)")
    lr_schedule: Literal["constant", "cosine", "onecycle"] = Field(
        "constant",
        description="learning rate over the epoch budget's steps: constant; cosine (from lr down to 0 at the last "
        "step); onecycle (linear warm-up from lr/25 over the first 10 % of steps, then cosine to 0). A schedule "
        "spans `epochs`, so a resumed run may not change `epochs` under it",
    )
    position_fraction: StrictFloat = Field(
        1.0,
        gt=0,
        le=1,
        description="share of each training image's regional positions used per epoch, drawn anew every epoch "
        "(seeded): neighbouring regional vectors are near-duplicates, so an epoch on a random share costs that "
        "share of the time for most of the progress; `epochs` and `patience` then count these shorter epochs",
    )
    snapshot_epochs: list[Annotated[StrictInt, Field(ge=1)]] = Field(
        default_factory=list,
        description="after each of these epochs also write an evaluable bundle (model.pt, metadata.json with the "
        "best weights so far, times and CPU seconds) to OUT/snapshots/epoch-NNN: quality against training budget "
        "from one run",
    )
    weight_decay: StrictFloat = Field(0.0, ge=0, description="Adam weight decay")
    patience: StrictInt = Field(3, ge=1, description="epochs without validation improvement before stopping")
    min_delta: StrictFloat = Field(1e-4, ge=0, description="relative improvement that counts")
    val_fraction: StrictFloat = Field(
        0.15, gt=0, lt=1, description="share of good images held out for early stopping (at least 1)"
    )
    seed: StrictInt = Field(0, ge=0, description="split, CAE init and shuffling")
    # resources
    extract_batch: StrictInt = Field(16, ge=1, description="images per backbone pass")
    cache_ram_mb: StrictInt = Field(
        4096, ge=0, description="features above this go to an on-disk cache in the output directory"
    )
    device: StrictStr = Field("", description='torch device; "" = cuda if available, else cpu')
    score: Literal["standardised_sq_error", "mean_sq_error"] = Field(
        "standardised_sq_error",
        description="per-region error: each channel's squared error over its training variance, or the paper's "
        "plain mean (see linewatch/training/model.py DFRConfig.score)",
    )

    def layer_list(self) -> list[int]:
        return parse_layers(self.layers)


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


def _checked(values: dict[str, Any], source: object) -> dict[str, Any]:
    """The given keys only, each checked and converted as in TrainSettings (the rest stay unset for merging)."""
    settings = validate(TrainSettings, values, source)
    return {key: getattr(settings, key) for key in values}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Checked key -> value mapping from a YAML training config."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a training config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        validate(TrainSettings, data, path)  # refuses it with the file's name and what it holds
    return _checked(data, path)


def resolve_settings(args, base: dict[str, Any] | None = None) -> TrainSettings:
    """Preset defaults < config file < command-line flags. The preset may come from the file or the flag.
    `base` (a bundle's recorded settings, `linewatch train --from`) takes the preset's place."""
    from_file = read_config_file(args.config) if getattr(args, "config", None) else {}
    flags = {key: getattr(args, flag) for flag, key in CLI_KEYS.items() if getattr(args, flag, None) is not None}
    flags = _checked(flags, "command line")
    preset = flags.get("preset") or from_file.get("preset") or (base or {}).get("preset") or "fast"
    start = PRESETS[preset] if base is None else base
    return validate(TrainSettings, {**start, **from_file, **flags, "preset": preset}, "training settings")


def describe(settings: TrainSettings) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.model_dump().items())
