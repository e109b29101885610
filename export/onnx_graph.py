"""Trace the fused module to ONNX, check it, and prove it loads in ONNX Runtime with all optimisations.

The TorchScript exporter (`dynamo=False`) is used: on this model it is ~20× faster than the dynamo exporter
(0.2 s vs 4.6 s for a 64² f_{1:4} model) and gives the same plain Conv/MatMul/Resize graph.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch

from linewatch import bundle
from linewatch.errors import BundleError

from .graph import FusedDFR


def export_onnx(module: FusedDFR, path: str | Path, opset: int = 17) -> Path:
    path = Path(path)
    example = torch.zeros(2, module.height, module.width, 3, dtype=torch.uint8)
    batch = {0: "N"}
    tmp = path.with_name(f".{path.name}.tmp")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(), (example,), str(tmp), dynamo=False, opset_version=opset,
            input_names=[bundle.INPUT_NAME], output_names=[bundle.OUTPUT_MAP, bundle.OUTPUT_SCORE],
            dynamic_axes={bundle.INPUT_NAME: batch, bundle.OUTPUT_MAP: batch, bundle.OUTPUT_SCORE: batch},
            do_constant_folding=True,
        )
    check_onnx(tmp)
    tmp.replace(path)
    return path


def check_onnx(path: str | Path) -> None:
    """onnx.checker on the file and a session with ORT_ENABLE_ALL; a failure names the file."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise BundleError(f"exported graph {path} fails onnx.checker: {exc}") from exc
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BundleError(f"exported graph {path} does not load in ONNX Runtime: {exc}") from exc
