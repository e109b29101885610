"""ONNX Runtime engine: loads a bundle's fused graph and scores uint8 frame batches (torch-free).

Provider choice is checked, not assumed: ONNX Runtime silently falls back to the CPU when a GPU provider's
libraries are missing, so the providers reported are the ones the session really uses
(`InferenceSession.get_providers()`), and an explicitly requested provider that does not load is an error.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from linewatch import bundle
from linewatch.errors import BundleError, ConfigError, DataError

log = logging.getLogger("linewatch.line.engine")

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PROVIDER_NAMES = {"tensorrt": TENSORRT, "trt": TENSORRT, "cuda": CUDA, "cpu": CPU}
AUTO_ORDER = (TENSORRT, CUDA, CPU)
GPU_PROVIDERS = (TENSORRT, CUDA)
TRT_CACHE_DIR = "trt_cache"


def _ort() -> Any:  # the onnxruntime module: no type information shipped
    import onnxruntime

    return onnxruntime


def parse_providers(providers: str | Sequence[str]) -> tuple[list[str], bool]:
    """(ONNX Runtime provider names in priority order, whether they were asked for explicitly)."""
    if isinstance(providers, str):
        items = [p.strip() for p in providers.split(",") if p.strip()]
    else:
        items = [str(p).strip() for p in providers]
    if not items or items == ["auto"]:
        available = set(_ort().get_available_providers())
        return [p for p in AUTO_ORDER if p in available], False
    names: list[str] = []
    for item in items:
        name = PROVIDER_NAMES.get(item.lower(), item if item in AUTO_ORDER else None)
        if name is None:
            raise ConfigError(f"unknown provider {item!r}: use auto, {', '.join(sorted(PROVIDER_NAMES))}")
        if name not in names:
            names.append(name)
    return names, True


def graph_file(bundle_dir: Path, meta: dict[str, Any], precision: str = "fp32") -> tuple[Path, str]:
    """(path of the graph to load, its expected sha256) from the bundle metadata."""
    meta_path = bundle_dir / bundle.METADATA
    graph = meta.get("graph")
    if not isinstance(graph, dict):
        raise BundleError(f"{meta_path}: no 'graph' section: the bundle is not exported (run linewatch export)")
    file_key, sha_key, how = bundle.PRECISIONS[bundle.check_precision(precision)]
    if not graph.get(file_key) or not graph.get(sha_key):
        raise BundleError(
            f"{meta_path}: 'graph' does not name an {precision} graph ({file_key!r}, {sha_key!r}); run {how}"
        )
    path = bundle_dir / str(graph[file_key])
    if not path.is_file():
        raise BundleError(f"graph file named in {meta_path} not found: {path}")
    actual = bundle.sha256_file(path)
    if actual != graph[sha_key]:
        raise BundleError(
            f"{path}: sha256 {actual[:12]}… does not match {meta_path} graph.{sha_key} "
            f"{str(graph[sha_key])[:12]}… (corrupt or replaced graph; re-export)"
        )
    return path, actual


def with_fallback_providers(wanted: list[str]) -> list[str]:
    """`wanted` plus where nodes go that its providers cannot run: CUDA behind TensorRT, the CPU last."""
    wanted = list(wanted)
    if TENSORRT in wanted and CUDA not in wanted and CUDA in _ort().get_available_providers():
        wanted.insert(wanted.index(TENSORRT) + 1, CUDA)  # nodes TensorRT rejects run on CUDA, not the CPU
    if CPU not in wanted:
        wanted.append(CPU)  # ONNX Runtime places nodes a GPU provider cannot run on the CPU
    return wanted


def session_options(threads: int | None, cpu_arena: bool) -> Any:  # onnxruntime.SessionOptions
    """All graph optimisations; the CPU memory arena only when asked; a fixed intra-op thread count if given."""
    ort = _ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's CPU arena grows in powers of two and keeps the peak: at 256² f_{1:12} it raised peak RSS from
    # ~520 to ~700 MB for ~9% less CPU time per image (docs/BENCHMARKS.md); off unless asked for
    so.enable_cpu_mem_arena = bool(cpu_arena)
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    return so


def provider_options(
    name: str,
    bundle_dir: Path,
    precision: str,
    size: tuple[int, int],
    max_batch: int,
    trt_cache_dir: str | Path | None,
) -> dict[str, str]:
    h, w = size
    if name == TENSORRT:
        cache = Path(trt_cache_dir) if trt_cache_dir else bundle_dir / TRT_CACHE_DIR
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"TensorRT engine cache directory {cache} cannot be created: {exc} "
                f"(pass trt_cache_dir= a writable directory)"
            ) from exc

        def shape(n: int) -> str:
            return f"{bundle.INPUT_NAME}:{n}x{h}x{w}x3"

        return {
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": str(cache),
            "trt_fp16_enable": "True" if precision == "fp16" else "False",
            "trt_int8_enable": "True" if precision == "int8" else "False",  # QDQ ranges come with the graph
            # one optimisation profile covering every batch size up to max_batch, so no rebuild per size
            "trt_profile_min_shapes": shape(1),
            "trt_profile_opt_shapes": shape(min(8, max_batch)),
            "trt_profile_max_shapes": shape(max_batch),
        }
    if name == CUDA:
        return {"cudnn_conv_algo_search": "EXHAUSTIVE", "do_copy_in_default_stream": "True"}
    return {}


_preloaded = False


def preload_gpu_libraries() -> None:
    """Load CUDA/cuDNN from the nvidia-* wheels (as onnxruntime.preload_dlls does), so the CUDA provider can
    find them without LD_LIBRARY_PATH; once per process, and harmless where they are absent."""
    global _preloaded
    ort = _ort()
    if _preloaded or not hasattr(ort, "preload_dlls"):
        return
    _preloaded = True
    try:
        ort.preload_dlls()
    except Exception as exc:  # missing wheels only mean the provider will not load; that is reported later
        log.debug("onnxruntime.preload_dlls: %s", exc)


@contextlib.contextmanager
def _quiet_fallback(quiet: bool) -> Iterator[None]:
    """Keep ONNX Runtime's fallback chatter (printed to stdout, logged to stderr) out of `auto` probing."""
    if not quiet:
        yield
        return
    ort = _ort()
    captured = io.StringIO()
    ort.set_default_logger_severity(4)
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        ort.set_default_logger_severity(2)
        if captured.getvalue().strip():
            log.debug("onnxruntime: %s", captured.getvalue().strip())


class Engine:
    """Scores frames with a bundle's exported graph; implements the Scorer protocol of docs/DESIGN.md."""

    def __init__(
        self,
        bundle_dir: str | Path,
        providers: str | Sequence[str] = "auto",
        precision: str = "fp32",
        threads: int | None = None,
        trt_cache_dir: str | Path | None = None,
        max_batch: int = 32,
        cpu_arena: bool = False,
    ):
        self.bundle_dir = Path(bundle_dir)
        self.metadata = bundle.read_metadata(self.bundle_dir)
        self.model_id = bundle.model_id(self.metadata)
        self.precision = bundle.check_precision(precision)
        h, w = int(self.metadata["input"]["height"]), int(self.metadata["input"]["width"])
        self.input_size = (h, w)
        self.graph_path, self.graph_sha256 = graph_file(self.bundle_dir, self.metadata, self.precision)

        wanted, explicit = parse_providers(providers)
        asked = list(wanted) if explicit else []  # before the fallbacks are added
        wanted = with_fallback_providers(wanted)
        options = [
            provider_options(p, self.bundle_dir, self.precision, self.input_size, max_batch, trt_cache_dir)
            for p in wanted
        ]
        if any(p in GPU_PROVIDERS for p in wanted):
            with _quiet_fallback(quiet=True):
                preload_gpu_libraries()
        self.session = self._open_session(session_options(threads, cpu_arena), wanted, options, quiet=not explicit)
        self.providers = list(self.session.get_providers())
        self._check_asked_providers_loaded(asked)
        self._check_io()
        self._device = "cuda" if self.providers[0] in GPU_PROVIDERS else "cpu"
        self._lock = threading.Lock()
        self._bindings: dict[int, tuple[Any, Any, Any]] = {}  # batch size -> ORT (IOBinding, map, score)
        log.info(
            "engine %s: %s on %s (%dx%d, %s)",
            self.model_id,
            self.graph_path.name,
            ", ".join(self.providers),
            h,
            w,
            self.precision,
        )

    def _open_session(self, so: Any, providers: list[str], options: list[dict[str, str]], quiet: bool) -> Any:
        try:
            with _quiet_fallback(quiet=quiet):
                return _ort().InferenceSession(str(self.graph_path), so, providers=providers, provider_options=options)
        except Exception as exc:  # ORT raises its own exception types (InvalidGraph, Fail, InvalidProtobuf...)
            raise BundleError(f"{self.graph_path}: ONNX Runtime cannot load the graph: {exc}") from exc

    def _check_asked_providers_loaded(self, asked: list[str]) -> None:
        """ONNX Runtime falls back to the CPU silently; a provider asked for by name must really be in use."""
        missing = [p for p in asked if p not in self.providers]
        if missing:
            raise ConfigError(
                f"provider(s) {', '.join(missing)} requested but ONNX Runtime could not load them "
                f"(using {', '.join(self.providers)}); check the CUDA/TensorRT libraries"
            )

    def _check_io(self) -> None:
        h, w = self.input_size
        inputs = self.session.get_inputs()
        meta_path = self.bundle_dir / bundle.METADATA
        if len(inputs) != 1 or inputs[0].name != bundle.INPUT_NAME:
            raise BundleError(
                f"{self.graph_path}: expected one input {bundle.INPUT_NAME!r}, found {[i.name for i in inputs]}"
            )
        inp = inputs[0]
        if inp.type != "tensor(uint8)":
            raise BundleError(f"{self.graph_path}: input {inp.name!r} is {inp.type}, expected tensor(uint8)")
        shape = list(inp.shape)
        if len(shape) != 4 or shape[1:] != [h, w, 3]:
            raise BundleError(
                f"{self.graph_path}: input shape {shape} does not match {meta_path} "
                f"input size {h}x{w} (expected [N, {h}, {w}, 3])"
            )
        outputs = [o.name for o in self.session.get_outputs()]
        for name in (bundle.OUTPUT_MAP, bundle.OUTPUT_SCORE):
            if name not in outputs:
                raise BundleError(f"{self.graph_path}: graph has no output {name!r} (outputs: {outputs})")

    def check_frames(self, frames: np.ndarray) -> np.ndarray:
        h, w = self.input_size
        if not isinstance(frames, np.ndarray):
            raise DataError(f"frames must be a numpy array uint8 N×{h}×{w}×3, got {type(frames).__name__}")
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (h, w, 3) or frames.shape[0] < 1:
            raise DataError(
                f"frames must be uint8 N×{h}×{w}×3 (N >= 1, BGR, resized with "
                f"images.resize_to_model), got {frames.dtype} {frames.shape}"
            )
        return np.ascontiguousarray(frames)

    def score(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(anomaly maps float32 N×H×W, image scores float32 N) for a batch of BGR uint8 frames."""
        frames = self.check_frames(frames)
        with self._lock:
            if self._device == "cuda":
                maps, scores = self._run_bound(frames)
            else:
                maps, scores = self.session.run([bundle.OUTPUT_MAP, bundle.OUTPUT_SCORE], {bundle.INPUT_NAME: frames})
        return np.asarray(maps, np.float32), np.asarray(scores, np.float32)

    def _run_bound(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """GPU path: outputs stay in device buffers allocated once per batch size; one copy back per call."""
        ort = _ort()
        n = frames.shape[0]
        if n not in self._bindings:
            h, w = self.input_size
            amap = ort.OrtValue.ortvalue_from_shape_and_type([n, h, w], np.float32, "cuda", 0)
            score = ort.OrtValue.ortvalue_from_shape_and_type([n], np.float32, "cuda", 0)
            binding = self.session.io_binding()
            binding.bind_ortvalue_output(bundle.OUTPUT_MAP, amap)
            binding.bind_ortvalue_output(bundle.OUTPUT_SCORE, score)
            self._bindings[n] = (binding, amap, score)
        binding, amap, score = self._bindings[n]
        binding.bind_cpu_input(bundle.INPUT_NAME, frames)
        self.session.run_with_iobinding(binding)
        return amap.numpy(), score.numpy()
