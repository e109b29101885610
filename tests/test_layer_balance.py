"""Layer-balanced score (issue 15): every tapped VGG layer an equal share of the anomaly score. The torch model, the
fused graph and the naive reference agree; `linewatch export --no-layer-balance` gives back the channel-equal
score; checkpoints and graphs from before the setting keep theirs; new training records it."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from linewatch import bundle
from linewatch.errors import BundleError
from linewatch.export.cli import FP16_TOLERANCE, FP32_TOLERANCE, export_bundle, relative_map_error
from linewatch.export.graph import FusedDFR
from linewatch.export.reference import NaiveDFR
from linewatch.export.synthetic import make_untrained_bundle
from linewatch.line.engine import Engine
from linewatch.training.backbone import CHANNELS
from linewatch.training.model import DFR, LAYER_BALANCED, DFRConfig, load_model
from linewatch.training.weights import WeightsSource


def frames_for(size: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    frames[0, : size // 2] = 128  # a flat half next to texture
    return frames


def maps_by_hand(model: DFR, frames: np.ndarray, balanced: bool) -> np.ndarray:
    """The score computed here from its definition: the weighted squared error's mean over each layer's channels,
    then over layers (balanced) or over all channels at once (channel-equal), upsampled bilinearly."""
    with torch.inference_mode():
        feats = model.extract(torch.from_numpy(frames))
        sq = (feats - model.cae(feats)).pow(2) * model.error_weight.view(1, -1, 1, 1)
        if balanced:
            parts = torch.split(sq, [CHANNELS[n - 1] for n in model.config.layers], dim=1)
            err = torch.stack([p.mean(dim=1) for p in parts]).mean(dim=0)
        else:
            err = sq.mean(dim=1)
        size = (model.config.height, model.config.width)
        return F.interpolate(err.unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0].numpy()


def export_cli(path, *args: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "linewatch.cli", "export", str(path), *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return bundle.read_metadata(path)["graph"]


def standardised(path) -> None:
    """Give an untrained bundle the standardised score with uneven channel variances, as training would."""
    payload = torch.load(path / bundle.CHECKPOINT, weights_only=True)
    payload["config"]["score"] = "standardised_sq_error"
    payload["error_weight"] = torch.linspace(0.2, 5.0, payload["error_weight"].numel())
    torch.save(payload, path / bundle.CHECKPOINT)


@pytest.mark.unit
@pytest.mark.parametrize("padding", ["reflect", "zero"])
def test_fused_and_naive_layer_balanced_score_agree_with_the_definition(padding):
    torch.manual_seed(0)
    config = DFRConfig(layers=[2, 5, 9], height=64, width=64, c_d=16, padding=padding, score="standardised_sq_error")
    config.layer_balanced = True
    model = DFR(config, WeightsSource("random", None, None, "caffe")).eval()
    model.error_weight.uniform_(0.1, 50.0)
    frames = frames_for(64, 2, 31)
    x = torch.from_numpy(frames)
    with torch.inference_mode():
        model.config.feature_scale = float(model.extract(x).pow(2).mean().rsqrt())
        ref, ref_score = model(x)
        fused, _ = FusedDFR(model)(x)
        naive, _ = NaiveDFR(model)(x)
    by_hand = maps_by_hand(model, frames, balanced=True)
    assert relative_map_error(by_hand, ref.numpy()) <= 1e-5
    assert relative_map_error(ref.numpy(), fused.numpy()) <= 1e-5
    assert relative_map_error(ref.numpy(), naive.numpy()) <= 1e-5
    assert relative_map_error(maps_by_hand(model, frames, balanced=False), ref.numpy()) > 0.05  # it does change
    torch.testing.assert_close(ref_score, ref.flatten(1).amax(1))


@pytest.mark.e2e
def test_export_flag_chooses_the_weighting_graph_and_torch_agree_and_no_flag_restores_the_old_score(tmp_path):
    path = make_untrained_bundle(tmp_path / "b", "1:9", 64, c_d=16, random_init=True, seed=3)
    standardised(path)
    frames = frames_for(64, 3, 7)

    graph = export_cli(path, "--layer-balance", "--fp16")
    assert graph["layer_balanced"] is True
    model = load_model(path)  # follows the graph
    assert model.config.layer_balanced is True
    with torch.inference_mode():
        torch_map, torch_score = (t.numpy() for t in model(torch.from_numpy(frames)))
    balanced, scores = Engine(path, providers="cpu").score(frames)
    assert relative_map_error(torch_map, balanced) <= FP32_TOLERANCE
    assert relative_map_error(maps_by_hand(model, frames, balanced=True), balanced) <= FP32_TOLERANCE
    np.testing.assert_allclose(scores, torch_score, rtol=1e-4)
    fp16 = Engine(path, providers="cpu", precision="fp16").score(frames)[0]
    assert relative_map_error(torch_map, fp16) <= FP16_TOLERANCE
    channel_equal = maps_by_hand(model, frames, balanced=False)
    assert relative_map_error(channel_equal, balanced) > 0.05

    graph = export_cli(path, "--no-layer-balance")
    assert graph["layer_balanced"] is False and "fp16_file" not in graph
    restored, scores = Engine(path, providers="cpu").score(frames)
    assert relative_map_error(channel_equal, restored) <= FP32_TOLERANCE
    np.testing.assert_allclose(scores, channel_equal.reshape(3, -1).max(axis=1), rtol=1e-4)
    assert load_model(path).config.layer_balanced is False


@pytest.mark.integration
def test_checkpoints_and_graphs_from_before_the_setting_keep_the_channel_equal_score(tmp_path):
    path = make_untrained_bundle(tmp_path / "b", "1:4", 32, c_d=8, random_init=True)
    payload = torch.load(path / bundle.CHECKPOINT, weights_only=True)
    payload["config"].pop("layer_balanced", None)  # as written before the setting existed
    torch.save(payload, path / bundle.CHECKPOINT)
    assert load_model(path).config.layer_balanced is False
    assert export_bundle(path)["layer_balanced"] is False

    payload["config"]["layer_balanced"] = True
    torch.save(payload, path / bundle.CHECKPOINT)
    meta = bundle.read_metadata(path)
    del meta["graph"]["layer_balanced"]  # a graph exported before the setting: channel-equal, whatever the checkpoint
    bundle.write_metadata(path, meta)
    assert load_model(path).config.layer_balanced is False
    assert load_model(path, follow_graph=False).config.layer_balanced is True
    meta["graph"]["layer_balanced"] = "yes"
    bundle.write_metadata(path, meta)
    with pytest.raises(BundleError, match="graph.layer_balanced"):
        load_model(path)


@pytest.mark.e2e
def test_training_records_the_shipped_weighting_and_export_uses_it(tmp_path):
    data = tmp_path / "good"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        assert cv2.imwrite(str(data / f"{i}.png"), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    out = tmp_path / "b"
    args = ["train", "--data", str(data), "--out", str(out), "--random-init", "--size", "64", "--layers", "1:2"]
    result = subprocess.run([sys.executable, "-m", "linewatch.cli", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert LAYER_BALANCED is True
    assert bundle.read_metadata(out)["dfr"]["layer_balanced"] is True
    assert load_model(out).config.layer_balanced is True
    assert export_cli(out)["layer_balanced"] is True
    assert json.loads((out / bundle.METADATA).read_text())["graph"]["layer_balanced"] is True


@pytest.mark.integration
def test_map_variants_base_and_lb_recipes_reproduce_linewatch_eval(tmp_path):
    """benchmarks/map_variants.py's cached grids give `linewatch eval`'s numbers for both weightings."""
    from linewatch.evaluation.evaluate import evaluate_scorer
    from linewatch.training.model import TorchScorer
    from tests.test_evaluate import make_category

    data = make_category(tmp_path / "cat", size=64, noise=10)
    path = make_untrained_bundle(tmp_path / "b", "1:9", 64, c_d=16, random_init=True, seed=2)
    standardised(path)
    script = [sys.executable, "benchmarks/map_variants.py"]
    cache, out = tmp_path / "c.npz", tmp_path / "valset-cat.json"
    for args in (
        ["collect", str(path), "--data", str(data), "--out", str(cache), "--views", "id,half"],
        ["score", str(cache), "--data", str(data), "--recipes", "base,lb,mr,s1", "--json", str(out)],
    ):
        proc = subprocess.run([*script, *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    model = load_model(path)
    for recipe, balanced in (("base", False), ("lb", True)):
        model.config.layer_balanced = balanced
        want = evaluate_scorer(TorchScorer(model), data)
        for key in ("pixel_roc_auc", "pro_auc", "image_roc_auc"):
            assert got[recipe]["overall"][key] == pytest.approx(want["overall"][key], abs=1e-6), (recipe, key)
    assert got["base"]["overall"]["pro_auc"] != got["lb"]["overall"]["pro_auc"]
