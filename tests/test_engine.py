"""Engine tests on a real ONNX bundle and corrupted copies of it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from linewatch import bundle
from linewatch.errors import BundleError, ConfigError, DataError
from linewatch.line.engine import CPU, Engine, parse_providers
from tests.bundles import deviation_graph, grey_frame


@pytest.fixture
def bundle_copy(deviation_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(deviation_bundle, dst)
    return dst


def _edit_metadata(path, edit):
    meta = json.loads((path / bundle.METADATA).read_text())
    edit(meta)
    (path / bundle.METADATA).write_text(json.dumps(meta))


@pytest.mark.integration
def test_scores_frames_with_the_bundle_graph(deviation_bundle):
    engine = Engine(deviation_bundle, providers="cpu", threads=1)
    assert engine.input_size == (64, 64)
    assert engine.providers == [CPU]
    assert engine.model_id == engine.metadata["graph"]["sha256"][:12]
    frames = np.stack([grey_frame(level=128), grey_frame(level=128), grey_frame(level=128)])
    frames[1, 10:20, 30:40] = 255
    frames[2] = 1
    maps, scores = engine.score(frames)
    assert maps.dtype == np.float32 and maps.shape == (3, 64, 64)
    assert scores.dtype == np.float32 and scores.shape == (3,)
    expected = np.abs(frames.astype(np.float32).mean(axis=3) - 128) / 127
    np.testing.assert_allclose(maps, expected, atol=1e-6)
    np.testing.assert_allclose(scores, expected.reshape(3, -1).max(axis=1), atol=1e-6)
    assert scores[0] == 0 and scores[1] == pytest.approx(1.0) and maps[1, 0, 0] == 0


@pytest.mark.integration
def test_auto_reports_only_providers_that_really_loaded(deviation_bundle):
    engine = Engine(deviation_bundle)  # this CI machine lists GPU providers whose libraries are absent
    assert engine.providers == engine.session.get_providers()
    assert engine.providers[-1] == CPU
    maps, _ = engine.score(grey_frame()[None])
    assert maps.shape == (1, 64, 64)


@pytest.mark.integration
def test_rejects_frames_of_wrong_shape_or_dtype(deviation_bundle):
    engine = Engine(deviation_bundle, providers="cpu")
    for bad in (
        grey_frame(),
        np.zeros((1, 32, 64, 3), np.uint8),
        np.zeros((1, 64, 64, 3), np.float32),
        np.zeros((0, 64, 64, 3), np.uint8),
        [[0]],
    ):
        with pytest.raises(DataError, match="64×64×3"):
            engine.score(bad)


@pytest.mark.unit
def test_unknown_provider_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown provider 'tpu'"):
        parse_providers("cpu,tpu")
    assert parse_providers("trt, cpu") == (["TensorrtExecutionProvider", CPU], True)


@pytest.mark.integration
def test_missing_bundle_dir(tmp_path):
    with pytest.raises(BundleError, match="not found: .*nowhere"):
        Engine(tmp_path / "nowhere")


@pytest.mark.integration
def test_missing_metadata(bundle_copy):
    (bundle_copy / bundle.METADATA).unlink()
    with pytest.raises(BundleError, match="metadata.json"):
        Engine(bundle_copy)


@pytest.mark.integration
def test_missing_graph_file(bundle_copy):
    (bundle_copy / bundle.GRAPH).unlink()
    with pytest.raises(BundleError, match="model.onnx"):
        Engine(bundle_copy)


@pytest.mark.integration
def test_not_exported_bundle(bundle_copy):
    _edit_metadata(bundle_copy, lambda m: m.pop("graph"))
    with pytest.raises(BundleError, match="linewatch export"):
        Engine(bundle_copy)


@pytest.mark.integration
def test_missing_reduced_precision_graphs_name_the_export_flag(bundle_copy):
    with pytest.raises(BundleError, match="linewatch export --fp16"):
        Engine(bundle_copy, precision="fp16")
    with pytest.raises(BundleError, match="linewatch export --int8"):
        Engine(bundle_copy, precision="int8")
    with pytest.raises(ConfigError, match="unknown precision 'int4'"):
        Engine(bundle_copy, precision="int4")


@pytest.mark.integration
def test_graph_hash_mismatch(bundle_copy):
    path = bundle_copy / bundle.GRAPH
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.onnx: sha256 .* does not match"):
        Engine(bundle_copy)


@pytest.mark.integration
def test_graph_that_fails_to_load(bundle_copy):
    path = bundle_copy / bundle.GRAPH
    path.write_bytes(b"this is not a protobuf" * 10)
    _edit_metadata(bundle_copy, lambda m: m["graph"].update(sha256=bundle.sha256_file(path)))
    with pytest.raises(BundleError, match="model.onnx: ONNX Runtime cannot load"):
        Engine(bundle_copy)


@pytest.mark.integration
def test_graph_input_size_differs_from_metadata(bundle_copy):
    path = bundle_copy / bundle.GRAPH
    onnx.save(deviation_graph(32, 64), str(path))
    _edit_metadata(bundle_copy, lambda m: m["graph"].update(sha256=bundle.sha256_file(path)))
    with pytest.raises(BundleError, match=r"model.onnx: input shape .* does not match .*metadata.json.* 64x64"):
        Engine(bundle_copy)


@pytest.mark.integration
def test_explicit_gpu_provider_never_falls_back_silently(deviation_bundle):
    try:
        engine = Engine(deviation_bundle, providers="cuda")
    except ConfigError as exc:  # no usable CUDA libraries (as on CI): a clear error, never a silent CPU engine
        assert "CUDAExecutionProvider" in str(exc) and "could not load" in str(exc)
    else:
        assert engine.providers[0] == "CUDAExecutionProvider"
        maps, _ = engine.score(grey_frame()[None])
        assert maps.shape == (1, 64, 64)


@pytest.mark.unit
def test_tensorrt_caches_go_where_the_daemon_may_write(tmp_path, monkeypatch):
    """Under systemd the bundle is read-only: engines are cached in the state directory, one folder per graph."""
    from linewatch.line.config import load_config
    from linewatch.line.daemon import trt_cache_dir
    from linewatch.line.engine import TENSORRT, provider_options

    bundle_dir = tmp_path / "bundle"
    bundle_dir.mkdir()
    (tmp_path / "lw.yaml").write_text("model: {bundle: bundle}\ncameras: [{name: c, kind: device, source: 0}]\n")
    cfg = load_config(tmp_path / "lw.yaml")
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    assert trt_cache_dir(cfg) is None  # by hand: inside the bundle, as before
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path / 'state'}:{tmp_path / 'other'}")
    assert trt_cache_dir(cfg) == tmp_path / "state" / "trt_cache"
    explicit = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"trt_cache_dir": tmp_path / "c"})})
    assert trt_cache_dir(explicit) == tmp_path / "c"
    options = provider_options(TENSORRT, bundle_dir, "fp16", (64, 64), 8, tmp_path / "state" / "trt_cache" / "m-fp16")
    assert options["trt_engine_cache_path"] == str(tmp_path / "state" / "trt_cache" / "m-fp16")
    assert (tmp_path / "state" / "trt_cache" / "m-fp16").is_dir() and not (bundle_dir / "trt_cache").exists()
