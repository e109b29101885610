"""Recipes: the product variants a line runs, each with its own bundle, calibration, crops and golden set
(torch-free; docs/RECIPES.md).

Every recipe's model is loaded (engine built, warmed up, calibration checked) when the daemon starts or reloads,
so a changeover costs no load time: switching is one assignment the inference thread picks up at its next batch
(a batch is always judged by one model, hence one recipe). A recipe whose bundle or calibration fails to load is
kept with the reason and a switch to it is refused; the recipe running stays.

Recipe "default" is the config's `model` section with the cameras' own roi and ignore_mask, so a config without
`recipes` behaves as before and its results name recipe "default".
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from linewatch.errors import LinewatchError

if TYPE_CHECKING:
    from linewatch.line.config import Config
    from linewatch.line.inference import Model

log = logging.getLogger("linewatch.line.recipes")

DEFAULT = "default"

# (bundle, precision, require_calibration, reuse) -> Model: the daemon's load_model with its engine settings
Loader = Callable[[Path, str, bool, "Model | None"], "Model"]


class RecipeRefused(LinewatchError):
    """A switch that must not happen (unknown recipe, its model failed to load, golden set failed): the old
    recipe stays. `golden`: the golden report's summary when that was the reason."""

    def __init__(self, message: str, golden: dict[str, Any] | None = None):
        super().__init__(message)
        self.golden = golden


@dataclass(frozen=True)
class RecipeSpec:
    """One recipe as the config describes it."""

    name: str
    bundle: Path
    precision: str
    golden: Path | None
    rois: dict[str, tuple[int, ...]]
    ignore_masks: dict[str, Any]


def recipe_specs(cfg: Config) -> dict[str, RecipeSpec]:
    """'default' (the model section) first, then the config's recipes in their order."""
    specs = {DEFAULT: RecipeSpec(DEFAULT, cfg.model.bundle, cfg.model.precision, cfg.model.golden, {}, {})}
    for name, r in cfg.recipes.items():
        rois = {cam: c.roi for cam, c in r.cameras.items() if c.roi is not None}
        masks = {cam: c.ignore_mask for cam, c in r.cameras.items() if c.ignore_mask is not None}
        specs[name] = RecipeSpec(name, r.bundle, r.precision, r.golden, rois, masks)
    return specs


class RecipeBook:
    """Every recipe's model (or why it has none) and which one is active. Switching is the daemon's: it owns the
    inference worker and the golden gate; the book only says what can be switched to."""

    def __init__(self, specs: dict[str, RecipeSpec], models: dict[str, Model], errors: dict[str, str], active: str):
        self.specs = specs
        self.models = models
        self.errors = errors
        self.active = active
        self.load_s: dict[str, float] = {}  # seconds each model took to load (what preloading saves a switch)
        self.drift_plans: dict[str, Any] = {}  # the daemon's drift design per recipe, made at load, not at a switch

    @classmethod
    def load(
        cls,
        cfg: Config,
        loader: Loader,
        active: str,
        previous: RecipeBook | None = None,
        require_active_calibration: bool = False,
    ) -> RecipeBook:
        """Load every recipe. The active one must load (its error propagates; without
        `require_active_calibration` an uncalibrated bundle loads and judges every part ERROR, as a daemon without
        recipes always did); any other that fails is kept with its reason. `previous`: models to reuse when a
        recipe runs the same graph (a reload then costs no engine build)."""
        specs = recipe_specs(cfg)
        if active not in specs:
            raise RecipeRefused(f"unknown recipe {active!r} (known: {', '.join(specs)})")
        book = cls(specs, {}, {}, active)
        for name, spec in specs.items():
            reuse = None if previous is None else previous.models.get(name)
            t0 = time.monotonic()
            try:
                model = loader(spec.bundle, spec.precision, name != active or require_active_calibration, reuse)
            except LinewatchError as exc:
                if name == active:
                    raise
                book.errors[name] = f"recipe {name!r} cannot be used: {exc}"
                log.error("%s", book.errors[name])
                continue
            book.models[name] = dataclasses.replace(
                model, recipe=name, rois=dict(spec.rois), ignore_masks=dict(spec.ignore_masks)
            )
            book.load_s[name] = time.monotonic() - t0
            log.info(
                "recipe %s: model %s, calibration %s, loaded in %.3f s%s",
                name,
                model.model_id,
                model.calibration_version,
                book.load_s[name],
                "" if spec.golden is None else f", golden set {spec.golden}",
            )
        return book

    def get(self, name: str) -> Model:
        """The preloaded model of a recipe; RecipeRefused (with the reason) when there is none."""
        if name not in self.specs:
            raise RecipeRefused(f"unknown recipe {name!r} (known: {', '.join(self.specs)})")
        if name in self.errors:
            raise RecipeRefused(self.errors[name])
        return self.models[name]

    def golden(self, name: str) -> Path | None:
        return self.specs[name].golden

    def summary(self) -> dict[str, Any]:
        """For the status topic: the active recipe, the ones that can be switched to, the ones that cannot."""
        return {
            "active": self.active,
            "available": [n for n in self.specs if n in self.models],
            "unavailable": dict(self.errors),
        }
