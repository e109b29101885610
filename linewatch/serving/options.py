"""Command-line options of `linewatch serve` and of `linewatch export --triton-repository` (argparse only, so
`linewatch --help` loads neither PyTriton nor ONNX Runtime)."""

from __future__ import annotations

import argparse
from typing import Any, Sequence

MAX_BATCH = 32
PREFERRED_BATCH_SIZES = "4,8"
MAX_QUEUE_DELAY_US = 500
REPOSITORY_TARGET = "linewatch.serving.repository:cli_export_repository"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model bundle directory (exported)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the gRPC, HTTP and metrics endpoints listen on (0.0.0.0: every interface, for line PCs)",
    )
    p.add_argument("--grpc-port", type=int, default=8001, help="Triton gRPC port (what line daemons use)")
    p.add_argument("--http-port", type=int, default=8000, help="Triton HTTP/REST port (health: /v2/health/ready)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Triton's Prometheus metrics port")
    p.add_argument(
        "--precision",
        choices=["fp32", "fp16", "int8"],
        default="fp32",
        help="which of the bundle's graphs to serve; the model name carries that graph's hash",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=MAX_BATCH,
        help="largest batch Triton's dynamic batcher forms (and one request may send)",
    )
    p.add_argument(
        "--preferred-batch-sizes",
        default=PREFERRED_BATCH_SIZES,
        help="batch sizes the dynamic batcher aims for, separated by commas",
    )
    p.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=MAX_QUEUE_DELAY_US,
        help="how long a request may wait for others to batch with, in microseconds",
    )
    p.add_argument("--providers", default="auto", help="ONNX Runtime providers: auto, tensorrt, cuda, cpu (list)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: ONNX Runtime's choice)")
    p.add_argument(
        "--instances",
        type=int,
        default=1,
        help="engine instances (each its own ONNX Runtime session) Triton runs batches on concurrently",
    )


class _TritonRepository(argparse.Action):
    """`--triton-repository DIR` turns `linewatch export` into the torch-free repository writer (which exports
    first only when the bundle needs it)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        namespace._target = REPOSITORY_TARGET


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--triton-repository",
        metavar="DIR",
        action=_TritonRepository,
        help="write a native Triton model repository into DIR: DIR/linewatch-<graph hash>/config.pbtxt and "
        "1/model.onnx for each graph of the bundle (docs/SCALING.md). Graphs already exported are used as they are "
        "(no torch needed); the export runs first only without a graph or with --fp16/--int8/--layer-balance",
    )
    p.add_argument("--triton-max-batch", type=int, default=MAX_BATCH, help="with --triton-repository: max_batch_size")
    p.add_argument(
        "--triton-preferred-batch-sizes",
        default=PREFERRED_BATCH_SIZES,
        help="with --triton-repository: the dynamic batcher's preferred batch sizes, separated by commas",
    )
    p.add_argument(
        "--triton-max-queue-delay-us",
        type=int,
        default=MAX_QUEUE_DELAY_US,
        help="with --triton-repository: the dynamic batcher's max queue delay in microseconds",
    )
