"""The int8 graph: the fp32 graph with the CAE's big layers quantised, for CPU line PCs (the CPU speed target).

What is quantised: the CAE's first layer (both its parts: fine maps at the grid, coarse maps at their native size)
and its last layer. At paper settings they hold 40.6 of the graph's 63.6 GMAC per image. They become int8 weights
(per output channel, symmetric) and uint8 activations (per tensor, ranges from good images) in ONNX Runtime's QDQ
form, which its CPU provider runs as integer convolutions (VNNI where the CPU has it). Everything else stays float32:
VGG19, the regional generator, the small middle CAE layers, the squared error and the upsampling, so the map is
still a float reconstruction error.

Why not VGG19 too (measured on the dev benchmark's brick model, docs/BENCHMARKS.md): quantising its convolutions as
well made the graph 1.9× faster than fp32 instead of 1.4×, but moved PRO-AUC by 0.005, beyond the 0.002 the fp16
graph is held to; the CAE layers alone moved no metric by more than 0.0001. conv1_1 must stay float in any case:
it reads the frame, and ranges from a line of plain grey parts would clip a bright defect to the brightest good grey
(on a ±20 grey test part, PRO 0.97 → 0.80).

The graph is checked against the float32 torch model on held-out good images (map correlation) at export, and its
ranking metrics on the dev benchmark with benchmarks/precision_parity.py --precision int8.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx

from linewatch import bundle, images
from linewatch.errors import BundleError, DataError
from linewatch.evaluation import datasets
from linewatch.export.onnx_graph import check_onnx
from linewatch.training.features import spread_indices

log = logging.getLogger("linewatch.export")

# node-name prefixes of the traced FusedDFR modules that are quantised (see export/graph.py)
QUANTISED_PREFIXES = ("/fine/", "/first_parts.", "/last_neg/")
CALIBRATION_IMAGES = 32


def quantised_nodes(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == "Conv" and n.name.startswith(QUANTISED_PREFIXES)]


def good_frames(
    meta: dict, data_dir: str | Path | None, height: int, width: int, count: int = CALIBRATION_IMAGES
) -> np.ndarray:
    """Up to `count` good images spread evenly over the folder, as the model's uint8 BGR frames."""
    if data_dir is None:
        data_dir = (meta.get("training") or {}).get("data")
        if not data_dir:
            raise DataError("the bundle's metadata names no training data: pass --calib-data DIR (good images)")
    folder = datasets.good_image_folder(data_dir)
    files = images.list_images(folder)
    if len(files) < 4:
        raise DataError(f"{folder}: int8 calibration needs at least 4 good images, found {len(files)}")
    return np.stack([images.load_for_model(files[i], height, width) for i in spread_indices(len(files), count)])


class _Frames:
    """onnxruntime.quantization CalibrationDataReader over a frame array, one frame per run."""

    def __init__(self, frames: np.ndarray):
        self._it = iter(frames)

    def get_next(self):
        frame = next(self._it, None)
        return None if frame is None else {bundle.INPUT_NAME: frame[None]}


def quantise_int8(fp32_path: str | Path, out_path: str | Path, frames: np.ndarray) -> Path:
    """Write the int8 graph of `fp32_path`, with activation ranges from `frames` (uint8 N×H×W×3)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    out_path = Path(out_path)
    nodes = quantised_nodes(onnx.load(str(fp32_path), load_external_data=False))
    if not nodes:
        raise BundleError(f"{fp32_path}: no convolutions to quantise (names starting with {QUANTISED_PREFIXES})")
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_static logs a pre-processing hint on the root logger every time
    try:
        quantize_static(
            str(fp32_path),
            str(tmp),
            _Frames(frames),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_quantize=nodes,
        )
    finally:
        root.setLevel(level)
    check_onnx(tmp)
    tmp.replace(out_path)
    log.info("quantised %d convolutions with ranges from %d good images", len(nodes), len(frames))
    return out_path
