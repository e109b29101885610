"""Export: the fused graph against the torch model, through the real CLI, ONNX checker and ONNX Runtime.

Random-init backbones are enough for parity (same maths either way) and keep CI free of the 80 MB weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch

from linewatch import bundle
from linewatch.export.cli import (
    FP16_TOLERANCE,
    FP32_TOLERANCE,
    INT8_MIN_CORRELATION,
    relative_map_error,
)
from linewatch.export.graph import FusedDFR
from linewatch.export.quantize import QUANTISED_PREFIXES
from linewatch.export.reference import NaiveDFR
from linewatch.export.synthetic import make_untrained_bundle
from linewatch.line.engine import Engine
from linewatch.training.model import DFR, DFRConfig, load_model
from linewatch.training.weights import WeightsSource


def frames_for(size: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    frames[0, : size // 2] = 128  # a flat half next to texture
    return frames


def torch_maps(bundle_dir, frames):
    with torch.inference_mode():
        amap, score = load_model(bundle_dir)(torch.from_numpy(frames))
    return amap.numpy(), score.numpy()


def good_parts(n: int, size: int, seed: int) -> np.ndarray:
    """Mid-grey parts with noise, as tests.test_evaluate.make_category draws its good images."""
    rng = np.random.default_rng(seed)
    grey = np.clip(128 + rng.integers(-20, 21, (n, size, size)), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=3)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """64² f_{1:9} (maps down to 8², coarser than the 16² grid) with BatchNorm, exported by the real CLI, with
    fp16 and int8 graphs (int8 ranges from 8 good images on disk)."""
    root = tmp_path_factory.mktemp("export")
    good = root / "good"
    good.mkdir()
    for i, img in enumerate(good_parts(8, 64, seed=5)):
        assert cv2.imwrite(str(good / f"{i:03d}.png"), img)
    path = make_untrained_bundle(root / "b", "1:9", 64, c_d=24, random_init=True, batchnorm=True, seed=3)
    result = subprocess.run(
        [sys.executable, "-m", "linewatch.cli", "export", str(path), "--fp16", "--int8", "--calib-data", str(good)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "exported" in result.stdout and "model_int8.onnx" in result.stdout
    return path


@pytest.mark.e2e
def test_graph_contract_and_metadata(exported):
    meta = bundle.read_metadata(exported)
    graph = meta["graph"]
    for key in ("file", "fp16_file", "int8_file"):
        path = exported / graph[key]
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        (inp,) = model.graph.input
        dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
        assert inp.name == "frames" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
        assert dims == ["N", 64, 64, 3]
        outs = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
        assert outs == {"anomaly_map": onnx.TensorProto.FLOAT, "image_score": onnx.TensorProto.FLOAT}
        assert not {n.op_type for n in model.graph.node} & {"BatchNormalization", "Greater", "Less", "Where"}
    assert graph["sha256"] == bundle.sha256_file(exported / graph["file"])
    assert graph["fp16_sha256"] == bundle.sha256_file(exported / graph["fp16_file"])
    assert graph["int8_sha256"] == bundle.sha256_file(exported / graph["int8_file"])
    assert graph["int8_calibration_images"] == 6 and graph["int8_check"]["frames"] == 2  # every 4th held out
    assert graph["opset"] == 17 and graph["parity"]["max_rel_map_error"] <= FP32_TOLERANCE
    assert bundle.model_id(meta) == graph["sha256"][:12]


@pytest.mark.e2e
def test_fp32_graph_matches_torch_model_at_any_batch_size(exported):
    engine = Engine(exported, providers="cpu", threads=1)
    for n, seed in ((1, 11), (3, 12)):
        frames = frames_for(64, n, seed)
        ref_map, ref_score = torch_maps(exported, frames)
        maps, scores = engine.score(frames)
        assert maps.shape == (n, 64, 64) and scores.shape == (n,)
        assert relative_map_error(ref_map, maps) <= FP32_TOLERANCE
        np.testing.assert_allclose(scores, maps.reshape(n, -1).max(axis=1), rtol=1e-6)
        np.testing.assert_allclose(scores, ref_score, rtol=1e-4)
        assert ref_map.max() - ref_map.min() > 0  # the comparison is not between two constant maps


@pytest.mark.e2e
def test_fp16_graph_close_to_torch_model(exported):
    engine = Engine(exported, providers="cpu", precision="fp16")
    frames = frames_for(64, 2, 21)
    ref_map, _ = torch_maps(exported, frames)
    maps, scores = engine.score(frames)
    assert maps.dtype == np.float32 and scores.dtype == np.float32
    assert relative_map_error(ref_map, maps) <= FP16_TOLERANCE


@pytest.mark.e2e
def test_int8_graph_quantises_the_heavy_convolutions_and_tracks_the_torch_model(exported):
    model = onnx.load(str(exported / bundle.GRAPH_INT8))
    ops = [n.op_type for n in model.graph.node]
    fp32_convs = [n.name for n in onnx.load(str(exported / bundle.GRAPH)).graph.node if n.op_type == "Conv"]
    quantised = [n for n in fp32_convs if n.startswith(QUANTISED_PREFIXES)]
    assert len(quantised) == 2 + 1  # the CAE's first layer (fine + coarse part) and its last layer
    dequantised = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    weights = {i.name: i for i in model.graph.initializer}
    vgg = [n for n in model.graph.node if n.op_type == "Conv" and n.name.startswith("/body.")]
    assert len(vgg) == 9 and all(weights[n.input[1]].data_type == onnx.TensorProto.FLOAT for n in vgg)
    int8_weights = [w for w in dequantised if w in weights and weights[w].data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) == len(quantised)  # each quantised conv's weights stored as int8
    assert ops.count("QuantizeLinear") >= len(quantised)
    engine = Engine(exported, providers="cpu", precision="int8")
    frames = good_parts(3, 64, seed=9)  # good parts it was not calibrated on
    ref_map, _ = torch_maps(exported, frames)
    maps, scores = engine.score(frames)
    assert maps.dtype == np.float32 and maps.shape == ref_map.shape
    assert np.corrcoef(ref_map.ravel(), maps.ravel())[0, 1] >= INT8_MIN_CORRELATION
    assert 0 < relative_map_error(ref_map, maps) < 0.5  # quantised for real, yet the same map
    check = bundle.read_metadata(exported)["graph"]["int8_check"]
    assert check["map_correlation"] >= check["min_correlation"] == INT8_MIN_CORRELATION


@pytest.mark.e2e
def test_int8_export_without_good_images_says_how_to_give_them(tmp_path):
    path = make_untrained_bundle(tmp_path / "b", "1:4", 32, c_d=8, random_init=True)
    result = subprocess.run(
        [sys.executable, "-m", "linewatch.cli", "export", str(path), "--int8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "--calib-data" in result.stderr
    few = tmp_path / "few"
    few.mkdir()
    for i, img in enumerate(good_parts(2, 32, seed=1)):
        cv2.imwrite(str(few / f"{i}.png"), img)
    result = subprocess.run(
        [sys.executable, "-m", "linewatch.cli", "export", str(path), "--int8", "--calib-data", str(few)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "at least 4 good images" in result.stderr and str(few) in result.stderr
    assert not (path / bundle.GRAPH_INT8).exists()


@pytest.mark.e2e
def test_calibration_binds_to_the_graph_precision_it_was_set_with(exported, tmp_path):
    import shutil

    from linewatch.calibrate.store import load_calibration, write_calibration
    from linewatch.line.inference import load_model as load_runtime_model

    model = tmp_path / "m"
    shutil.copytree(exported, model)
    cal = write_calibration(model, 0.5, precision="int8")
    assert cal.model_sha256 == bundle.read_metadata(model)["graph"]["int8_sha256"]
    assert load_calibration(model, "int8").pixel_threshold == 0.5
    with pytest.raises(Exception, match=r"set with the bundle's int8 graph.*runs its fp32 graph.*--precision fp32"):
        load_calibration(model, "fp32")
    runtime = load_runtime_model(model, ("cpu",), precision="fp32")
    assert runtime.calibration is None and "int8" in runtime.uncalibrated_reason  # every result ERROR, not OK
    assert load_runtime_model(model, ("cpu",), precision="int8").calibration.pixel_threshold == 0.5


@pytest.mark.integration
@pytest.mark.parametrize(
    "convention,padding,score",
    [
        ("torchvision", "reflect", "mean_sq_error"),
        ("caffe", "zero", "mean_sq_error"),
        ("caffe", "reflect", "standardised_sq_error"),
    ],
)
def test_fused_rewrites_are_exact_for_each_convention_and_padding(convention, padding, score):
    torch.manual_seed(0)
    config = DFRConfig(layers=[2, 5, 9], height=64, width=64, c_d=16, padding=padding, score=score)
    model = DFR(config, WeightsSource("random", None, None, convention)).eval()
    model.error_weight.uniform_(0.1, 50.0)  # ignored by the plain score, folded into the fused graph otherwise
    frames = torch.from_numpy(frames_for(64, 2, 31))
    with torch.inference_mode():
        model.config.feature_scale = float(model.extract(frames).pow(2).mean().rsqrt())  # as training sets it
        ref, _ = model(frames)
        fused, _ = FusedDFR(model)(frames)
        naive, _ = NaiveDFR(model)(frames)
        feats = model.extract(frames)
        plain, scored = (feats - model.cae(feats)).pow(2).mean(1), model.region_error(feats)
    assert relative_map_error(ref.numpy(), fused.numpy()) <= 1e-5
    assert relative_map_error(ref.numpy(), naive.numpy()) <= 1e-5
    assert (score != "mean_sq_error") == (relative_map_error(plain.numpy(), scored.numpy()) > 0.01)


@pytest.mark.integration
def test_reexport_replaces_stale_fp16_graph_and_trt_cache(tmp_path):
    path = make_untrained_bundle(tmp_path / "b", "1:4", 32, c_d=8, random_init=True)
    from linewatch.export.cli import export_bundle

    export_bundle(path, fp16=True)
    for i, img in enumerate(good_parts(4, 32, seed=2)):
        cv2.imwrite(str(path / f"good{i}.png"), img)
    export_bundle(path, int8=True, calib_data=path)
    assert (path / bundle.GRAPH_INT8).exists() and not (path / bundle.GRAPH_FP16).exists()
    (path / "trt_cache").mkdir()
    (path / "trt_cache" / "old.engine").write_bytes(b"x")
    graph = export_bundle(path, fp16=False)
    assert "fp16_file" not in graph and not (path / bundle.GRAPH_FP16).exists()
    assert "int8_file" not in graph and not (path / bundle.GRAPH_INT8).exists()
    assert not (path / "trt_cache").exists()
    with pytest.raises(Exception, match="fp16"):
        Engine(path, precision="fp16")
    with pytest.raises(Exception, match="linewatch export --int8"):
        Engine(path, precision="int8")


@pytest.mark.e2e
def test_export_without_checkpoint_names_the_file(tmp_path):
    path = make_untrained_bundle(tmp_path / "b", "1:4", 32, c_d=8, random_init=True)
    (path / bundle.CHECKPOINT).unlink()
    result = subprocess.run(
        [sys.executable, "-m", "linewatch.cli", "export", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 3
    assert "model.pt" in result.stderr
    assert "graph" not in json.loads((path / bundle.METADATA).read_text())


@pytest.mark.e2e
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_metrics_match_fp32_on_a_small_category(exported, tmp_path, precision):
    """benchmarks/precision_parity.py end to end: both graphs evaluated on an MVTec-layout set, metrics compared."""
    from tests.test_evaluate import make_category

    category = make_category(tmp_path / "cat", size=64, noise=20, defect_offset=60, seed=4)
    out = tmp_path / "parity.json"
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/precision_parity.py",
            str(exported),
            "--data",
            str(category),
            "--precision",
            precision,
            "--provider",
            "cpu",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["precision"] == precision
    scopes = {r["scope"] for r in report["rows"]}
    assert scopes == {"overall", "big", "small"} and len(report["rows"]) == 9
    overall = [r for r in report["rows"] if r["scope"] == "overall"]
    assert all(r["diff"] <= 0.002 and r["tolerance"] == 0.002 for r in overall)
    assert 0 < overall[0]["fp32"] < 1  # a real ranking, not a degenerate all-equal map


@pytest.mark.unit
def test_parity_tolerance_allows_one_image_pair_per_type_and_nothing_more():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from precision_parity import compare

    def result(pixel, image_type):
        t = {"pixel_roc_auc": pixel, "pro_auc": 0.5, "image_roc_auc": image_type, "n_good": 15, "n_defect": 10}
        return {"overall": {**t, "image_roc_auc": 0.9, "n_defect": 50}, "per_type": {"stain": t}}

    assert compare(result(0.9, 0.4667), result(0.9, 0.4733))["ok"]  # one of 150 pairs swapped
    assert not compare(result(0.9, 0.4667), result(0.9, 0.4800))["ok"]  # two pairs
    assert not compare(result(0.9000, 0.5), result(0.9025, 0.5))["ok"]  # pixel metric: 0.002 holds


@pytest.mark.e2e
def test_calibrate_cli_scores_with_the_precision_it_is_given(exported, tmp_path):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(exported, model)
    good = tmp_path / "good"
    good.mkdir()
    for i, img in enumerate(good_parts(12, 64, seed=13)):
        cv2.imwrite(str(good / f"{i:03d}.png"), img)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "linewatch.cli",
            "calibrate",
            str(model),
            "--good",
            str(good),
            "--fpr",
            "0.05",
            "--precision",
            "int8",
            "--json",
            "-",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    graph = bundle.read_metadata(model)["graph"]
    assert report["calibration"]["model_sha256"] == graph["int8_sha256"] != graph["sha256"]
    assert report["calibration"]["settings"]["precision"] == "int8"


@pytest.mark.e2e
def test_eval_cli_scores_with_the_int8_graph_when_asked(exported, tmp_path):
    from tests.test_evaluate import make_category

    category = make_category(tmp_path / "cat", size=64, noise=20, defect_offset=60, seed=4)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "linewatch.cli",
            "eval",
            str(exported),
            "--data",
            str(category),
            "--precision",
            "int8",
            "--json",
            "-",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["backend"] == "onnx" and report["precision"] == "int8" and "(onnx int8," in result.stderr
    assert 0.5 < report["overall"]["pixel_roc_auc"] <= 1.0
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "linewatch.cli",
            "eval",
            str(exported),
            "--data",
            str(category),
            "--precision",
            "int8",
            "--backend",
            "torch",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode != 0 and "--backend onnx" in refused.stderr
