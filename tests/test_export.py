"""Export: the fused graph against the torch model, through the real CLI, ONNX checker and ONNX Runtime.

Random-init backbones are enough for parity (same maths either way) and keep CI free of the 80 MB weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.cli import FP16_TOLERANCE, FP32_TOLERANCE, relative_map_error
from export.graph import FusedDFR
from export.synthetic import make_untrained_bundle
from linewatch import bundle
from linewatch.build.model import DFR, DFRConfig, load_model
from linewatch.build.weights import WeightsSource
from linewatch.engine import Engine


def frames_for(size: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    frames[0, : size // 2] = 128  # a flat half next to texture
    return frames


def torch_maps(bundle_dir, frames):
    with torch.inference_mode():
        amap, score = load_model(bundle_dir)(torch.from_numpy(frames))
    return amap.numpy(), score.numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """64² f_{1:9} (maps down to 8², coarser than the 16² grid) with BatchNorm, exported by the real CLI."""
    path = make_untrained_bundle(tmp_path_factory.mktemp("export") / "b", "1:9", 64, c_d=24, random_init=True,
                                 batchnorm=True, seed=3)
    result = subprocess.run([sys.executable, "-m", "linewatch.cli", "export", str(path), "--fp16"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "exported" in result.stdout
    return path


def test_graph_contract_and_metadata(exported):
    meta = bundle.read_metadata(exported)
    graph = meta["graph"]
    for key in ("file", "fp16_file"):
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
    assert graph["opset"] == 17 and graph["parity"]["max_rel_map_error"] <= FP32_TOLERANCE
    assert bundle.model_id(meta) == graph["sha256"][:12]


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


def test_fp16_graph_close_to_torch_model(exported):
    engine = Engine(exported, providers="cpu", fp16=True)
    frames = frames_for(64, 2, 21)
    ref_map, _ = torch_maps(exported, frames)
    maps, scores = engine.score(frames)
    assert maps.dtype == np.float32 and scores.dtype == np.float32
    assert relative_map_error(ref_map, maps) <= FP16_TOLERANCE


@pytest.mark.parametrize("convention,padding", [("torchvision", "reflect"), ("caffe", "zero")])
def test_fused_rewrites_are_exact_for_each_convention_and_padding(convention, padding):
    torch.manual_seed(0)
    config = DFRConfig(layers=[2, 5, 9], height=64, width=64, c_d=16, padding=padding)
    model = DFR(config, WeightsSource("random", None, None, convention)).eval()
    frames = torch.from_numpy(frames_for(64, 2, 31))
    with torch.inference_mode():
        model.config.feature_scale = float(model.extract(frames).pow(2).mean().rsqrt())  # as training sets it
        ref, _ = model(frames)
        fused, _ = FusedDFR(model)(frames)
    assert relative_map_error(ref.numpy(), fused.numpy()) <= 1e-5


def test_reexport_replaces_stale_fp16_graph_and_trt_cache(tmp_path):
    path = make_untrained_bundle(tmp_path / "b", "1:4", 32, c_d=8, random_init=True)
    from export.cli import export_bundle

    export_bundle(path, fp16=True)
    (path / "trt_cache").mkdir()
    (path / "trt_cache" / "old.engine").write_bytes(b"x")
    graph = export_bundle(path, fp16=False)
    assert "fp16_file" not in graph and not (path / bundle.GRAPH_FP16).exists()
    assert not (path / "trt_cache").exists()
    with pytest.raises(Exception, match="fp16"):
        Engine(path, fp16=True)


def test_export_without_checkpoint_names_the_file(tmp_path):
    path = make_untrained_bundle(tmp_path / "b", "1:4", 32, c_d=8, random_init=True)
    (path / bundle.CHECKPOINT).unlink()
    result = subprocess.run([sys.executable, "-m", "linewatch.cli", "export", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 3
    assert "model.pt" in result.stderr
    assert "graph" not in json.loads((path / bundle.METADATA).read_text())


def test_fp16_metrics_match_fp32_on_a_small_category(exported, tmp_path):
    """benchmarks/fp16_parity.py end to end: both graphs evaluated on an MVTec-layout set, metrics compared."""
    from tests.test_evaluate import make_category

    category = make_category(tmp_path / "cat", size=64, noise=20, defect_offset=60, seed=4)
    out = tmp_path / "parity.json"
    result = subprocess.run([sys.executable, "benchmarks/fp16_parity.py", str(exported), "--data", str(category),
                             "--provider", "cpu", "--json", str(out)], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    scopes = {r["scope"] for r in report["rows"]}
    assert scopes == {"overall", "big", "small"} and len(report["rows"]) == 9
    overall = [r for r in report["rows"] if r["scope"] == "overall"]
    assert all(r["diff"] <= 0.002 and r["tolerance"] == 0.002 for r in overall)
    assert 0 < overall[0]["fp32"] < 1  # a real ranking, not a degenerate all-equal map


def test_parity_tolerance_allows_one_image_pair_per_type_and_nothing_more():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from fp16_parity import compare

    def result(pixel, image_type):
        t = {"pixel_roc_auc": pixel, "pro_auc": 0.5, "image_roc_auc": image_type, "n_good": 15, "n_defect": 10}
        return {"overall": {**t, "image_roc_auc": 0.9, "n_defect": 50}, "per_type": {"stain": t}}

    assert compare(result(0.9, 0.4667), result(0.9, 0.4733))["ok"]  # one of 150 pairs swapped
    assert not compare(result(0.9, 0.4667), result(0.9, 0.4800))["ok"]  # two pairs
    assert not compare(result(0.9000, 0.5), result(0.9025, 0.5))["ok"]  # pixel metric: 0.002 holds
