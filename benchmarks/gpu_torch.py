"""The fused DFR computation as a torch module, timed on CUDA (or the CPU): the GPU check's second way to a number.

ONNX Runtime is the product's engine, but the GPU machine's `onnxruntime` most likely has no CUDA provider, and the
onnxruntime-gpu wheel (~255 MB) travels only in pieces (benchmarks/gpu_prepare.py). This script measures the same
fused computation in torch: `linewatch.export.graph.FusedDFR`, the module the ONNX graph is traced from, loaded from
the bundle's checkpoint. Its report says backend "torch": never read it as an ONNX Runtime figure.

  python benchmarks/gpu_torch.py BUNDLE [--device auto|cuda|cpu] [--precision fp32,fp16] [--batch 1,8,32]
         [--variants eager,cudagraph,compile] [--iters 200] [--max-seconds 2] [--budget-s 150] [--json OUT]

Each call is timed the way `linewatch bench` times the engine (`linewatch.evaluation.bench.time_calls` on
`bench_frames`): uint8 BGR frames from host memory in, anomaly maps and scores back in host memory (through pinned
staging buffers on CUDA). `resident_ms` is the same batch with frames and results left on the device.

- fp32: float32 weights and activations; TF32 tensor cores allowed for convolutions and matrix products.
- fp16: float16 weights and activations, the channel mean of squared errors and the upsampling in float32, as in
  the bundle's fp16 ONNX graph.
- variants: `eager` (cudnn.benchmark), `cudagraph` (one CUDA graph per batch size, replayed), `compile`
  (`torch.compile(mode="reduce-overhead")`: Inductor kernels plus CUDA graphs; compile time reported). CUDA graphs
  and compile are CUDA-only; on the CPU only `eager` runs (the CI check that this script still works).
Every configuration's maps are compared with eager fp32 on the same frames (`map_err`: max |difference| / map range).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from linewatch import bundle
from linewatch.evaluation.bench import bench_frames, latency_stats, parse_batches, time_calls
from linewatch.export.graph import FusedDFR
from linewatch.training.model import load_model

VARIANTS = ("eager", "cudagraph", "compile")
CUDA_ONLY = {"cudagraph", "compile"}
MIN_SECONDS = {"eager": 5.0, "cudagraph": 5.0, "compile": 60.0}  # left in the budget to start a configuration


class Float32In(nn.Module):
    """Runs `inner` in float32 whatever its input's dtype."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.float())


class HalfFusedDFR(FusedDFR):
    """FusedDFR with float16 weights and activations from the first convolution on."""

    def normalise(self, frames: torch.Tensor) -> torch.Tensor:
        return super().normalise(frames).half()


def fused_module(bundle_dir: Path, precision: str, device: torch.device) -> FusedDFR:
    module = FusedDFR(load_model(bundle_dir)).eval()
    if precision == "fp16":
        module = module.half()
        module.channel_mean = Float32In(module.channel_mean)  # the error tail stays float32, as in the fp16 graph
        module.__class__ = HalfFusedDFR
    elif precision != "fp32":
        raise SystemExit(f"precision must be fp32 or fp16, got {precision!r}")
    return module.to(device)


class Runner:
    """`score(frames)` host to host, as the engine's contract; `run()` on the device-resident batch."""

    def __init__(self, module: nn.Module, device: torch.device, batch: int, size: tuple[int, int], variant: str):
        self.device, self.variant = device, variant
        h, w = size
        cuda = device.type == "cuda"
        self.host_in = torch.empty((batch, h, w, 3), dtype=torch.uint8, pin_memory=cuda)
        self.dev_in = torch.empty_like(self.host_in, device=device) if cuda else self.host_in
        self.host_map = torch.empty((batch, h, w), dtype=torch.float32, pin_memory=cuda)
        self.host_score = torch.empty((batch,), dtype=torch.float32, pin_memory=cuda)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.forward = torch.compile(module, mode="reduce-overhead", dynamic=False) if variant == "compile" else module
        self.setup_s = 0.0
        t0 = time.perf_counter()
        if variant == "cudagraph":
            self.static_out = self.capture(module)
        elif variant == "compile":
            for _ in range(3):  # compiles, records and warms the CUDA graph of this batch size
                self.run()
            self.sync()
        self.setup_s = time.perf_counter() - t0

    def capture(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # cudnn.benchmark picks its algorithms before the capture
                module(self.dev_in)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            out = module(self.dev_in)
        return out

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graph is not None:
            self.graph.replay()
            return self.static_out
        return self.forward(self.dev_in)

    def score(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.host_in.numpy()[...] = frames
        if self.dev_in is not self.host_in:
            self.dev_in.copy_(self.host_in, non_blocking=True)
        amap, score = self.run()
        self.host_map.copy_(amap, non_blocking=True)
        self.host_score.copy_(score, non_blocking=True)
        self.sync()
        return self.host_map.numpy(), self.host_score.numpy()

    def resident_ms(self, calls: int) -> float:
        self.sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            self.run()
        self.sync()
        return (time.perf_counter() - t0) / calls * 1e3


def map_error(reference: np.ndarray, maps: np.ndarray) -> float:
    """max |maps - reference| over the reference's range; inf when maps are not finite."""
    if not np.isfinite(maps).all():
        return float("inf")
    span = float(reference.max() - reference.min()) or 1.0
    return float(np.abs(maps.astype(np.float64) - reference).max() / span)


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": device.type, "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        info.update(
            gpu=torch.cuda.get_device_name(device),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            tf32=True,
            cudnn_benchmark=True,
        )
    else:
        info.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


class Measurement:
    """All configurations of one run, within a time budget; what could not run is listed with the reason."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args, self.device = args, device
        meta = bundle.read_metadata(args.bundle)
        self.meta = meta
        self.size = (int(meta["input"]["height"]), int(meta["input"]["width"]))
        self.deadline = time.monotonic() + args.budget_s
        self.results: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []
        self.reference: dict[int, np.ndarray] = {}
        self.modules: dict[str, FusedDFR] = {}

    def module(self, precision: str) -> FusedDFR:
        if precision not in self.modules:
            self.modules[precision] = fused_module(Path(self.args.bundle), precision, self.device)
        return self.modules[precision]

    def reference_maps(self, batch: int) -> np.ndarray:
        if batch not in self.reference:
            frames = torch.from_numpy(bench_frames(batch, *self.size)).to(self.device)
            self.reference[batch] = self.module("fp32")(frames)[0].float().cpu().numpy().astype(np.float64)
        return self.reference[batch]

    def why_not(self, variant: str) -> str | None:
        if variant in CUDA_ONLY and self.device.type != "cuda":
            return f"{variant} needs CUDA"
        left = self.deadline - time.monotonic()
        if left < MIN_SECONDS[variant]:
            return f"time budget: {left:.0f} s left of {self.args.budget_s:.0f} s"
        return None

    def one(self, variant: str, precision: str, batch: int) -> None:
        why = self.why_not(variant)
        if why:
            self.skipped.append({"variant": variant, "precision": precision, "batch": batch, "reason": why})
            return
        frames = bench_frames(batch, *self.size)
        try:
            runner = Runner(self.module(precision), self.device, batch, self.size, variant)
            times = time_calls(runner.score, frames, self.args.iters, warmup=3, max_seconds=self.args.max_seconds)
            maps, _ = runner.score(frames)
            resident = runner.resident_ms(max(3, min(len(times), 50)))
        except Exception as exc:  # one configuration failing (compile, capture, memory) must not end the run
            self.skipped.append(
                {"variant": variant, "precision": precision, "batch": batch, "reason": f"failed: {exc!r}"[:400]}
            )
            return
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        row = {"backend": "torch", "variant": variant, "precision": precision, "batch": batch}
        row.update(latency_stats(times, batch))
        row.update(
            resident_ms=resident,
            resident_images_per_s=batch / resident * 1e3,
            setup_s=runner.setup_s,
            map_err=map_error(self.reference_maps(batch), maps),
        )
        self.results.append(row)
        print(
            f"torch {variant:<9} {precision} batch {batch:>3}: {row['images_per_s']:10.1f} img/s  "
            f"p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms  resident {resident:7.2f} ms  "
            f"map_err {row['map_err']:.1e}",
            flush=True,
        )

    def report(self) -> dict[str, Any]:
        dfr = self.meta.get("dfr") or {}
        return {
            "backend": "torch",
            "what": "linewatch.export.graph.FusedDFR in torch (the module the ONNX graph is traced from), "
            "not ONNX Runtime",
            **device_info(self.device),
            "bundle": str(self.args.bundle),
            "input": list(self.size),
            "layers": dfr.get("layer_spec"),
            "c_d": dfr.get("c_d"),
            "weights": (self.meta.get("weights") or {}).get("source"),
            "results": self.results,
            "skipped": self.skipped,
        }


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    return torch.device(name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--precision", default="fp16,fp32", help="in this order: the goal's precision first")
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--iters", type=int, default=200, help="timed calls per configuration at most")
    p.add_argument("--max-seconds", type=float, default=2.0, help="timed seconds per configuration at most")
    p.add_argument("--budget-s", type=float, default=150.0, help="configurations not started by then are skipped")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.precisions = [v.strip() for v in args.precision.split(",") if v.strip()]
    args.batches = parse_batches(args.batch)
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(args.variant_list) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}: use {', '.join(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.set_grad_enabled(False)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = True
    run = Measurement(args, device)
    for variant in args.variant_list:
        for precision in args.precisions:
            for batch in args.batches:
                run.one(variant, precision, batch)
                if args.json:  # after every configuration: a run killed at its timeout keeps what it measured
                    args.json.write_text(json.dumps(run.report(), indent=2) + "\n")
    report = run.report()
    for s in report["skipped"]:
        print(f"torch {s['variant']:<9} {s['precision']} batch {s['batch']:>3}: skipped: {s['reason']}", flush=True)
    return 0 if report["results"] else 1


if __name__ == "__main__":
    sys.exit(main())
