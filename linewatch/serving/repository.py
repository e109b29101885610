"""The served model's name and signature, and the native Triton model repository (torch-free).

The contract a remote client (the daemon's `engine.backend: triton`) checks before it trusts a server:

- **name** `linewatch-<first 16 hex digits of the graph's sha256>`, the same sha256 that `metadata.json`
  (`graph.sha256`, `graph.fp16_sha256`, `graph.int8_sha256`) records and `calibration.json` binds to
  (`model_sha256`). Triton versions are integers, so the graph identity lives in the name; the
  **version** is always 1. A client derives the name from its own bundle (`model_name(sha)`), asks for
  exactly that model and so can only ever reach the graph its calibration was made for.
- **metadata** (Triton's model metadata, gRPC and HTTP alike): input `frames` UINT8 `[-1, H, W, 3]`;
  outputs `anomaly_map` FP32 `[-1, H, W]` and `image_score` FP32 `[-1, 1]` (Triton cannot express a tensor
  that is only the batch dimension, so the per-image score comes back N×1: flatten it). Names, dims and
  datatypes are read from the ONNX graph, never written down twice.
- **config parameter** `graph_sha256`: the graph's full sha256 (model configuration `parameters`), for a
  client that wants all 64 digits; `linewatch_precision` says which of the bundle's graphs it is.

`linewatch serve` (linewatch/serving/server.py) and the repository written here publish the same contract.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

from linewatch import bundle
from linewatch.errors import BundleError, ConfigError

log = logging.getLogger("linewatch.serving")

MODEL_PREFIX = "linewatch-"
MODEL_VERSION = 1
HASH_DIGITS = 16
GRAPH_SHA256_PARAMETER = "graph_sha256"
PRECISION_PARAMETER = "linewatch_precision"
REPOSITORY_GRAPH = "model.onnx"
# Triton's TensorRT accelerator precision for each bundle graph (the int8 graph carries its QDQ ranges)
TRT_PRECISION = {"fp32": "FP32", "fp16": "FP16", "int8": "INT8"}
TRT_WORKSPACE_BYTES = 1 << 30
TRT_CACHE_ROOT = "/tmp/linewatch-trt-cache"

# ONNX Runtime type -> (Triton datatype as in metadata and tritonclient, model-config enum, numpy dtype name)
_TYPES = {
    "tensor(uint8)": ("UINT8", "TYPE_UINT8", "uint8"),
    "tensor(float)": ("FP32", "TYPE_FP32", "float32"),
    "tensor(float16)": ("FP16", "TYPE_FP16", "float16"),
    "tensor(int64)": ("INT64", "TYPE_INT64", "int64"),
    "tensor(int32)": ("INT32", "TYPE_INT32", "int32"),
}


def model_name(graph_sha256: str) -> str:
    """The Triton model name for a graph: a client computes it from its bundle and asks for nothing else."""
    sha = graph_sha256.lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise BundleError(f"not a sha256 hex digest: {graph_sha256!r}")
    return MODEL_PREFIX + sha[:HASH_DIGITS]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One input or output as Triton sees it: `dims` without the batch dimension; `reshape` is the graph's own
    per-item shape where Triton needs a placeholder dimension (a batch-only tensor is served as N×1)."""

    name: str
    datatype: str  # Triton's name: UINT8, FP32, ...
    config_type: str  # model-config enum: TYPE_UINT8, ...
    numpy_dtype: str
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None = None


def tensor_spec(graph_path: Path, name: str, onnx_type: str, shape: Sequence[Any]) -> TensorSpec:
    if onnx_type not in _TYPES:
        raise BundleError(f"{graph_path}: tensor {name!r} has type {onnx_type}, which linewatch does not serve")
    if not shape or isinstance(shape[0], int):
        raise BundleError(
            f"{graph_path}: tensor {name!r} has shape {list(shape)}: the first dimension must be a dynamic batch"
        )
    dims = tuple(d if isinstance(d, int) and d > 0 else -1 for d in shape[1:])
    datatype, config_type, np_name = _TYPES[onnx_type]
    if not dims:
        return TensorSpec(name, datatype, config_type, np_name, (1,), ())
    return TensorSpec(name, datatype, config_type, np_name, dims)


def session_io(graph_path: Path, session: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of an ONNX Runtime session in Triton's terms."""
    inputs = [tensor_spec(graph_path, i.name, i.type, i.shape) for i in session.get_inputs()]
    outputs = [tensor_spec(graph_path, o.name, o.type, o.shape) for o in session.get_outputs()]
    return inputs, outputs


@dataclasses.dataclass(frozen=True)
class ServedGraph:
    """One of a bundle's graphs, as it is published: file, hash, Triton name and signature."""

    precision: str
    path: Path
    sha256: str
    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


def served_graph(bundle_dir: str | Path, precision: str = "fp32") -> ServedGraph:
    """The bundle's graph of that precision (hash checked against metadata.json), its name and signature."""
    import onnxruntime as ort

    from linewatch.line.engine import graph_file

    bundle_dir = Path(bundle_dir)
    path, sha = graph_file(bundle_dir, bundle.read_metadata(bundle_dir), bundle.check_precision(precision))
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's own exception types
        raise BundleError(f"{path}: ONNX Runtime cannot load the graph: {exc}") from exc
    inputs, outputs = session_io(path, session)
    check_signature(path, bundle_dir, inputs, outputs)
    return ServedGraph(precision, path, sha, model_name(sha), inputs, outputs)


def check_signature(path: Path, bundle_dir: Path, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    """The bundle's I/O contract (docs/DESIGN.md), as the local Engine checks it: what a client is promised."""
    meta = bundle.read_metadata(bundle_dir)
    h, w = int(meta["input"]["height"]), int(meta["input"]["width"])
    want = [(bundle.INPUT_NAME, "UINT8", (h, w, 3))]
    if [(s.name, s.datatype, s.dims) for s in inputs] != want:
        raise BundleError(
            f"{path}: inputs {[(s.name, s.datatype, s.dims) for s in inputs]} do not match "
            f"{bundle_dir / bundle.METADATA} (expected one {bundle.INPUT_NAME!r} UINT8 N×{h}×{w}×3)"
        )
    names = [s.name for s in outputs]
    for name in (bundle.OUTPUT_MAP, bundle.OUTPUT_SCORE):
        if name not in names:
            raise BundleError(f"{path}: graph has no output {name!r} (outputs: {names})")


def bundle_precisions(bundle_dir: str | Path) -> list[str]:
    """The precisions the bundle has a graph for, fp32 first."""
    graph = bundle.read_metadata(bundle_dir).get("graph") or {}
    return [p for p, (file_key, sha_key, _) in bundle.PRECISIONS.items() if graph.get(file_key) and graph.get(sha_key)]


def parse_batch_sizes(text: str, max_batch: int) -> list[int]:
    """'4,8' -> [4, 8]: positive, ascending, none above max_batch."""
    try:
        sizes = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise ConfigError(f"preferred batch sizes must be comma-separated integers, got {text!r}") from None
    if any(s < 1 or s > max_batch for s in sizes):
        raise ConfigError(f"preferred batch sizes {sizes} must lie in 1..{max_batch} (the max batch size)")
    return sizes


def check_batching(max_batch: int, max_queue_delay_us: int) -> None:
    if max_batch < 1:
        raise ConfigError(f"max batch size must be >= 1, got {max_batch}")
    if max_queue_delay_us < 0:
        raise ConfigError(f"max queue delay must be >= 0 microseconds, got {max_queue_delay_us}")


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tensor_text(spec: TensorSpec) -> str:
    text = f"name: {_q(spec.name)} data_type: {spec.config_type} dims: [{', '.join(map(str, spec.dims))}]"
    if spec.reshape is not None:
        text += f" reshape: {{ shape: [{', '.join(map(str, spec.reshape))}] }}"
    return "  { " + text + " }"


def config_text(graph: ServedGraph, max_batch: int, preferred: Sequence[int], max_queue_delay_us: int) -> str:
    """config.pbtxt for Triton's onnxruntime backend: dynamic batching, TensorRT on a GPU (one optimisation
    profile up to max_batch and an engine cache, as the local Engine builds it), the graph hash as a parameter."""
    found = [s for s in graph.inputs if s.name == bundle.INPUT_NAME]
    if not found:
        raise BundleError(f"{graph.path}: no input {bundle.INPUT_NAME!r}")
    frames = found[0]
    item = "x".join(str(d) for d in frames.dims)

    def shapes(n: int) -> str:
        return f"{frames.name}:{n}x{item}"

    trt = [
        ("precision_mode", TRT_PRECISION[graph.precision]),
        ("max_workspace_size_bytes", str(TRT_WORKSPACE_BYTES)),
        ("trt_engine_cache_enable", "true"),
        ("trt_engine_cache_path", f"{TRT_CACHE_ROOT}/{graph.name}"),
        ("trt_profile_min_shapes", shapes(1)),
        ("trt_profile_opt_shapes", shapes(min(8, max_batch))),
        ("trt_profile_max_shapes", shapes(max_batch)),
    ]
    lines = [
        f"# written by linewatch export --triton-repository from {graph.path.name} (precision {graph.precision})",
        f"name: {_q(graph.name)}",
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch}",
        f"version_policy: {{ specific: {{ versions: [{MODEL_VERSION}] }} }}",
        "input [",
        ",\n".join(_tensor_text(s) for s in graph.inputs),
        "]",
        "output [",
        ",\n".join(_tensor_text(s) for s in graph.outputs),
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: [{', '.join(map(str, preferred))}]" if preferred else "",
        f"  max_queue_delay_microseconds: {max_queue_delay_us}",
        "}",
        "optimization { execution_accelerators { gpu_execution_accelerator: [ {",
        '  name: "tensorrt"',
        *(f"  parameters {{ key: {_q(k)} value: {_q(v)} }}" for k, v in trt),
        "} ] } }",
        f"parameters {{ key: {_q(GRAPH_SHA256_PARAMETER)} value: {{ string_value: {_q(graph.sha256)} }} }}",
        f"parameters {{ key: {_q(PRECISION_PARAMETER)} value: {{ string_value: {_q(graph.precision)} }} }}",
    ]
    return "\n".join(line for line in lines if line) + "\n"


def write_repository(
    bundle_dir: str | Path,
    out_dir: str | Path,
    max_batch: int = 32,
    preferred: Sequence[int] = (4, 8),
    max_queue_delay_us: int = 500,
    precisions: Sequence[str] | None = None,
) -> list[Path]:
    """One model per graph of the bundle (`<name>/config.pbtxt`, `<name>/1/model.onnx`); returns the model
    folders. A folder of the same name is replaced whole: same name, same graph bytes."""
    check_batching(max_batch, max_queue_delay_us)
    preferred = [int(s) for s in preferred]
    if any(s < 1 or s > max_batch for s in preferred):
        raise ConfigError(f"preferred batch sizes {list(preferred)} must lie in 1..{max_batch} (the max batch size)")
    out = Path(out_dir)
    wanted = list(precisions) if precisions else bundle_precisions(bundle_dir)
    if not wanted:
        raise BundleError(f"{Path(bundle_dir) / bundle.METADATA}: the bundle has no exported graph (linewatch export)")
    graphs = [served_graph(bundle_dir, precision) for precision in wanted]  # all checked before anything is written
    written = []
    for graph in graphs:
        model_dir = out / graph.name
        tmp = out / f".{graph.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / str(MODEL_VERSION)).mkdir(parents=True)
        shutil.copyfile(graph.path, tmp / str(MODEL_VERSION) / REPOSITORY_GRAPH)
        if bundle.sha256_file(tmp / str(MODEL_VERSION) / REPOSITORY_GRAPH) != graph.sha256:
            shutil.rmtree(tmp, ignore_errors=True)
            raise BundleError(f"{graph.path}: changed while it was copied into {model_dir}")
        (tmp / "config.pbtxt").write_text(config_text(graph, max_batch, preferred, max_queue_delay_us))
        shutil.rmtree(model_dir, ignore_errors=True)
        tmp.rename(model_dir)
        written.append(model_dir)
        log.info("wrote %s (%s graph %s)", model_dir, graph.precision, graph.sha256[:12])
    return written


def cli_export_repository(args: argparse.Namespace) -> int:
    """`linewatch export MODEL --triton-repository DIR`: export first only when there is no graph yet or a graph
    is asked for (--fp16/--int8/--layer-balance), so a calibrated bundle's graph hash is kept (and no torch needed)."""
    check_batching(args.triton_max_batch, args.triton_max_queue_delay_us)
    preferred = parse_batch_sizes(args.triton_preferred_batch_sizes, args.triton_max_batch)
    meta = bundle.read_metadata(args.model)
    exported = bool((meta.get("graph") or {}).get("sha256"))
    if not exported or args.fp16 or args.int8 or getattr(args, "layer_balance", None) is not None:
        import importlib

        # the build side (torch), only when a graph must be exported
        code = int(importlib.import_module("linewatch.export.cli").cli_export(args))
        if code:
            return code
    else:
        print(f"{args.model}: using the exported graph(s) as they are (no re-export)")
    for model_dir in write_repository(
        args.model, args.triton_repository, args.triton_max_batch, preferred, args.triton_max_queue_delay_us
    ):
        print(f"triton model {model_dir.name}: {model_dir / 'config.pbtxt'}")
    return 0
