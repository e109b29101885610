"""Added latency of `engine.backend: triton` over the local engine, per batch (docs/SCALING.md).

Scores the same batches with the local ONNX Runtime `Engine` and with `TritonScorer` against `linewatch serve`
(run from the serve environment, `$LINEWATCH_SERVE_PYTHON`, as the tests do) on 127.0.0.1. The graph is the tests'
deviation graph, so what is measured is the transport and Triton's cost, not the model's.

    python benchmarks/remote_engine_latency.py --size 64
    python benchmarks/remote_engine_latency.py --size 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linewatch.line.config import EngineConfig  # noqa: E402
from linewatch.line.engine import Engine  # noqa: E402
from linewatch.line.remote_engine import TritonScorer  # noqa: E402
from tests.helpers import calibrated_bundle  # noqa: E402
from tests.test_remote_engine import Served, remote  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="model input side in pixels")
    ap.add_argument("--calls", type=int, default=300, help="timed calls per batch size and engine")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    bundle_dir = calibrated_bundle(tmp / "bundle", args.size)
    server = Served(bundle_dir, tmp)
    server.start()
    try:
        local = Engine(bundle_dir, ["cpu"], threads=1)
        remote_engine = TritonScorer.connect(bundle_dir, "fp32", EngineConfig.model_validate(remote(server)), 8)
        for n in (1, 8):
            frames = np.full((n, args.size, args.size, 3), 130, np.uint8)
            for name, engine in (("local", local), ("triton", remote_engine)):
                for _ in range(20):
                    engine.score(frames)
                times = []
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    engine.score(frames)
                    times.append(time.perf_counter() - t0)
                times.sort()
                print(
                    f"{args.size}px batch {n} {name}: median {statistics.median(times) * 1e3:.2f} ms, "
                    f"p99 {times[int(0.99 * len(times))] * 1e3:.2f} ms"
                )
        remote_engine.close()
    finally:
        server.kill()


if __name__ == "__main__":
    main()
