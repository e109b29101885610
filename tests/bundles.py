"""Small real bundles for runtime tests that should not depend on training.

`make_deviation_bundle` writes a genuine ONNX graph with the bundle's I/O contract whose anomaly map is
|grey - 128| / 127: a mid-grey frame scores 0, a white or black patch scores ~1. Daemon and calibration tests use
it when they need predictable verdicts; DFR behaviour itself is tested with bundles from `linewatch train/export`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from linewatch import bundle


def deviation_graph(height: int, width: int) -> onnx.ModelProto:
    frames = helper.make_tensor_value_info(bundle.INPUT_NAME, TensorProto.UINT8, ["N", height, width, 3])
    amap = helper.make_tensor_value_info(bundle.OUTPUT_MAP, TensorProto.FLOAT, ["N", height, width])
    score = helper.make_tensor_value_info(bundle.OUTPUT_SCORE, TensorProto.FLOAT, ["N"])
    consts = [
        helper.make_tensor("axes_c", TensorProto.INT64, [1], [3]),
        helper.make_tensor("axes_hw", TensorProto.INT64, [2], [1, 2]),
        helper.make_tensor("mid", TensorProto.FLOAT, [], [128.0]),
        helper.make_tensor("span", TensorProto.FLOAT, [], [127.0]),
    ]
    nodes = [
        helper.make_node("Cast", [bundle.INPUT_NAME], ["f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["f", "axes_c"], ["grey"], keepdims=0),
        helper.make_node("Sub", ["grey", "mid"], ["centred"]),
        helper.make_node("Abs", ["centred"], ["dev"]),
        helper.make_node("Div", ["dev", "span"], [bundle.OUTPUT_MAP]),
        helper.make_node("ReduceMax", [bundle.OUTPUT_MAP, "axes_hw"], [bundle.OUTPUT_SCORE], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "deviation", [frames], [amap, score], initializer=consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def make_deviation_bundle(path: str | Path, height: int = 64, width: int = 64) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    graph_path = path / bundle.GRAPH
    onnx.save(deviation_graph(height, width), str(graph_path))
    bundle.write_metadata(
        path,
        {
            "created": "2026-01-01T00:00:00Z",
            "input": {"height": height, "width": width, "layout": "NHWC", "dtype": "uint8", "color": "BGR"},
            "dfr": {"layer_spec": "test-deviation"},
            "weights": {"source": "none"},
            "training": {},
            "versions": {},
            "graph": {
                "file": bundle.GRAPH,
                "sha256": bundle.sha256_file(graph_path),
                "opset": 18,
                "input": bundle.INPUT_NAME,
                "outputs": [bundle.OUTPUT_MAP, bundle.OUTPUT_SCORE],
            },
        },
    )
    return path


def grey_frame(height: int = 64, width: int = 64, level: int = 128) -> np.ndarray:
    return np.full((height, width, 3), level, np.uint8)
