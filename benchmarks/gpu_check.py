"""The GPU check: one run, one time budget, every figure and every reason for a missing one in one report.

benchmarks/gpu_bench.sh sets up the environment (carried wheels, the source tree importable) and runs this; see
docs/BENCHMARKS.md, "GPU", for the command a session with a lent GPU pastes. Stages, each within what is left of
--budget-s, each recorded as ok / skipped (with the reason) / failed (with the error):

1. environment: Python, package versions, which `onnxruntime` is imported and its providers, the GPU, TensorRT;
2. bundle: an untrained bundle at the measured settings (paper: f_{1:12}, 256², c_d 200) with the real VGG19 weights
   when `linewatch fetch-weights` stored them, else random weights (speed does not depend on weight values; the
   report says which), exported to fp32 and fp16 graphs when ONNX Runtime will use them; or a given --bundle;
3. onnxruntime: `linewatch bench` (engine in fresh processes) per provider and precision: CUDA and TensorRT on a
   GPU where their libraries load, the CPU provider otherwise;
4. torch: benchmarks/gpu_torch.py, the same fused computation as a torch module (eager, CUDA graphs, compile);
5. daemon: benchmarks/gpu_daemon.py, `linewatch run` with synthetic cameras, against the engine's own rate.

Writes OUT/gpu_check.json (everything) and OUT/gpu_check.txt (the table it prints); the bundle and intermediate
files go to --work, never to OUT (the GPU machine returns at most 8 files of 16 MiB). Exit 0 when no stage failed
and every stage named in --require ran.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
Row = dict[str, Any]
DISTS = (
    "numpy",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "torch",
    "torchvision",
    "opencv-python-headless",
    "pydantic",
    "pyzmq",
    "PyYAML",
)
PAPER = {"size": 256, "layers": "1:12", "c_d": 200}
DEFAULTS = {
    "gpu": {**PAPER, "batches": "1,8,32", "iters": 200, "max_seconds": 2.0, "cameras": 4},
    "cpu": {"size": 64, "layers": "1:4", "c_d": 16, "batches": "1,2", "iters": 3, "max_seconds": 5.0, "cameras": 2},
}
DAEMON_RESERVE_S = 45.0  # kept back from the torch stage for the daemon stage on a GPU
GOAL_IMAGES_PER_S = 2000.0  # batch 32 fp16, paper settings
GOAL_P99_MS = 3.0  # batch 1

MAKE_BUNDLE = """
import json, sys
from linewatch.errors import BundleError
from linewatch.export.synthetic import make_untrained_bundle
from linewatch.training.weights import resolve
out, layers, size, c_d = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
try:
    resolve()
    random_init = False
except BundleError:
    random_init = True
make_untrained_bundle(out, layers, size, c_d, random_init=random_init)
print(json.dumps({"random_weights": random_init}))
"""


def dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def can_load(library: str) -> bool:
    try:
        ctypes.CDLL(library)
        return True
    except OSError:
        return False


def nvidia_gpus() -> list[str]:
    """`nvidia-smi` lines naming each GPU, driver and memory; [] without a usable NVIDIA GPU."""
    if not shutil.which("nvidia-smi"):
        return []
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    try:
        proc = subprocess.run(query, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()] if proc.returncode == 0 else []


def onnxruntime_info() -> Row:
    import onnxruntime as ort

    from linewatch.line.engine import preload_gpu_libraries

    preload_gpu_libraries()
    return {
        "version": ort.__version__,
        "file": ort.__file__,
        "providers": list(ort.get_available_providers()),
        "cuda_libraries": loaded_libraries(("libcudart.so", "libcublas.so", "libcudnn.so")),
    }


def loaded_libraries(prefixes: tuple[str, ...]) -> list[str]:
    """Paths of the shared libraries this process has loaded whose names start with one of `prefixes`."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    paths = {ln.split()[-1] for ln in lines if "/" in ln}
    return sorted(p for p in paths if Path(p).name.startswith(prefixes))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="gpu_check.json and gpu_check.txt go here")
    p.add_argument("--work", type=Path, required=True, help="bundle and intermediate files")
    p.add_argument("--device", default="auto", choices=["auto", "gpu", "cpu"])
    p.add_argument("--bundle", type=Path, help="an exported bundle to measure (copied into --work)")
    p.add_argument("--size", type=int)
    p.add_argument("--layers")
    p.add_argument("--c-d", type=int)
    p.add_argument("--batches")
    p.add_argument("--iters", type=int)
    p.add_argument("--max-seconds", type=float, help="timed seconds per measurement at most")
    p.add_argument("--providers", help="ONNX Runtime providers to measure (default: cuda,tensorrt on a GPU, else cpu)")
    p.add_argument("--torch-variants", default="eager,cudagraph,compile")
    p.add_argument("--daemon", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--budget-s", type=float, default=240.0, help="stages not started by then are skipped")
    p.add_argument("--stages", default="onnxruntime,torch,daemon", help="measuring stages to run (in this order)")
    p.add_argument("--require", default="", help="stages that must run: any of ort,torch,daemon")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "gpu" if nvidia_gpus() else "cpu"
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.precision = "fp16" if args.device == "gpu" else "fp32"  # the daemon stage's; fp16 is the GPU goal's
    args.required = {s.strip() for s in args.require.split(",") if s.strip()}
    return args


class Check:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.t0 = time.monotonic()
        self.bundle = args.work / "bundle"
        self.ort_rows: list[Row] = []
        self.report: Row = {
            "check": "linewatch GPU check (benchmarks/gpu_check.py)",
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": args.device,
            "settings": {
                "size": args.size,
                "layers": args.layers,
                "c_d": args.c_d,
                "batches": args.batches,
                "iters": args.iters,
                "max_seconds": args.max_seconds,
                "budget_s": args.budget_s,
            },
            "stages": {},
        }

    def left(self) -> float:
        return float(self.args.budget_s) - (time.monotonic() - self.t0)

    def save(self) -> None:
        self.args.out.mkdir(parents=True, exist_ok=True)
        (self.args.out / "gpu_check.json").write_text(json.dumps(self.report, indent=2) + "\n")

    def stage(self, name: str, fn: Callable[[], Row]) -> Row:
        start = time.monotonic()
        print(f"== {name} ({self.left():.0f} s of the budget left)", flush=True)
        try:
            result = fn()
        except Exception as exc:  # a stage's failure is a finding to report, not the end of the run
            result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[-2000:]}
        result["seconds"] = round(time.monotonic() - start, 1)
        self.report["stages"][name] = result
        self.save()
        note = result.get("reason") or result.get("error") or ""
        print(f"== {name}: {result['status']} in {result['seconds']} s {note}".rstrip(), flush=True)
        return result

    def run_python(self, args: list[str], timeout: float, capture: bool = False) -> subprocess.CompletedProcess[str]:
        """`python ARGS`; its output goes to the log unless captured, a captured stderr into the error."""
        try:
            return subprocess.run(
                [sys.executable, *args], capture_output=capture, text=True, timeout=max(timeout, 1.0), check=True
            )
        except subprocess.CalledProcessError as exc:
            if capture:
                sys.stderr.write(exc.stderr or "")
                raise RuntimeError(f"exit {exc.returncode}: {(exc.stderr or '').strip()[-1500:]}") from exc
            raise

    # ---- stages ---------------------------------------------------------------------------------------------

    def environment(self) -> Row:
        env = {
            "status": "ok",
            "python": platform.python_version(),
            "executable": sys.executable,
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "gpus": nvidia_gpus(),
            "versions": {name: dist_version(name) for name in DISTS},
            "onnxruntime": onnxruntime_info(),
            "tensorrt_libraries": can_load("libnvinfer.so.10"),
            "modules": {m: has_module(m) for m in ("torch", "cv2", "zmq", "pydantic", "matplotlib", "h5py")},
        }
        return env

    def ort_providers(self) -> tuple[list[str], list[str]]:
        """(providers to measure, why the others are not measured)."""
        if self.args.providers:
            return [p.strip() for p in self.args.providers.split(",") if p.strip()], []
        if self.args.device == "cpu":
            return ["cpu"], []
        env = self.report["stages"].get("environment", {})
        available = env.get("onnxruntime", {}).get("providers", [])
        version = env.get("onnxruntime", {}).get("version")
        chosen, why = [], []
        if "CUDAExecutionProvider" in available:
            chosen.append("cuda")
        else:
            why.append(f"cuda: onnxruntime {version} has no CUDA provider (carry onnxruntime-gpu: gpu_prepare.py)")
        if "TensorrtExecutionProvider" not in available:
            why.append(f"tensorrt: onnxruntime {version} has no TensorRT provider")
        elif not env.get("tensorrt_libraries"):
            why.append("tensorrt: libnvinfer.so.10 (TensorRT 10) does not load on this machine")
        else:
            chosen.append("tensorrt")
        return chosen, why

    def make_bundle(self) -> Row:
        a = self.args
        if self.bundle.exists():
            shutil.rmtree(self.bundle)
        a.work.mkdir(parents=True, exist_ok=True)
        if a.bundle:
            shutil.copytree(a.bundle, self.bundle)
            return {"status": "ok", "source": f"given: {a.bundle}", **self.bundle_facts()}
        if not has_module("torch"):
            return {"status": "failed", "error": "torch is not installed here and no --bundle was given"}
        made = self.run_python(
            ["-c", MAKE_BUNDLE, str(self.bundle), a.layers, str(a.size), str(a.c_d)], self.left(), capture=True
        )
        result = {"status": "ok", "source": "made here (untrained CAE)", **json.loads(made.stdout.splitlines()[-1])}
        if self.ort_providers()[0]:
            t = time.monotonic()
            self.run_python(["-m", "linewatch.cli", "export", str(self.bundle), "--fp16"], self.left())
            result["export_s"] = round(time.monotonic() - t, 1)
        else:
            result["export"] = "skipped: ONNX Runtime has no provider to measure here"
        return {**result, **self.bundle_facts()}

    def bundle_facts(self) -> Row:
        from linewatch import bundle

        meta = bundle.read_metadata(self.bundle)
        graph = meta.get("graph") or {}
        return {
            "input": [meta["input"]["height"], meta["input"]["width"]],
            "layers": (meta.get("dfr") or {}).get("layer_spec"),
            "c_d": (meta.get("dfr") or {}).get("c_d"),
            "weights": (meta.get("weights") or {}).get("source"),
            "graphs": [graph[k] for k in ("file", "fp16_file") if graph.get(k)],
        }

    def ort_stage(self) -> Row:
        from linewatch.errors import LinewatchError
        from linewatch.evaluation.bench import parse_batches, run_bench

        providers, why = self.ort_providers()
        if not providers:
            return {"status": "skipped", "reason": "; ".join(why)}
        if not (self.bundle / "model.onnx").is_file():
            return {"status": "skipped", "reason": "the bundle has no exported graph"}
        errors: list[str] = []
        for provider in providers:
            for precision in ("fp16", "fp32"):  # the goal's precision first, in case the budget runs out
                if self.left() < 20:
                    errors.append(f"{provider} {precision}: not started, time budget spent")
                    continue
                try:
                    rep = run_bench(
                        self.bundle,
                        parse_batches(self.args.batches),
                        [provider],
                        precision=precision,
                        iters=self.args.iters,
                        reference=False,
                        max_seconds=self.args.max_seconds,
                        timeout=self.left(),
                    )
                except LinewatchError as exc:
                    errors.append(f"{provider} {precision}: {exc}"[-1500:])
                    break  # the provider's other precision would fail the same way
                self.ort_rows.extend({**r, "backend": "onnxruntime"} for r in rep["results"])
        status = "failed" if errors else "ok"
        return {"status": status, "not_measured": why, "errors": errors, "results": self.ort_rows}

    def torch_stage(self) -> Row:
        a = self.args
        if not has_module("torch"):
            return {"status": "skipped", "reason": "torch is not installed here"}
        if not (self.bundle / "model.pt").is_file():
            return {"status": "skipped", "reason": "the bundle has no torch checkpoint (model.pt)"}
        budget = self.left() - (DAEMON_RESERVE_S if self.daemon_plan()[0] else 0.0)
        out = a.work / "torch.json"
        out.unlink(missing_ok=True)
        cmd = [str(HERE / "gpu_torch.py"), str(self.bundle), "--device", "cuda" if a.device == "gpu" else "cpu"]
        cmd += ["--batch", a.batches, "--variants", a.torch_variants, "--iters", str(a.iters)]
        cmd += ["--max-seconds", str(a.max_seconds), "--budget-s", f"{max(budget, 0):.0f}", "--json", str(out)]
        error, notes = None, []
        try:
            self.run_python(cmd, timeout=max(budget, 0) + 60)  # a compile that overruns is cut off here
        except subprocess.TimeoutExpired as exc:  # what it measured before is in its JSON, written per configuration
            notes.append(f"cut off after {exc.timeout:.0f} s (the configuration then running is lost)")
        except subprocess.CalledProcessError as exc:
            error = str(exc)
        report = json.loads(out.read_text()) if out.is_file() else {"results": [], "skipped": []}
        report["status"] = "ok" if report["results"] and not error else "failed"
        if error:
            report["error"] = error
        reasons = sorted({s["reason"] for s in report["skipped"]})
        if reasons:
            notes.append(f"{len(report['skipped'])} configurations skipped: " + "; ".join(reasons))
        report["not_measured"] = notes
        return report

    def daemon_plan(self) -> tuple[bool, str]:
        """(whether the daemon stage will run, why not)."""
        a = self.args
        if a.daemon == "off":
            return False, "--daemon off"
        if "daemon" not in a.stages.split(","):
            return False, "not in --stages"
        missing = [m for m in ("zmq", "pydantic", "cv2", "yaml") if not has_module(m)]
        if missing:
            return False, f"modules missing: {', '.join(missing)} (gpu_prepare.py wheels carries pyzmq, pydantic)"
        if a.device == "gpu" and not any(r["provider"] == "cuda" for r in self.ort_rows) and a.daemon == "auto":
            return False, "needs the ONNX Runtime CUDA provider (the daemon's engine), which did not run"
        return True, ""

    def daemon_stage(self) -> Row:
        a = self.args
        run, why = self.daemon_plan()
        if not run:
            return {"status": "skipped", "reason": why}
        if self.left() < 30:
            return {"status": "skipped", "reason": f"time budget: {self.left():.0f} s left"}
        provider = "cuda" if a.device == "gpu" else "cpu"
        batch = max(int(b) for b in a.batches.split(","))
        bench = [
            r["images_per_s"]
            for r in self.ort_rows
            if r["provider"] == provider and r["precision"] == a.precision and r["batch"] == batch
        ]
        out = a.work / "daemon.json"
        out.unlink(missing_ok=True)
        cmd = [str(HERE / "gpu_daemon.py"), str(self.bundle), "--provider", provider, "--precision", a.precision]
        cmd += ["--cameras", str(a.cameras), "--batch", str(batch), "--json", str(out)]
        # its own deadline (start + 2 windows) and the daemon's shutdown (<= 30 s) end before this stage's timeout
        startup = max(self.left() - 45, 10)
        cmd += ["--seconds", "5", "--startup-s", f"{startup:.0f}", "--workdir", str(a.work / "daemon")]
        if bench:
            cmd += ["--bench-images-per-s", str(bench[0])]
        self.run_python(cmd, timeout=self.left())
        return {"status": "ok", **json.loads(out.read_text())}

    def run(self) -> int:
        self.stage("environment", self.environment)
        self.stage("bundle", self.make_bundle)
        bundle_ok = self.report["stages"]["bundle"]["status"] == "ok"
        wanted = {s.strip() for s in self.args.stages.split(",")}
        for name, fn in (("onnxruntime", self.ort_stage), ("torch", self.torch_stage), ("daemon", self.daemon_stage)):
            if name not in wanted:
                self.report["stages"][name] = {"status": "skipped", "reason": "not in --stages"}
            elif bundle_ok:
                self.stage(name, fn)
            else:
                self.report["stages"][name] = {"status": "skipped", "reason": "no bundle"}
        self.report["seconds"] = round(time.monotonic() - self.t0, 1)
        text = format_table(self.report)
        self.report["table"] = text
        self.save()
        (self.args.out / "gpu_check.txt").write_text(text + "\n")
        print(text, flush=True)
        return self.exit_code()

    def exit_code(self) -> int:
        stages = self.report["stages"]
        failed = [n for n, s in stages.items() if s["status"] == "failed"]
        short = {"ort": "onnxruntime", "torch": "torch", "daemon": "daemon"}
        missing = [r for r in sorted(self.args.required) if stages.get(short.get(r, r), {}).get("status") != "ok"]
        if failed or missing:
            print(f"gpu check: failed stages {failed}, required stages that did not run {missing}", file=sys.stderr)
            return 1
        return 0


# ---- the printed table --------------------------------------------------------------------------------------


def row_line(r: Row) -> str:
    how = r.get("variant") or r.get("provider")
    resident = f"{r['resident_ms']:9.2f}" if "resident_ms" in r else f"{'':>9}"
    err = f"{r['map_err']:.1e}" if "map_err" in r else ""
    return (
        f"{r['backend']:<12} {how:<10} {r['precision']:<5} {r['batch']:>5} {r['images_per_s']:>10.1f} "
        f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {resident} {err}"
    )


def goal_line(backend: str, rows: list[Row]) -> str | None:
    """The best batch-32 fp16 rate and the best batch-1 p99 of one backend, against the issue's goals."""
    b32 = [r for r in rows if r["backend"] == backend and r["precision"] == "fp16" and r["batch"] == 32]
    b1 = [r for r in rows if r["backend"] == backend and r["batch"] == 1]
    if not b32 and not b1:
        return None
    tput, p99 = "-", "-"
    if b32:
        best = max(b32, key=lambda r: float(r["images_per_s"]))
        tput = f"{best['images_per_s']:.0f} img/s ({best.get('variant') or best['provider']})"
    if b1:
        fast = min(b1, key=lambda r: float(r["p99_ms"]))
        p99 = f"{fast['p99_ms']:.2f} ms ({fast.get('variant') or fast['provider']} {fast['precision']})"
    return (
        f"goals, {backend}: batch 32 fp16 {tput} (goal >= {GOAL_IMAGES_PER_S:.0f}); "
        f"batch 1 p99 {p99} (goal <= {GOAL_P99_MS:g} ms)"
    )


def goal_lines(report: Row, rows: list[Row]) -> list[str]:
    bundle = report["stages"].get("bundle", {})
    paper = bundle.get("input") == [256, 256] and bundle.get("layers") == "1:12" and report["device"] == "gpu"
    if not paper:
        return ["goals (GPU, paper settings f_{1:12} 256²): not judged here (not a GPU run at paper settings)"]
    lines = [goal_line(backend, rows) for backend in ("onnxruntime", "torch")]
    return [ln for ln in lines if ln] or ["goals: no GPU measurement to judge"]


def format_table(report: Row) -> str:
    env = report["stages"].get("environment", {})
    ort = env.get("onnxruntime", {})
    bundle = report["stages"].get("bundle", {})
    weights = bundle.get("weights")
    lines = [
        f"linewatch GPU check, {report['started']}, device {report['device']}: "
        f"{'; '.join(env.get('gpus') or []) or 'no NVIDIA GPU'}",
        f"python {env.get('python')}, onnxruntime {ort.get('version')} ({', '.join(ort.get('providers', []))}), "
        f"torch {(env.get('versions') or {}).get('torch') or 'not installed'}",
        f"bundle: f_{{{bundle.get('layers')}}} at {bundle.get('input')}, c_d {bundle.get('c_d')}, weights {weights}"
        + (" (RANDOM VGG19 weights: speed does not depend on weight values)" if weights == "random" else "")
        + ", untrained CAE",
        f"{'backend':<12} {'how':<10} {'prec':<5} {'batch':>5} {'images/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'resident':>9} map_err",
    ]
    stages = report["stages"]
    rows = list(stages.get("onnxruntime", {}).get("results", [])) + list(stages.get("torch", {}).get("results", []))
    lines += [row_line(r) for r in rows]
    daemon = stages.get("daemon", {})
    if daemon.get("status") == "ok":
        ratio = f" = {daemon['ratio']:.0%} of bench" if "ratio" in daemon else ""
        lines.append(
            f"daemon {daemon['provider']} {daemon['precision']}, {daemon['cameras']} cameras, batch {daemon['batch']}: "
            f"{daemon['images_per_s']:.1f} results/s{ratio}, dropped {daemon['dropped']} of {daemon['captured']}"
        )
    lines += goal_lines(report, rows)
    for name, s in stages.items():
        note = s.get("reason") or s.get("error") or "; ".join(s.get("not_measured", []) + s.get("errors", []))
        lines.append(f"stage {name}: {s['status']} ({s.get('seconds', 0)} s){': ' + note if note else ''}")
    lines.append(f"total {report.get('seconds')} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    return Check(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
