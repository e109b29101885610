"""`linewatch serve MODEL_DIR`: the bundle's graph in a real Triton Inference Server, through PyTriton.

PyTriton ships `tritonserver` and runs our callable behind Triton's Python backend: Triton's dynamic batcher
gathers requests from every client into batches, and the callable scores each batch with the project's own
ONNX Runtime `Engine` (the same code, providers and checks as a line PC's local engine). Name, version and
signature follow the contract in `linewatch.serving.repository`.

PyTriton 0.7 needs numpy<2, so this runs from its own virtual environment (docs/SCALING.md).

The Python backend's stub links `libpython` dynamically and finds it through the loader's search path: with an
interpreter built outside the system (pyenv, a conda or uv Python) the loader picks the system's libpython of
another patch release, and the model fails to load with errors such as `'_thread.RLock' object has no attribute
'_recursion_count'`. `linewatch serve` therefore puts the running interpreter's own library folder first on
LD_LIBRARY_PATH before PyTriton starts the server, which passes its environment on to tritonserver and the stub.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import sys
import sysconfig
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Callable

import numpy as np

from linewatch.errors import ConfigError, LinewatchError
from linewatch.serving.repository import (
    MODEL_VERSION,
    ServedGraph,
    TensorSpec,
    check_batching,
    model_name,
    parse_batch_sizes,
    session_io,
)

log = logging.getLogger("linewatch.serving")


def interpreter_lib_dir() -> Path | None:
    """The folder holding this interpreter's own libpython, when it is a shared build (else None)."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    libdir, ldlibrary = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
    if not libdir or not ldlibrary or not (Path(libdir) / ldlibrary).exists():
        return None
    return Path(libdir)


def put_interpreter_libpython_first(environ: dict[str, str] | os._Environ[str] = os.environ) -> Path | None:
    """Prepend this interpreter's libpython folder to LD_LIBRARY_PATH (for the tritonserver child and its Python
    backend stub, which inherit it); returns the folder or None when there is nothing to do."""
    lib = interpreter_lib_dir()
    if lib is None:
        return None
    parts = [p for p in environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if parts[:1] != [str(lib)]:
        environ["LD_LIBRARY_PATH"] = os.pathsep.join([str(lib), *[p for p in parts if p != str(lib)]])
    return lib


def check_port(name: str, host: str, port: int) -> int:
    """A port that is free now: otherwise tritonserver fails, and PyTriton would talk to whoever holds it."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"{name} must be a TCP port 1..65535, got {port}")
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise ConfigError(f"{name} {port}: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return port


def error_summary(exc: BaseException) -> str:
    """First line of a server error plus the Python error it carries (a model's traceback comes back whole)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    raised = [line for line in lines[1:] if re.match(r"^[A-Za-z_][\w.]*(Error|Exception)\b", line)]
    return (lines[0][:300] + (" … " + raised[-1][:300] if raised else "")).strip()


def infer_function(engine: Any, outputs: list[TensorSpec]) -> Callable[..., dict[str, np.ndarray]]:
    """Triton's batch -> Engine.score -> outputs shaped as published (a batch-only output as N×1)."""
    from pytriton.decorators import batch

    from linewatch import bundle

    @batch  # type: ignore[untyped-decorator]
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        frames = inputs[bundle.INPUT_NAME]
        maps, scores = engine.score(frames)
        produced = {bundle.OUTPUT_MAP: maps, bundle.OUTPUT_SCORE: scores}
        n = frames.shape[0]
        return {spec.name: np.asarray(produced[spec.name]).reshape((n, *spec.dims)) for spec in outputs}

    return infer  # type: ignore[no-any-return]


def cli_serve(args: argparse.Namespace) -> int:
    for name in ("grpc_port", "http_port", "metrics_port"):
        check_port("--" + name.replace("_", "-"), args.host, getattr(args, name))
    if len({args.grpc_port, args.http_port, args.metrics_port}) != 3:
        raise ConfigError("--grpc-port, --http-port and --metrics-port must differ")
    check_batching(args.max_batch, args.max_queue_delay_us)
    preferred = parse_batch_sizes(args.preferred_batch_sizes, args.max_batch)
    if args.instances < 1:
        raise ConfigError(f"--instances must be >= 1, got {args.instances}")

    from linewatch.line.engine import Engine

    engines = [
        Engine(args.model, args.providers, args.precision, threads=args.threads, max_batch=args.max_batch)
        for _ in range(args.instances)
    ]
    first = engines[0]
    inputs, outputs = session_io(first.graph_path, first.session)
    graph = ServedGraph(
        args.precision, first.graph_path, first.graph_sha256, model_name(first.graph_sha256), inputs, outputs
    )

    lib = put_interpreter_libpython_first()
    if lib is not None:
        log.debug("LD_LIBRARY_PATH starts with %s (this interpreter's libpython)", lib)
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == "pytriton":
            raise LinewatchError(
                "linewatch serve needs PyTriton: pip install 'linewatch[serve]' into its own virtual environment "
                "(PyTriton 0.7 needs numpy<2; docs/SCALING.md)"
            ) from exc
        raise

    config = TritonConfig(
        grpc_address=args.host,
        grpc_port=args.grpc_port,
        http_address=args.host,
        http_port=args.http_port,
        metrics_address=args.host,
        metrics_port=args.metrics_port,
        exit_on_error=True,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        with Triton(config=config) as triton:  # starts tritonserver
            triton.bind(  # loads the model: the Python backend's stub starts here
                model_name=graph.name,
                model_version=MODEL_VERSION,
                infer_func=[infer_function(e, outputs) for e in engines],
                inputs=[Tensor(name=s.name, dtype=np.dtype(s.numpy_dtype), shape=s.dims) for s in inputs],
                outputs=[Tensor(name=s.name, dtype=np.dtype(s.numpy_dtype), shape=s.dims) for s in outputs],
                config=ModelConfig(
                    max_batch_size=args.max_batch,
                    batcher=DynamicBatcher(
                        max_queue_delay_microseconds=args.max_queue_delay_us, preferred_batch_size=preferred
                    ),
                ),
                strict=True,
            )
            triton.run()  # waits until the model is ready
            print(
                f"serving: grpc={args.host}:{args.grpc_port} http={args.host}:{args.http_port} model={graph.name}",
                flush=True,
            )
            log.info(
                "%s version %d: %s graph %s on %s, max batch %d, preferred %s, queue delay %d us",
                graph.name,
                MODEL_VERSION,
                graph.precision,
                graph.path,
                ", ".join(first.providers),
                args.max_batch,
                preferred,
                args.max_queue_delay_us,
            )
            while not stop.wait(1.0):
                if not triton.is_alive():
                    raise LinewatchError("tritonserver exited unexpectedly (see its log above)")
    except LinewatchError:
        raise
    except Exception as exc:  # PyTriton and tritonclient raise their own types; the server's log above says more
        raise LinewatchError(f"Triton Inference Server did not serve {graph.name}: {error_summary(exc)}") from exc
    print("serving: stopped", flush=True)
    sys.stdout.flush()
    return 0
