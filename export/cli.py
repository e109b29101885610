"""`linewatch export MODEL_DIR`: write the fused graph(s) into the bundle, prove parity, record them in metadata."""

from __future__ import annotations

import datetime as _dt
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from linewatch import bundle
from linewatch.errors import BundleError
from linewatch.export.graph import FusedDFR
from linewatch.export.onnx_graph import convert_fp16, export_onnx
from linewatch.export.quantize import good_frames, quantise_int8
from linewatch.line.engine import TRT_CACHE_DIR
from linewatch.training.model import DFR, load_model

log = logging.getLogger("linewatch.export")

FP32_TOLERANCE = 1e-4  # max |map difference| / map range of the fp32 graph vs the torch model
# fp16 graph vs the float32 torch model on random frames; ranking metrics are checked on the dev benchmark
# with benchmarks/precision_parity.py (within 0.002 of fp32)
FP16_TOLERANCE = 2e-2
# int8 graph vs the float32 torch model on held-out good images: quantisation moves single pixels by a few per cent
# of the range (brick, paper settings: ~1 %, map correlation 0.9996-0.99995), so the check is on correlation; the
# ranking metrics are checked on the dev benchmark with benchmarks/precision_parity.py --precision int8
INT8_MIN_CORRELATION = 0.98


def parity_frames(height: int, width: int, n: int = 2, seed: int = 0) -> np.ndarray:
    """Noise frames plus a smooth gradient: both textures and flat areas, deterministic."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (n, height, width, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    frames[-1] = np.broadcast_to(ramp, (height, width, 3)).astype(np.uint8)
    return frames


def relative_map_error(reference: np.ndarray, other: np.ndarray) -> float:
    """max |difference| of anomaly maps relative to the reference maps' range."""
    span = float(reference.max() - reference.min())
    return float(np.abs(reference - other).max()) / (span if span > 0 else 1.0)


def onnx_maps(path: Path, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return tuple(sess.run([bundle.OUTPUT_MAP, bundle.OUTPUT_SCORE], {bundle.INPUT_NAME: frames}))


def torch_and_graph(model: DFR, path: Path, frames: np.ndarray) -> tuple[np.ndarray, ...]:
    """(torch maps, torch scores, graph maps, graph scores) for the same frames."""
    with torch.inference_mode():
        ref_map, ref_score = (t.numpy() for t in model(torch.from_numpy(frames)))
    return (ref_map, ref_score, *onnx_maps(path, frames))


def check_parity(model: DFR, path: Path, frames: np.ndarray, tolerance: float) -> dict:
    ref_map, ref_score, maps, scores = torch_and_graph(model, path, frames)
    result = {
        "frames": int(len(frames)),
        "max_rel_map_error": relative_map_error(ref_map, maps),
        "max_rel_score_error": float(np.abs(ref_score - scores).max() / max(float(np.abs(ref_score).max()), 1e-12)),
        "tolerance": tolerance,
    }
    if not result["max_rel_map_error"] <= tolerance:
        raise BundleError(
            f"{path}: exported maps differ from the torch model by "
            f"{result['max_rel_map_error']:.2e} of the map range (tolerance {tolerance:.0e})"
        )
    return result


def check_int8(model: DFR, path: Path, frames: np.ndarray) -> dict:
    """Map correlation of the int8 graph with the torch model on good frames it was not calibrated on."""
    ref_map, _, maps, _ = torch_and_graph(model, path, frames)
    corr = float(np.corrcoef(ref_map.ravel().astype(np.float64), maps.ravel().astype(np.float64))[0, 1])
    result = {
        "frames": int(len(frames)),
        "map_correlation": corr,
        "max_rel_map_error": relative_map_error(ref_map, maps),
        "min_correlation": INT8_MIN_CORRELATION,
    }
    if not corr >= INT8_MIN_CORRELATION:
        raise BundleError(
            f"{path}: int8 maps correlate {corr:.4f} with the float32 model on held-out good images "
            f"(minimum {INT8_MIN_CORRELATION}); calibrate with more or more typical good images"
        )
    return result


def export_bundle(
    bundle_dir: str | Path,
    fp16: bool = False,
    opset: int = 17,
    int8: bool = False,
    calib_data: str | Path | None = None,
    layer_balanced: bool | None = None,
) -> dict:
    """Write model.onnx (and model_fp16.onnx / model_int8.onnx), check them against the torch model, update
    metadata['graph']. `layer_balanced` (None: the checkpoint's) chooses the score's layer weighting; the graph
    records it, and `load_model` scores with it, so the torch model and the graph agree."""
    bundle_dir = Path(bundle_dir)
    meta = bundle.read_metadata(bundle_dir)
    model = load_model(bundle_dir, "cpu", follow_graph=False)  # the checkpoint's setting, not a previous graph's
    if layer_balanced is not None:
        model.config.layer_balanced = layer_balanced
    frames = parity_frames(model.config.height, model.config.width)
    graph: dict = {
        "input": bundle.INPUT_NAME,
        "outputs": [bundle.OUTPUT_MAP, bundle.OUTPUT_SCORE],
        "opset": opset,
        "layer_balanced": model.config.layer_balanced,
    }

    t0 = time.perf_counter()
    path = export_onnx(FusedDFR(model), bundle_dir / bundle.GRAPH, opset)
    graph.update(
        file=path.name, sha256=bundle.sha256_file(path), parity=check_parity(model, path, frames, FP32_TOLERANCE)
    )
    log.info("wrote %s in %.1f s (parity %.1e)", path, time.perf_counter() - t0, graph["parity"]["max_rel_map_error"])
    old_fp16 = bundle_dir / bundle.GRAPH_FP16
    if fp16:
        t0 = time.perf_counter()
        path16 = convert_fp16(path, old_fp16)
        graph.update(
            fp16_file=path16.name,
            fp16_sha256=bundle.sha256_file(path16),
            fp16_parity=check_parity(model, path16, frames, FP16_TOLERANCE),
        )
        log.info(
            "wrote %s in %.1f s (parity %.1e)",
            path16,
            time.perf_counter() - t0,
            graph["fp16_parity"]["max_rel_map_error"],
        )
    elif old_fp16.exists():
        old_fp16.unlink()  # an fp16 graph of an older model must not survive next to the new one
    old_int8 = bundle_dir / bundle.GRAPH_INT8
    if int8:
        t0 = time.perf_counter()
        good = good_frames(meta, calib_data, model.config.height, model.config.width)
        held_out = np.arange(len(good)) % 4 == 3  # every 4th image checks, the rest set the ranges
        path8 = quantise_int8(path, old_int8, good[~held_out])
        graph.update(
            int8_file=path8.name,
            int8_sha256=bundle.sha256_file(path8),
            int8_check=check_int8(model, path8, good[held_out]),
            int8_calibration_images=int((~held_out).sum()),
        )
        log.info(
            "wrote %s in %.1f s (map correlation %.4f)",
            path8,
            time.perf_counter() - t0,
            graph["int8_check"]["map_correlation"],
        )
    elif old_int8.exists():
        old_int8.unlink()
    shutil.rmtree(bundle_dir / TRT_CACHE_DIR, ignore_errors=True)  # engines built from the previous graph
    graph["exported"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    graph["versions"] = {"onnx": onnx.__version__, "torch": torch.__version__}
    meta["graph"] = graph
    bundle.write_metadata(bundle_dir, meta)
    return graph


def cli_export(args) -> int:
    graph = export_bundle(
        args.model,
        fp16=args.fp16,
        opset=args.opset,
        int8=args.int8,
        calib_data=args.calib_data,
        layer_balanced=getattr(args, "layer_balance", None),
    )
    print(
        f"exported {Path(args.model) / graph['file']} (model id {graph['sha256'][:12]}, "
        f"parity {graph['parity']['max_rel_map_error']:.1e} of map range, "
        f"{'layer-balanced' if graph['layer_balanced'] else 'channel-equal'} score)"
    )
    if "fp16_file" in graph:
        print(
            f"exported {Path(args.model) / graph['fp16_file']} "
            f"(parity {graph['fp16_parity']['max_rel_map_error']:.1e} of map range)"
        )
    if "int8_file" in graph:
        print(
            f"exported {Path(args.model) / graph['int8_file']} "
            f"(map correlation {graph['int8_check']['map_correlation']:.4f} on held-out good images)"
        )
    return 0
