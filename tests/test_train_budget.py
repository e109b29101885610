"""Training for a CPU budget: learning-rate schedules, a random share of positions per epoch, snapshots during a run
(and benchmarks/budget_curve.py, which scores them), all with real (tiny) training runs on real VGG19 weights."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from linewatch import bundle
from linewatch.demo.parts import make_parts
from linewatch.errors import ConfigError
from linewatch.evaluation.evaluate import evaluate_scorer
from linewatch.training.features import FeatureStore
from linewatch.training.model import TorchScorer, load_model
from linewatch.training.presets import TrainSettings, read_config_file
from linewatch.training.train import (
    TRAIN_STATE,
    check_resumable,
    epoch_batches,
    learning_rate,
    positions_used,
    snapshot_dir,
    steps_per_epoch,
    train,
)
from tests.test_evaluate import make_category
from tests.test_train import assert_same_cae

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(size=48, layers="1:2", epochs=3, patience=3, batch_vectors=128, seed=2)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("budget") / "good"
    folder.mkdir()
    for i, part in enumerate(make_parts(10, "train", 96, 0.0, seed=3)):
        cv2.imwrite(str(folder / f"{i:03d}.png"), part.image)
    return folder


# ---- learning-rate schedules -----------------------------------------------------------------------------------


@pytest.mark.unit
def test_learning_rate_schedules_span_the_budget():
    total = 1000
    lr = lambda schedule, step: learning_rate(TrainSettings(lr=2e-3, lr_schedule=schedule), step, total)  # noqa: E731
    assert all(lr("constant", s) == 2e-3 for s in (0, 500, 999))
    cosine = [lr("cosine", s) for s in range(total)]
    assert cosine[0] == 2e-3 and cosine[500] == pytest.approx(1e-3) and 0 < cosine[-1] < 1e-7
    assert all(a > b for a, b in zip(cosine, cosine[1:]))  # strictly decreasing
    one = [lr("onecycle", s) for s in range(total)]
    assert one[0] == pytest.approx(2e-3 / 25) and max(one) == pytest.approx(2e-3) and int(np.argmax(one)) == 100
    assert all(a < b for a, b in zip(one[:100], one[1:101])) and all(a > b for a, b in zip(one[100:], one[101:]))
    assert one[550] == pytest.approx(1e-3) and 0 < one[-1] < 1e-7


@pytest.mark.integration
def test_schedule_is_applied_and_a_scheduled_run_resumes_exactly(good, tmp_path, monkeypatch):
    import linewatch.training.train as train_module

    settings = TrainSettings(**TINY, lr_schedule="cosine")
    reference = train(settings, good, tmp_path / "uninterrupted")
    constant = train(TrainSettings(**TINY), good, tmp_path / "constant")
    assert reference["training"]["history"] != constant["training"]["history"]
    # the optimiser's last rate is the schedule's last step, not the peak
    state = torch.load(tmp_path / "uninterrupted" / TRAIN_STATE, map_location="cpu", weights_only=True)
    total = 3 * steps_per_epoch(FeatureStore(8, 12 * 12, 192, 1 << 30), 128, 8)  # 8 train images, 12² positions
    last = state["optimizer"]["param_groups"][0]["lr"]
    assert last == pytest.approx(learning_rate(settings, total - 1, total)) and last < settings.lr / 10

    real_save = train_module.save_train_state

    def save_then_interrupt(path, **kwargs):  # Ctrl-C right after epoch 1 was saved
        real_save(path, **kwargs)
        if kwargs["progress"].epoch == 1:
            raise KeyboardInterrupt

    out = tmp_path / "interrupted"
    monkeypatch.setattr(train_module, "save_train_state", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(settings, good, out)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="schedule .* spans its epoch budget; resume with --epochs 3"):
        train(settings.model_copy(update={"epochs": 5}), good, out, resume=True)
    meta = train(settings, good, out, resume=True)
    assert meta["training"]["history"] == reference["training"]["history"]
    assert_same_cae(tmp_path / "uninterrupted", out)


# ---- a random share of positions per epoch ---------------------------------------------------------------------


def labelled_store(n_images: int, positions: int, budget: int, path: Path) -> FeatureStore:
    """Each vector holds its own image and position index, so a batch says exactly which vectors it drew."""
    store = FeatureStore(n_images, positions, 3, budget, path, identity={"test": 1})
    for i in range(n_images):
        store.array[i, :, 0] = i
        store.array[i, :, 1] = np.arange(positions)
        store.array[i, :, 2] = 7
    return store


@pytest.mark.unit
@pytest.mark.parametrize("on_disk", [False, True])
def test_position_fraction_draws_a_fresh_seeded_share_of_every_image(tmp_path, on_disk):
    n_images, positions, fraction, batch = 6, 64, 0.25, 10
    store = labelled_store(n_images, positions, 0 if on_disk else 1 << 30, tmp_path / "f.f16")
    assert store.on_disk == on_disk
    block = 4 if on_disk else n_images  # on disk: two shuffling blocks of 4 and 2 images
    k = positions_used(positions, fraction)
    assert k == 16

    def epoch(generator):
        batches = [b.numpy() for b in epoch_batches(store, batch, generator, block, fraction)]
        assert len(batches) == steps_per_epoch(store, batch, block, fraction)
        return np.concatenate(batches)

    gen = torch.Generator().manual_seed(9)
    first, second = epoch(gen), epoch(gen)
    for drawn in (first, second):
        assert drawn.shape == (n_images * k, 3) and np.all(drawn[:, 2] == 7)  # real rows of the store
        pairs = {(int(i), int(p)) for i, p in drawn[:, :2]}
        assert len(pairs) == len(drawn)  # no vector twice in an epoch
        assert all(sum(1 for i, _ in pairs if i == img) == k for img in range(n_images))  # k of every image
    assert {tuple(r) for r in first[:, :2]} != {tuple(r) for r in second[:, :2]}  # a fresh share each epoch
    again = epoch(torch.Generator().manual_seed(9))
    assert np.array_equal(again, first)  # seeded
    whole = np.concatenate([b.numpy() for b in epoch_batches(store, batch, torch.Generator(), block)])
    assert len(whole) == n_images * positions  # the default still covers every vector
    assert positions_used(positions, 1e-9) == 1 and positions_used(positions, 1.0) == positions


@pytest.mark.integration
def test_training_on_a_share_of_positions_takes_fewer_steps(good, tmp_path):
    share = train(TrainSettings(**TINY, position_fraction=0.25), good, tmp_path / "share")
    full = train(TrainSettings(**TINY), good, tmp_path / "full")
    assert share["training"]["history"] != full["training"]["history"]
    assert np.isfinite(share["training"]["best_val_loss"])
    store = FeatureStore(8, 144, 192, 1 << 30)
    assert steps_per_epoch(store, 128, 8, 0.25) == math.ceil(8 * 36 / 128) < steps_per_epoch(store, 128, 8)
    with pytest.raises(ConfigError, match="position_fraction"):  # not a setting a resumed run may change
        train(TrainSettings(**TINY, position_fraction=0.5), good, tmp_path / "share", resume=True)
    bad = tmp_path / "bad.yaml"
    bad.write_text("position_fraction: 0\n")
    with pytest.raises(ConfigError, match="position_fraction"):
        read_config_file(bad)


# ---- snapshots ---------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_snapshots_are_the_bundles_a_shorter_budget_gives_and_leave_the_run_unchanged(good, tmp_path):
    out = tmp_path / "snap"
    meta = train(TrainSettings(**TINY, snapshot_epochs=[1, 2, 7]), good, out)
    two = train(TrainSettings(**{**TINY, "epochs": 2}), good, tmp_path / "two")
    three = train(TrainSettings(**TINY), good, tmp_path / "three")
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["epoch-001", "epoch-002"]  # 7 never ran
    assert_same_cae(snapshot_dir(out, 2), tmp_path / "two")  # what a 2-epoch budget ships
    assert_same_cae(out, tmp_path / "three")  # taking snapshots does not disturb the run
    assert meta["training"]["history"] == three["training"]["history"]
    snap = bundle.read_metadata(snapshot_dir(out, 2))["training"]
    assert snap["epochs"] == 2 and snap["best_val_loss"] == two["training"]["best_val_loss"]
    assert 0 < snap["fit_cpu_seconds"] <= snap["cpu_seconds"] and snap["cpu_seconds"] <= meta["training"]["cpu_seconds"]
    maps, scores = TorchScorer(load_model(snapshot_dir(out, 1))).score(np.full((2, 48, 48, 3), 90, np.uint8))
    assert maps.shape == (2, 48, 48) and np.isfinite(scores).all()
    # snapshot_epochs may change on resume
    meta = train(TrainSettings(**{**TINY, "epochs": 4, "snapshot_epochs": [4]}), good, out, resume=True)
    assert meta["training"]["epochs"] == 4 and (snapshot_dir(out, 4) / bundle.CHECKPOINT).is_file()


@pytest.mark.integration
def test_budget_curve_scores_each_snapshot_as_linewatch_eval_does(good, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import budget_curve

    out = tmp_path / "run"
    train(TrainSettings(**{**TINY, "size": 64, "snapshot_epochs": [1]}), good, out)
    category = make_category(tmp_path / "category", size=64, noise=20)
    rows = budget_curve.curve([out], [category])
    assert [(r["epochs"], r["final"]) for r in rows] == [(1, False), (3, True)]
    for row in rows:
        expected = evaluate_scorer(TorchScorer(load_model(row["bundle"])), category)["overall"]
        got = row["sets"][str(category)]
        for key in ("pixel_roc_auc", "pro_auc", "image_roc_auc"):
            assert got[key] == pytest.approx(expected[key], abs=1e-9), key
        assert row["cpu_min"] > 0 and row["val_loss"] > 0
    assert rows[0]["sets"][str(category)] != rows[1]["sets"][str(category)]  # the snapshots really differ
    table = budget_curve.markdown(rows, [category])
    assert table.count("\n") == 3 and "run (final)" in table
    last = snapshot_dir(out, 3)  # a snapshot of the final epoch holds the final bundle: it is scored once
    last.mkdir()
    for name in (bundle.CHECKPOINT, bundle.METADATA):
        (last / name).write_bytes((out / name).read_bytes())
    assert budget_curve.bundles_of(out) == [snapshot_dir(out, 1), last]
    sys.modules.pop("budget_curve", None)


@pytest.mark.unit
def test_a_state_saved_before_the_budget_settings_existed_resumes(tmp_path):
    saved = TrainSettings().model_dump()
    for key in ("lr_schedule", "position_fraction", "snapshot_epochs"):
        del saved[key]
    state = {"settings": saved, "dataset_sha256": "d"}
    check_resumable(state, TrainSettings(snapshot_epochs=[2]), "d", tmp_path / TRAIN_STATE)  # the old defaults
    for changed in ({"lr_schedule": "cosine"}, {"position_fraction": 0.5}):
        with pytest.raises(ConfigError, match=next(iter(changed))):
            check_resumable(state, TrainSettings(**changed), "d", tmp_path / TRAIN_STATE)
